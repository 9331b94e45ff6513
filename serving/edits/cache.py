"""TemplateCache: a template's recorded activations, per denoising step, bounded in memory and on disk.

What it holds: for each (template id, step) one *entry*, a flat dict of named tensors — every
attention block's contribution and its self-attention keys/values at that step (the names
are the masked UNet's business; the cache only counts bytes). An entry is the unit of
caching because an edit consumes exactly one per step, in step order: that makes "prefetch
the next step" a single, predictable read.

Why two tiers: a few hundred templates × tens of steps × megabytes per step outgrow host
memory, but templates are edited in bursts, so least-recently-used entries spill to a
directory of safetensors files and come back when needed. Both tiers are bounded in bytes;
an entry too large for memory goes straight to disk, one too large for disk is refused
(`put` returns False), and the cache never grows past its bounds. An entry evicted from
both tiers is gone: its template is then *incomplete* (`complete()` says so) and an edit of
it must fall back to full compute.

Threading: the step loop calls `get`/`put`; `prefetch` hands reads to one background
thread so that an edit's next step is in memory before the UNet asks for it. One lock
guards the indices; disk reads run outside it. Returned tensors are shared with the cache:
callers must treat them as read-only.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

Tensors = dict[str, torch.Tensor]
Key = tuple[str, int]  # (template id, step index)


def entry_bytes(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class CacheStats:
    """Plain counters, monotonic except where noted; the worker maps them onto Prometheus metrics."""

    hits: int = 0  # get() served from memory (a finished prefetch counts as a hit)
    misses: int = 0  # get() that had to read from disk, or found nothing
    disk_loads: int = 0  # entries read from disk (by get or prefetch)
    load_seconds: float = 0.0  # total time spent reading entries from disk
    prefetches: int = 0  # background reads issued
    spills: int = 0  # entries written to disk on eviction from memory
    evictions: int = 0  # entries dropped from both tiers (their template becomes incomplete)
    refused: int = 0  # put() of an entry that fits neither tier
    bytes_memory: int = 0  # gauge
    bytes_disk: int = 0  # gauge


class TemplateCache:
    """Per-(template, step) tensor entries; LRU in memory (`max_bytes`), spilling to disk (`disk_bytes`)."""

    def __init__(
        self,
        max_bytes: int,
        disk_bytes: int = 0,
        disk_dir: str | os.PathLike[str] | None = None,
        prefetch: bool = True,
    ) -> None:
        if max_bytes < 0 or disk_bytes < 0:
            raise ValueError("cache bounds must be >= 0 bytes")
        self.max_bytes = int(max_bytes)
        self.disk_bytes = int(disk_bytes)
        self._own_dir = disk_bytes > 0 and disk_dir is None
        self.disk_dir = (
            Path(tempfile.mkdtemp(prefix="stepfleet-templates-"))
            if self._own_dir
            else (Path(disk_dir) if disk_dir is not None else None)
        )
        if self.disk_dir is not None:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
        self._mem: OrderedDict[Key, Tensors] = OrderedDict()
        self._mem_size: dict[Key, int] = {}
        self._disk: OrderedDict[Key, tuple[Path, int]] = OrderedDict()
        self._incomplete: set[str] = set()
        self._inflight: dict[Key, Future] = {}
        self._lock = threading.RLock()
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="template-prefetch")
            if prefetch
            else None
        )
        self._closed = False
        self.stats = CacheStats()

    # -- gauges -------------------------------------------------------------------------
    @property
    def bytes_memory(self) -> int:
        return self.stats.bytes_memory

    @property
    def bytes_disk(self) -> int:
        return self.stats.bytes_disk

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return asdict(self.stats)

    # -- queries ------------------------------------------------------------------------
    def __contains__(self, key: Key) -> bool:
        with self._lock:
            return key in self._mem or key in self._disk

    def steps(self, template_id: str) -> set[int]:
        with self._lock:
            return {s for (t, s) in list(self._mem) + list(self._disk) if t == template_id}

    def templates(self) -> set[str]:
        with self._lock:
            return {t for (t, _) in list(self._mem) + list(self._disk)}

    def complete(self, template_id: str, num_steps: int) -> bool:
        """True when every step 0..num_steps-1 is cached and none was ever evicted."""
        with self._lock:
            return template_id not in self._incomplete and self.steps(template_id) >= set(
                range(num_steps)
            )

    # -- mutation -----------------------------------------------------------------------
    def put(self, template_id: str, step: int, tensors: Tensors) -> bool:
        """Store one entry (replacing any old one). False when it fits neither memory nor disk."""
        key = (template_id, int(step))
        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
        size = entry_bytes(tensors)
        with self._lock:
            self._check_open()
            self._remove(key)
            if size <= self.max_bytes:
                self._make_room(size, exclude=key)
                self._mem[key] = tensors
                self._mem_size[key] = size
                self.stats.bytes_memory += size
                return True
            if self._spill(key, tensors, size):
                return True
            self.stats.refused += 1
            self._incomplete.add(template_id)
            return False

    def drop(self, template_id: str) -> int:
        """Forget a template in both tiers; returns the number of entries removed."""
        with self._lock:
            keys = {k for k in list(self._mem) + list(self._disk) if k[0] == template_id}
            for key in keys:
                self._remove(key)
            self._incomplete.discard(template_id)
            return len(keys)

    def clear(self) -> None:
        with self._lock:
            for t in self.templates():
                self.drop(t)

    def close(self) -> None:
        """Stop the prefetch thread; delete the spill directory if the cache made it."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._closed = True
            if self._own_dir and self.disk_dir is not None:
                shutil.rmtree(self.disk_dir, ignore_errors=True)
                self._disk.clear()
                self.stats.bytes_disk = 0

    def __enter__(self) -> TemplateCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reads --------------------------------------------------------------------------
    def get(self, template_id: str, step: int) -> Tensors | None:
        """The entry, from memory (hit) or disk (miss, read now); None when not cached."""
        key = (template_id, int(step))
        with self._lock:
            entry = self._mem.get(key)
            if entry is not None:
                self._mem.move_to_end(key)
                self.stats.hits += 1
                return entry
            fut = self._inflight.get(key)
        if fut is not None:  # a prefetch is reading it right now: wait for that read
            try:
                entry = fut.result()
            except Exception:
                entry = None
            if entry is not None:
                with self._lock:
                    self.stats.hits += 1
                    if key in self._mem:
                        self._mem.move_to_end(key)
                return entry
        with self._lock:
            self.stats.misses += 1
        return self._load(key)

    def prefetch(self, template_id: str, step: int) -> Future | None:
        """Start reading an entry from disk on the background thread (no-op if in memory or absent)."""
        key = (template_id, int(step))
        if self._pool is None:
            return None
        with self._lock:
            if self._closed or key in self._mem or key not in self._disk:
                return None
            fut = self._inflight.get(key)
            if fut is None:
                fut = self._inflight[key] = self._pool.submit(self._load, key)
                self.stats.prefetches += 1
            return fut

    # -- internals (call with the lock held unless said otherwise) ----------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("template cache is closed")

    def _load(self, key: Key) -> Tensors | None:
        """Read an entry from disk (lock not held) and keep it in memory if it fits."""
        from safetensors.torch import load_file

        try:
            with self._lock:
                where = self._disk.get(key)
            if where is None:
                return None
            t0 = time.perf_counter()
            try:
                tensors = load_file(str(where[0]), device="cpu")
            except (FileNotFoundError, OSError):
                return None  # evicted from disk while we read
            dt = time.perf_counter() - t0
            size = entry_bytes(tensors)
            with self._lock:
                self.stats.disk_loads += 1
                self.stats.load_seconds += dt
                if (
                    key not in self._disk or self._closed
                ):  # dropped meanwhile: serve once, keep nothing
                    return tensors
                if key in self._mem:
                    return self._mem[key]
                if size <= self.max_bytes:
                    self._make_room(size, exclude=key)
                    self._mem[key] = tensors
                    self._mem_size[key] = size
                    self.stats.bytes_memory += size
                    self._disk.move_to_end(key)
            return tensors
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def _make_room(self, size: int, exclude: Key) -> None:
        while self._mem and self.stats.bytes_memory + size > self.max_bytes:
            old, tensors = next(iter(self._mem.items()))
            if old == exclude:  # pragma: no cover - exclude is never in memory here
                break
            old_size = self._mem_size.pop(old)
            del self._mem[old]
            self.stats.bytes_memory -= old_size
            if old in self._disk:  # a clean copy is already on disk
                continue
            if not self._spill(old, tensors, old_size):
                self.stats.evictions += 1
                self._incomplete.add(old[0])

    def _path(self, key: Key) -> Path:
        assert self.disk_dir is not None
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", key[0])[:64]
        digest = hashlib.sha1(key[0].encode()).hexdigest()[:10]
        return self.disk_dir / f"{safe}-{digest}-{key[1]:05d}.safetensors"

    def _spill(self, key: Key, tensors: Tensors, size: int) -> bool:
        """Write an entry to disk, evicting the oldest disk entries to stay under `disk_bytes`."""
        from safetensors.torch import save_file

        if self.disk_dir is None or size > self.disk_bytes:
            return False
        self._evict_disk(size)
        path = self._path(key)
        save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(path))
        real = path.stat().st_size
        self._disk[key] = (path, real)
        self.stats.bytes_disk += real
        self.stats.spills += 1
        self._evict_disk(0, keep=key)
        if key not in self._disk:  # the header pushed it over the bound
            return False
        return True

    def _evict_disk(self, size: int, keep: Key | None = None) -> None:
        for old in list(self._disk):
            if self.stats.bytes_disk + size <= self.disk_bytes:
                return
            if old == keep:
                continue
            self._unlink(old)
            if old not in self._mem:
                self.stats.evictions += 1
                self._incomplete.add(old[0])
        if keep is not None and self.stats.bytes_disk > self.disk_bytes:
            self._unlink(keep)

    def _unlink(self, key: Key) -> None:
        path, size = self._disk.pop(key)
        self.stats.bytes_disk -= size
        try:
            path.unlink()
        except FileNotFoundError:
            pass

    def _remove(self, key: Key) -> None:
        if key in self._mem:
            del self._mem[key]
            self.stats.bytes_memory -= self._mem_size.pop(key)
        if key in self._disk:
            self._unlink(key)
