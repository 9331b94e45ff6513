"""A video job's life: submitted to the shared engine, watched for progress, encoded, stored.

The job is an engine request of kind `video` (`RequestKind.VIDEO`) with the job's id, so it
is planned, batched and preempted like any other (`serving.coschedule`). When its future
completes, the frames are encoded to MP4 and PNG on this service's own thread — never the
engine's loop, which would stall every request's next step — then stored and the job marked
completed; an engine error marks it failed with the error's message.
"""

from __future__ import annotations

import logging
import secrets
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from stepfleet.serving.contracts import RequestKind
from stepfleet.serving.engine import Engine, EngineRequest, EngineResult
from stepfleet.serving.planner import Phase
from stepfleet.serving.videos.content import ContentStore
from stepfleet.serving.videos.encode import encode_mp4, encode_png
from stepfleet.serving.videos.jobs import JobStatus, JobStore, VideoJob
from stepfleet.serving.videos.spec import VideoRequest

log = logging.getLogger(__name__)


def new_video_id() -> str:
    """OpenAI's form: `video_` + hex."""
    return f"video_{secrets.token_hex(12)}"


class VideoService:
    def __init__(self, directory: Path, max_jobs: int = 256, ttl_s: float = 3600.0,
                 content_bytes: int = 2 << 30) -> None:
        self.content = ContentStore(directory / "content", content_bytes)
        self.jobs = JobStore(max_jobs=max_jobs, ttl_s=ttl_s, directory=directory / "jobs",
                             on_remove=self.content.delete)
        self._running: dict[str, EngineRequest[Any]] = {}
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stepfleet-video-encode")

    def close(self) -> None:
        self._encoder.shutdown(wait=True, cancel_futures=False)

    def submit(self, engine: Engine, request: VideoRequest, tenant: str = "") -> VideoJob:
        """Create the job and queue it (raises `jobs.StoreFull` or the engine's `QueueFull`)."""
        job = VideoJob(id=new_video_id(), created_at=int(time.time()), model=request.model,
                       prompt=request.params.prompt, seconds=request.seconds, size=request.size,
                       num_frames=request.params.num_frames or 1, fps=request.fps, tenant=tenant,
                       steps_total=request.params.num_inference_steps)
        self.jobs.add(job)
        try:
            req = engine.submit(request.params, request_id=job.id, kind=RequestKind.VIDEO)
        except Exception:
            self.jobs.delete(job.id)
            raise
        self._running[job.id] = req
        req.future.add_done_callback(lambda fut: self._encoder.submit(self._done, job, fut))
        return job

    def refresh(self, job: VideoJob) -> VideoJob:
        """Progress from the engine's view of the request (steps done; running or paused = in progress)."""
        req = self._running.get(job.id)
        if req is not None and req.seq is not None and not job.status.finished:
            seq = req.seq
            started = seq.steps_done > 0 or seq.phase is not Phase.WAITING
            self.jobs.update(job, status=JobStatus.IN_PROGRESS if started else None, steps_done=seq.steps_done,
                             steps_total=seq.steps_total)
        return job

    def _done(self, job: VideoJob, fut: Future[EngineResult]) -> None:
        """Encode and store a finished job; any failure (the engine's, encoding's, the disk's) marks
        it failed with the reason, so no job stays `in_progress`."""
        self._running.pop(job.id, None)
        try:
            frames = list(fut.result().images)
            video, thumb = encode_mp4(frames, job.fps), encode_png(frames[0])
            if self.jobs.get(job.id, job.tenant) is None:  # deleted while it ran
                return
            for evicted in self.content.put(job.id, video, thumb):
                log.info("video content of %s evicted (content store over %d bytes)", evicted,
                         self.content.max_bytes)
        except Exception as exc:  # a failed job reports why; the worker goes on
            log.info("video job %s failed: %s: %s", job.id, type(exc).__name__, exc)
            self.jobs.finish(job, JobStatus.FAILED, error={"code": "generation_failed",
                                                           "message": f"{type(exc).__name__}: {exc}"})
            return
        self.jobs.finish(job, JobStatus.COMPLETED)

    def delete(self, engine: Engine | None, job_id: str, tenant: str = "") -> VideoJob | None:
        job = self.jobs.get(job_id, tenant)
        if job is None:
            return None
        if engine is not None and not job.status.finished:
            engine.cancel(job_id)
        return self.jobs.delete(job_id)
