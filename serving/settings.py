"""A worker's settings: one validated object, built from CLI flags or by tests."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from stepfleet.serving.backends import BACKENDS


class WorkerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "tiny-sd"
    #: Name clients use in `model`; defaults to `model` (or its directory name).
    served_model_name: str | None = None
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    local_files_only: bool | None = None
    pool: str = "local"
    host: str = "127.0.0.1"
    port: int = Field(default=8001, ge=0, le=65535)
    max_batch: int = Field(default=4, ge=1, le=256)
    max_queue: int = Field(default=64, ge=1)
    preemption: bool = True
    policy: str = "continuous"
    slo_scale: float = Field(default=4.0, gt=0)
    #: Where prompt encoding and VAE decoding run; see `serving.auxwork`.
    aux: Literal["auto", "inline", "thread"] = "auto"
    max_image_size: int = Field(default=1024, ge=64)
    max_images: int = Field(default=8, ge=1)
    max_steps: int = Field(default=200, ge=1, le=1000)
    default_steps: int = Field(default=20, ge=1)
    default_guidance_scale: float = 7.5
    #: Run one short request before reporting ready, so the first client pays no warm-up.
    warmup: bool = True
    graceful_shutdown_s: float = Field(default=60.0, ge=0)
    template_cache_bytes: int = Field(default=2 * 1024**3, ge=0)
    #: Template activations spill here (safetensors) when memory is full; 0 disables the disk tier.
    template_disk_bytes: int = Field(default=0, ge=0)
    #: Spill directory; None: a temporary directory, removed at shutdown.
    template_dir: str | None = None
    #: Largest accepted multipart upload (edits, templates); larger is 413.
    max_upload_bytes: int = Field(default=32 * 1024**2, ge=1024)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v != "auto" and v not in BACKENDS:
            raise ValueError(f"device must be auto or one of {', '.join(BACKENDS)}")
        return v

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        if v not in ("continuous", "static"):
            raise ValueError("policy must be continuous or static")
        return v

    def public_model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return self.model.rstrip("/").split("/")[-1]
