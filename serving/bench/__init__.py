"""Benchmarks that print JSON figures: live runs plus discrete-event replays of the same trace."""
