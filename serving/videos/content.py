"""Finished videos on disk, up to a byte bound: `{id}.mp4` and `{id}.png` (the thumbnail).

MP4s are large next to job records, so they live on disk, not in memory, and the store keeps
at most `max_bytes`: storing one more evicts the oldest first (their jobs then answer their
content as gone). Files found at start-up (a restarted worker) are kept in their age order.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

VARIANTS = {"video": ("mp4", "video/mp4"), "thumbnail": ("png", "image/png")}


class ContentStore:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        found: dict[str, tuple[float, int]] = {}
        for path in directory.iterdir():
            if path.suffix in (".mp4", ".png"):
                when, size = found.get(path.stem, (0.0, 0))
                found[path.stem] = (max(when, path.stat().st_mtime), size + path.stat().st_size)
        for job_id, (_, size) in sorted(found.items(), key=lambda kv: kv[1][0]):
            self._sizes[job_id] = size

    @property
    def bytes(self) -> int:
        return sum(self._sizes.values())

    def put(self, job_id: str, video: bytes, thumbnail: bytes) -> list[str]:
        """Store a job's content; the ids whose content was evicted to stay under the bound."""
        for data, ext in ((video, VARIANTS["video"][0]), (thumbnail, VARIANTS["thumbnail"][0])):
            tmp = self.directory / f".{job_id}.{ext}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, self.directory / f"{job_id}.{ext}")
        evicted: list[str] = []
        with self._lock:
            self._sizes[job_id] = len(video) + len(thumbnail)
            while self.bytes > self.max_bytes and len(self._sizes) > 1:
                old = next(iter(self._sizes))
                if old == job_id:
                    break
                evicted.append(old)
                self._drop(old)
        return evicted

    def path(self, job_id: str, variant: str) -> Path | None:
        ext = VARIANTS[variant][0]
        with self._lock:
            if job_id not in self._sizes:
                return None
        path = self.directory / f"{job_id}.{ext}"
        return path if path.is_file() else None

    def _drop(self, job_id: str) -> None:
        self._sizes.pop(job_id, None)
        for ext, _ in VARIANTS.values():
            (self.directory / f"{job_id}.{ext}").unlink(missing_ok=True)

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._drop(job_id)
