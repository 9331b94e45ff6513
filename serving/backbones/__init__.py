"""Model families: the one place that knows which denoiser backbones exist.

A *backbone* wraps one diffusers model family — its text encoders, its denoiser (UNet or
transformer), its latent layout and its VAE — behind `base.Backbone`, so the runner above it
batches, guides and schedules without knowing the family. This package's top level stays
torch-free: the operator imports `FAMILIES` to validate `spec.model.family` at admission and
`settings` imports it to parse `--family`; the backbones themselves load lazily.

Families and what a checkpoint of each looks like (its `model_index.json` `_class_name`):

| family | pipeline class | backbone |
|---|---|---|
| `sd15` | `StableDiffusionPipeline` | `sd.StableDiffusionBackbone` (SD 1.x) |
| `sd2` | `StableDiffusionPipeline` | the same, `v_prediction` read from the scheduler config |
| `sdxl` | `StableDiffusionXLPipeline` | `sdxl.StableDiffusionXLBackbone` |
| `sd3` | `StableDiffusion3Pipeline` | `sd3.StableDiffusion3Backbone` (SD3/3.5 MMDiT, flow matching) |
| `flux` | `FluxPipeline` | `flux.FluxBackbone` (Flux DiT, packed latents, flow matching) |
| `wan` | `WanPipeline` | `wan.WanBackbone` (Wan 2.1 text-to-video; images are one-frame videos) |
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stepfleet.serving.backbones.base import Backbone
    from stepfleet.serving.loading import LoadedModel

#: Families a worker can serve; a DiffusionService naming any other is refused at admission.
FAMILIES: tuple[str, ...] = ("sd15", "sd2", "sdxl", "sd3", "flux", "wan")

#: The diffusers pipeline class of each family's checkpoints.
PIPELINE_CLASSES: dict[str, str] = {
    "sd15": "StableDiffusionPipeline",
    "sd2": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
    "wan": "WanPipeline",
}


class FamilyMismatch(ValueError):
    """The checkpoint is of another family than the one asked for (a configuration error)."""


def families_of_pipeline(class_name: str) -> tuple[str, ...]:
    """Families whose checkpoints have this pipeline class (empty: no backbone serves it)."""
    return tuple(f for f, c in PIPELINE_CLASSES.items() if c == class_name)


def resolve_family(requested: str, class_name: str, model: str) -> str:
    """The family to serve `model` with; raises `FamilyMismatch` naming both when they disagree.

    `requested` is `auto` (take the checkpoint's own) or one of `FAMILIES`.
    """
    found = families_of_pipeline(class_name)
    if not found:
        raise FamilyMismatch(
            f"model {model!r} is a {class_name}, which no stepfleet backbone serves "
            f"(families: {', '.join(FAMILIES)})"
        )
    if requested == "auto":
        return found[0]
    if requested not in FAMILIES:
        raise FamilyMismatch(f"unknown family {requested!r}; choose one of {', '.join(FAMILIES)}")
    if requested not in found:
        raise FamilyMismatch(
            f"family mismatch: the service asks for family {requested!r} "
            f"({PIPELINE_CLASSES[requested]}), but model {model!r} is a {class_name} "
            f"(family {' or '.join(found)})"
        )
    return requested


def load_backbone(model: LoadedModel) -> Backbone:
    """Wrap a loaded pipeline in its family's backbone (imports torch and diffusers)."""
    if model.family in ("sd15", "sd2"):
        from stepfleet.serving.backbones.sd import StableDiffusionBackbone

        return StableDiffusionBackbone(model.pipeline, family=model.family)
    if model.family == "sdxl":
        from stepfleet.serving.backbones.sdxl import StableDiffusionXLBackbone

        return StableDiffusionXLBackbone(model.pipeline)
    if model.family == "sd3":
        from stepfleet.serving.backbones.sd3 import StableDiffusion3Backbone

        return StableDiffusion3Backbone(model.pipeline)
    if model.family == "flux":
        from stepfleet.serving.backbones.flux import FluxBackbone

        return FluxBackbone(model.pipeline)
    if model.family == "wan":
        from stepfleet.serving.backbones.wan import WanBackbone

        return WanBackbone(model.pipeline)
    raise FamilyMismatch(f"no backbone for family {model.family!r}")
