"""The worker's ControlNet extension, as its settings say (`--controlnets`, `--controlnet-placement`)."""

from __future__ import annotations

from stepfleet.serving.backbones.base import Backbone
from stepfleet.serving.controlnet.extension import ControlNetExtension
from stepfleet.serving.controlnet.placement import make_executor
from stepfleet.serving.controlnet.registry import ControlNetRegistry
from stepfleet.serving.controlnet.spec import parse_registry
from stepfleet.serving.settings import WorkerSettings


def build_controlnets(settings: WorkerSettings, backbone: Backbone) -> ControlNetExtension | None:
    """Load the registered ControlNets (a net that does not fit the model fails loading); None when
    none is registered, so a worker without ControlNets runs no extra hook."""
    entries = parse_registry(settings.controlnets)
    if not entries:
        return None
    registry = ControlNetRegistry.load(entries, backbone.denoiser, settings.local_files_only)
    return ControlNetExtension(backbone, registry, make_executor(settings.controlnet_placement))
