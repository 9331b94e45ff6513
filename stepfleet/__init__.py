"""stepfleet: diffusion serving across heterogeneous accelerators."""
__version__ = "0.1.0"
