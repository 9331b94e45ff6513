"""The video job store: bounded, with expiry, and honest about restarts.

A job is small (its fields; the content lives in `content.ContentStore`), but a worker must
not hold unbounded numbers: at most `max_jobs` jobs exist at once (queued, running or
finished and not yet expired); one more is refused with `StoreFull` and a retry estimate
(the earliest expiry), which the route answers as 429 with `Retry-After`. A finished job
expires `ttl_s` after it finished (`expires_at`), then it and its content are gone.

Each job is also written to `directory` as JSON on every change. A worker that restarts
reads them back: jobs that were queued or in progress cannot resume (their latents lived in
the old process), so they are marked `failed` with the reason — no job stays `in_progress`
forever. Pure bookkeeping apart from that file I/O; the clock is injected.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: The reason a restart gives the jobs it interrupted.
RESTARTED = "the worker restarted before this job finished; submit it again"


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED)


@dataclass
class VideoJob:
    """One job as the Videos API shows it, plus what the worker needs to serve it."""

    id: str
    created_at: int
    model: str
    prompt: str
    seconds: str
    size: str
    num_frames: int
    fps: int
    tenant: str = ""
    status: JobStatus = JobStatus.QUEUED
    progress: int = 0
    completed_at: int | None = None
    expires_at: int | None = None
    error: dict[str, str] | None = None
    #: Set while the job runs: steps done / steps total (progress is derived from them).
    steps_done: int = 0
    steps_total: int = 0

    def public(self) -> dict[str, Any]:
        """The `Video` object (openai `types/video.py`), plus our `num_frames` and `fps`."""
        return {
            "id": self.id, "object": "video", "created_at": self.created_at, "completed_at": self.completed_at,
            "expires_at": self.expires_at, "model": self.model, "progress": self.progress, "prompt": self.prompt,
            "seconds": self.seconds, "size": self.size, "status": self.status.value, "error": self.error,
            "remixed_from_video_id": None, "num_frames": self.num_frames, "fps": self.fps,
        }

    def to_json(self) -> str:
        data = asdict(self)
        data["status"] = self.status.value
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> VideoJob:
        data = json.loads(text)
        data["status"] = JobStatus(data["status"])
        return cls(**data)


class StoreFull(Exception):
    """No room for another job; `retry_after_s` is when one likely expires."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"the video job store is full; retry after {retry_after_s:.0f}s")
        self.retry_after_s = retry_after_s


@dataclass
class JobStore:
    """Jobs by id (insertion order = creation order), thread-safe."""

    max_jobs: int = 256
    ttl_s: float = 3600.0
    directory: Path | None = None
    clock: Callable[[], float] = time.time
    #: Called with a job's id when it expires or is deleted (the content store forgets it).
    on_remove: Callable[[str], None] = lambda _id: None
    _jobs: dict[str, VideoJob] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._load()

    def _load(self) -> None:
        assert self.directory is not None
        found = []
        for path in self.directory.glob("*.json"):
            try:
                found.append(VideoJob.from_json(path.read_text()))
            except (OSError, ValueError, TypeError, KeyError):
                log.warning("unreadable video job record %s; removed", path)
                path.unlink(missing_ok=True)
        for job in sorted(found, key=lambda j: (j.created_at, j.id)):
            self._jobs[job.id] = job
            if not job.status.finished:
                self.finish(job, JobStatus.FAILED, error={"code": "worker_restarted", "message": RESTARTED})
        self.expire()

    def _save(self, job: VideoJob) -> None:
        if self.directory is None:
            return
        tmp = self.directory / f".{job.id}.tmp"
        tmp.write_text(job.to_json())
        os.replace(tmp, self.directory / f"{job.id}.json")

    def expire(self) -> list[str]:
        """Drop jobs past their `expires_at`; their ids."""
        now = self.clock()
        with self._lock:
            gone = [j.id for j in self._jobs.values() if j.expires_at is not None and j.expires_at <= now]
        for job_id in gone:
            self.delete(job_id)
        return gone

    def add(self, job: VideoJob) -> None:
        """Keep `job`; raises `StoreFull` when `max_jobs` exist."""
        self.expire()
        with self._lock:
            if len(self._jobs) >= self.max_jobs:
                expiring = [j.expires_at for j in self._jobs.values() if j.expires_at is not None]
                wait = min(expiring) - self.clock() if expiring else 30.0
                raise StoreFull(max(1.0, wait))
            self._jobs[job.id] = job
            self._save(job)

    def get(self, job_id: str, tenant: str = "") -> VideoJob | None:
        self.expire()
        with self._lock:
            job = self._jobs.get(job_id)
        return job if job is not None and job.tenant == tenant else None

    def list(self, tenant: str = "", after: str | None = None, limit: int = 20, order: str = "desc") -> tuple[
            list[VideoJob], bool]:
        """A page of the tenant's jobs (newest first unless `order="asc"`) and whether more follow."""
        self.expire()
        with self._lock:
            jobs = [j for j in self._jobs.values() if j.tenant == tenant]
        if order == "desc":
            jobs.reverse()
        if after is not None:
            ids = [j.id for j in jobs]
            jobs = jobs[ids.index(after) + 1:] if after in ids else []
        return jobs[:limit], len(jobs) > limit

    def update(self, job: VideoJob, *, status: JobStatus | None = None, steps_done: int | None = None,
               steps_total: int | None = None) -> None:
        """Record progress of a running job (saved when its status changes)."""
        with self._lock:
            changed = status is not None and status != job.status
            if status is not None:
                job.status = status
            if steps_total is not None:
                job.steps_total = steps_total
            if steps_done is not None:
                job.steps_done = steps_done
            if job.steps_total:
                job.progress = min(99, int(100 * job.steps_done / job.steps_total))
            if changed and job.id in self._jobs:
                self._save(job)

    def finish(self, job: VideoJob, status: JobStatus, error: dict[str, str] | None = None) -> None:
        """Completed or failed: stamps `completed_at` and `expires_at`."""
        now = int(self.clock())
        with self._lock:
            job.status = status
            job.completed_at = now
            job.expires_at = int(now + self.ttl_s)
            job.error = error
            if status is JobStatus.COMPLETED:
                job.progress = 100
            if job.id in self._jobs:
                self._save(job)

    def delete(self, job_id: str) -> VideoJob | None:
        with self._lock:
            job = self._jobs.pop(job_id, None)
        if job is not None:
            if self.directory is not None:
                (self.directory / f"{job_id}.json").unlink(missing_ok=True)
            self.on_remove(job_id)
        return job

    def __len__(self) -> int:
        return len(self._jobs)
