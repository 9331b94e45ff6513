"""A worker's adapters: names → files, and a cache of their weights in three tiers.

- **disk**: every adapter's safetensors file in the adapter directory (uploads are written
  there; a `source` is read from its path or the hub). Bounded in bytes: least recently used
  files whose source can be read again are deleted first; an upload's file is its only copy,
  so uploads are never evicted and an upload that does not fit is refused.
- **host**: the parsed, checked weights (float32, CPU memory), bounded in bytes, LRU.
- **device**: the weights in the model's dtype on its device, bounded in bytes, LRU — what the
  hooks read.

An adapter is checked against the served model when it is added (a bad one is refused then,
not when a request needs it), so a later load from disk cannot fail on content, only on I/O.
A request pins its adapters (`acquire` → `AdapterLease`); pinned adapters are never evicted
from any tier. A lease of an adapter that is not on the device starts its load on the
registry's loader thread (one: loads queue rather than compete with the step loop for CPU or
bus), and the lease lands when it is done; a failed load fails the leases waiting on it and
nothing else. The `stepfleet_adapter_*` metrics count hits and misses per tier, loads,
their seconds and each tier's bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stepfleet.serving.adapters.lora import AdapterError, LoraWeights, parse_lora, read_safetensors
from stepfleet.serving.adapters.metrics import AdapterMetrics

log = logging.getLogger(__name__)

#: Adapter names: what `lora[].name` and the URL path carry.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
UPLOAD = "upload"


@dataclass(eq=False)
class AdapterEntry:
    name: str
    source: str  # "upload", a local path, pvc://…, or hf://repo[/file]
    digest: str  # sha256 of the file
    file_bytes: int
    rank: int
    modules: int
    created: int
    path: Path | None = None  # on the disk tier
    host: LoraWeights | None = None
    device: LoraWeights | None = None
    pins: int = 0
    loading: Future[LoraWeights] | None = None
    deleted: bool = False
    last_used: float = field(default_factory=time.monotonic)

    @property
    def refetchable(self) -> bool:
        return self.source != UPLOAD

    def tiers(self) -> list[str]:
        return [t for t, v in (("device", self.device), ("host", self.host), ("disk", self.path)) if v is not None]


class AdapterLease:
    """A pin on one adapter for one request; lands once the adapter is on the device."""

    def __init__(self, registry: AdapterRegistry, entry: AdapterEntry, future: Future[LoraWeights]) -> None:
        self.name = entry.name
        self._registry, self._entry, self._future = registry, entry, future
        self._released = False

    def landed(self) -> LoraWeights | None:
        if not self._future.done():
            return None
        return self._future.result()  # raises the load's error

    def wait(self, timeout: float | None = None) -> LoraWeights:
        return self._future.result(timeout)

    @property
    def future(self) -> Future[LoraWeights]:
        return self._future

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._registry.unpin(self._entry)


class AdapterRegistry:
    """Adapters of one served model (family and denoiser), cached in device, host and disk tiers."""

    def __init__(self, family: str, denoiser: torch.nn.Module, *, device_bytes: int, host_bytes: int,
                 disk_bytes: int, directory: str | Path | None = None, metrics: AdapterMetrics | None = None,
                 reader: Callable[[Path], bytes] | None = None) -> None:
        self.family = family
        self.denoiser = denoiser
        p = next(denoiser.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.bounds = {"device": device_bytes, "host": host_bytes, "disk": disk_bytes}
        self._own_dir = directory is None
        self.directory = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="stepfleet-lora-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.metrics = metrics or AdapterMetrics()
        self._read = reader or (lambda path: path.read_bytes())
        self._entries: dict[str, AdapterEntry] = {}
        self._lock = threading.RLock()
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="stepfleet-lora")

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    # -- names -----------------------------------------------------------------------------
    def get(self, name: str) -> AdapterEntry | None:
        with self._lock:
            entry = self._entries.get(name)
            return None if entry is None or entry.deleted else entry

    def all(self) -> list[AdapterEntry]:
        with self._lock:
            return sorted((e for e in self._entries.values() if not e.deleted), key=lambda e: e.name)

    def add(self, name: str, data: bytes, source: str = UPLOAD) -> AdapterEntry:
        """Check `data` against the served model and register it as `name` (replacing an unpinned one).

        Raises `AdapterError`: 400 not safetensors, 422 does not fit the model, 409 name in use by
        a running request, 507 no room on the disk tier for an upload.
        """
        if not ADAPTER_NAME.fullmatch(name):
            raise AdapterError(400, f"name {name!r}: use 1-128 letters, digits, '.', '_' or '-'", code="invalid_name")
        tensors, metadata = read_safetensors(data)
        weights = parse_lora(tensors, metadata, self.family, self.denoiser)
        entry = AdapterEntry(name=name, source=source, digest=hashlib.sha256(data).hexdigest(), file_bytes=len(data),
                             rank=weights.rank, modules=len(weights.layers), created=int(time.time()))
        with self._lock:
            old = self._entries.get(name)
            if old is not None and not old.deleted and old.pins:
                raise AdapterError(409, f"adapter {name!r} is in use by running requests; delete it first or use "
                                   "another name", code="adapter_in_use")
            if old is not None:
                self._drop(old)
            self._make_room("disk", len(data), pinned_ok=False)
            if source == UPLOAD and self._tier_bytes("disk") + len(data) > self.bounds["disk"]:
                raise AdapterError(507, f"no room for {len(data)} bytes on the adapter disk tier "
                                   f"({self.bounds['disk']} bytes, uploads are kept)", code="adapter_storage_full")
            entry.path = self.directory / f"{name}-{entry.digest[:12]}.safetensors"
            entry.path.write_bytes(data)
            entry.host = weights
            self._entries[name] = entry
            self._make_room("host", 0, pinned_ok=False)
            self._publish()
        return entry

    def delete(self, name: str) -> bool:
        """Forget `name`; running requests that pinned it finish with it, then it is freed."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.deleted:
                return False
            entry.deleted = True
            if entry.pins == 0:
                self._drop(entry)
            self._publish()
            return True

    # -- leases ----------------------------------------------------------------------------
    def acquire(self, name: str) -> AdapterLease:
        """Pin `name` and start moving it to the device (KeyError: not registered).

        Finds adapters deleted while pinned too, so a request accepted before a DELETE runs with it.
        """
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise KeyError(name)
            entry.pins += 1
            entry.last_used = time.monotonic()
            if entry.device is not None:
                self.metrics.hit("device")
                fut: Future[LoraWeights] = Future()
                fut.set_result(entry.device)
                return AdapterLease(self, entry, fut)
            self.metrics.miss("device")
            if entry.loading is None or (entry.loading.done() and entry.loading.exception() is not None):
                for tier, held in (("host", entry.host), ("disk", entry.path)):  # where the load starts from
                    (self.metrics.hit if held is not None else self.metrics.miss)(tier)
                    if held is not None:
                        break
                entry.loading = self._loader.submit(self._load, entry)
            return AdapterLease(self, entry, entry.loading)

    def unpin(self, entry: AdapterEntry) -> None:
        with self._lock:
            entry.pins = max(0, entry.pins - 1)
            if entry.pins == 0 and entry.deleted and self._entries.get(entry.name) is entry:
                self._drop(entry)
            else:
                for tier in ("device", "host"):
                    self._make_room(tier, 0, pinned_ok=False)
            self._publish()

    def demote(self, name: str) -> bool:
        """Drop an idle adapter's device and host copies (it stays on disk): the cold case, on purpose."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.pins or entry.path is None:
                return False
            entry.device = entry.host = entry.loading = None
            self._publish()
            return True

    def preload(self, name: str) -> Future[LoraWeights]:
        """Move `name` to the device now (a spec's `preload: true`); no pin is kept."""
        lease = self.acquire(name)
        fut = lease.future
        fut.add_done_callback(lambda _: lease.release())
        return fut

    # -- loading (the loader thread) ---------------------------------------------------------
    def _load(self, entry: AdapterEntry) -> LoraWeights:
        t0 = time.perf_counter()
        try:
            host = entry.host
            if host is None:
                path = entry.path if entry.path is not None else self._fetch(entry)
                tensors, metadata = read_safetensors(self._read(path))
                host = parse_lora(tensors, metadata, self.family, self.denoiser)
            device = host.to(self.device, self.dtype)
        except BaseException as exc:
            self.metrics.load("error", time.perf_counter() - t0)
            log.warning("adapter %s failed to load: %s", entry.name, exc)
            raise
        with self._lock:
            entry.host, entry.device = host, device
            self._make_room("device", 0, pinned_ok=False)
            self._make_room("host", 0, pinned_ok=False)
            self._publish()
        self.metrics.load("ok", time.perf_counter() - t0)
        return device

    def _fetch(self, entry: AdapterEntry) -> Path:
        """Read an evicted adapter's file again from its source (paths and hub files)."""
        from stepfleet.serving.adapters.sources import read_source

        data = read_source(entry.source, max_bytes=1 << 40)
        path = self.directory / f"{entry.name}-{entry.digest[:12]}.safetensors"
        path.write_bytes(data)
        with self._lock:
            entry.path = path
        return path

    # -- tiers (call with the lock held) --------------------------------------------------------
    def _tier_bytes(self, tier: str) -> int:
        total = 0
        for e in self._entries.values():
            if tier == "disk" and e.path is not None:
                total += e.file_bytes
            elif tier == "host" and e.host is not None:
                total += e.host.nbytes
            elif tier == "device" and e.device is not None:
                total += e.device.nbytes
        return total

    def _make_room(self, tier: str, incoming: int, pinned_ok: bool) -> None:
        """Evict least recently used, unpinned entries from `tier` until `incoming` more bytes fit."""
        bound = self.bounds[tier]
        victims = sorted((e for e in self._entries.values() if e.pins == 0 or pinned_ok), key=lambda e: e.last_used)
        for e in victims:
            if self._tier_bytes(tier) + incoming <= bound:
                return
            if tier == "device" and e.device is not None:
                e.device, e.loading = None, None
                self.metrics.evicted("device")
            elif tier == "host" and e.host is not None and (e.path is not None or e.refetchable):
                e.host = None
                self.metrics.evicted("host")
            elif tier == "disk" and e.path is not None and e.refetchable:
                with contextlib.suppress(OSError):
                    e.path.unlink()
                e.path = None
                self.metrics.evicted("disk")

    def _drop(self, entry: AdapterEntry) -> None:
        if entry.path is not None:
            with contextlib.suppress(OSError):
                entry.path.unlink()
        entry.path = entry.host = entry.device = None
        if self._entries.get(entry.name) is entry:
            del self._entries[entry.name]

    def _publish(self) -> None:
        for tier in ("device", "host", "disk"):
            self.metrics.tier_bytes(tier, self._tier_bytes(tier))
        self.metrics.adapters(sum(1 for e in self._entries.values() if not e.deleted))

