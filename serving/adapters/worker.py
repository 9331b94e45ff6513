"""A worker's adapters from its settings: the registry (cache tiers, metrics) and the runner's extension.

Only families whose LoRA layout diffusers converts (`lora.FAMILY_LOADERS`) get adapters; on
others the worker serves without them and `lora` on a request is a 400.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from stepfleet.serving.adapters.extension import LoraExtension
from stepfleet.serving.adapters.lora import FAMILY_LOADERS
from stepfleet.serving.adapters.metrics import AdapterMetrics
from stepfleet.serving.adapters.registry import AdapterRegistry
from stepfleet.serving.adapters.sources import read_source
from stepfleet.serving.adapters.spec import parse_adapters

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from stepfleet.serving.backbones.base import Backbone
    from stepfleet.serving.settings import WorkerSettings

log = logging.getLogger(__name__)


def build_adapters(settings: WorkerSettings, backbone: Backbone,
                   metrics: CollectorRegistry | None = None) -> tuple[AdapterRegistry, LoraExtension] | None:
    """(registry, extension) for the served model, or None when it cannot take adapters (or they are off)."""
    if settings.max_adapters_per_request == 0:
        return None
    if backbone.family not in FAMILY_LOADERS:
        log.warning("LoRA adapters disabled: family %s has no LoRA conversion here", backbone.family)
        return None
    registry = AdapterRegistry(
        backbone.family, backbone.denoiser, device_bytes=settings.adapter_device_bytes,
        host_bytes=settings.adapter_host_bytes, disk_bytes=settings.adapter_disk_bytes,
        directory=settings.adapter_dir, metrics=AdapterMetrics(settings.pool, metrics),
    )
    register_spec_adapters(registry, settings)
    return registry, LoraExtension(backbone.denoiser, registry, max_unloaded_steps=settings.lora_max_unloaded_steps)


def register_spec_adapters(registry: AdapterRegistry, settings: WorkerSettings) -> list[str]:
    """Register `--adapters` (preloading the starred ones); returns the names that failed.

    A failing adapter is logged and skipped, not fatal: requests naming it get 404 while the
    rest of the service works (it can be registered again through the API).
    """
    failed = []
    for entry in parse_adapters(settings.adapters):
        try:
            data = read_source(entry.source, settings.max_adapter_bytes, settings.local_files_only)
            registry.add(entry.name, data, entry.source)
            if entry.preload:
                registry.preload(entry.name).result(timeout=600)
        except Exception as exc:  # noqa: BLE001 - one bad adapter must not keep the worker down
            log.error("adapter %s from %s not registered: %s", entry.name, entry.source, exc)
            failed.append(entry.name)
    return failed
