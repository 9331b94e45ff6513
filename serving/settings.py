"""A worker's settings: one validated object, the contract between the operator and a worker.

`WorkerSettings` is what `stepfleet worker` parses and what the operator renders into a
pod's command (`to_argv`), so the two sides share one definition: the command-line flags are
built from the fields (`argument_parser`), a field's description is its `--help` text, and
`from_argv(s.to_argv()) == s` holds for every valid `s` (tested). A setting the worker
would not read cannot be written, because there is nowhere else to write it.

Flags follow the field names (`max_batch` → `--max-batch`). A boolean flag has both forms
(`--warmup`/`--no-warmup`); `to_argv` writes the one that differs from the default. A
field that is None renders as nothing (every such field defaults to None).
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Collection, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stepfleet.serving.backbones import FAMILIES
from stepfleet.serving.backends import BACKENDS
from stepfleet.serving.planner import DEFAULT_SLO_SCALE

#: `auto` (the checkpoint's own, from its `model_index.json`) or a family a backbone serves.
Family = Literal[("auto", *FAMILIES)]  # type: ignore[valid-type]


class InvalidSettings(ValueError):
    """Flags that do not make valid settings; the message names the flags."""


class _Parser(argparse.ArgumentParser):
    """Raises `InvalidSettings` instead of exiting, so callers (and tests) choose what to do."""

    def error(self, message: str) -> typing.NoReturn:
        raise InvalidSettings(message)


class WorkerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(default="tiny-sd", description="built-in name, local directory or hub id")
    served_model_name: str | None = Field(
        default=None, description="name clients send as `model` (default: --model, or its directory name)"
    )
    revision: str | None = Field(default=None, description="hub revision (branch, tag or commit)")
    family: Family = Field(
        default="auto",
        description="model family (auto: from the checkpoint's model_index.json); a mismatch fails readiness",
    )
    device: str = Field(default="auto", description=f"auto, {', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="weight dtype (auto: half precision on accelerators, float32 on a CPU)"
    )
    local_files_only: bool | None = Field(
        default=None, description="never contact a model hub (default: only when HF_HUB_OFFLINE=1 or a local model)"
    )
    pool: str = Field(default="local", description="pool name used as the `pool` metric label")
    host: str = Field(default="127.0.0.1", description="address to listen on (0.0.0.0 in a container)")
    port: int = Field(default=8001, ge=0, le=65535)
    max_batch: int = Field(default=4, ge=1, le=256, description="images per denoising step")
    max_queue: int = Field(default=64, ge=1, description="queued requests before answering 429")
    preemption: bool = Field(default=True, description="let urgent requests overtake at step boundaries")
    policy: str = Field(default="continuous", description="continuous or static batching")
    slo_scale: float = Field(
        default=DEFAULT_SLO_SCALE, gt=0,
        description="a request without deadline_ms is due after this many times its solo service time",
    )
    slo_image_s: float | None = Field(
        default=None, gt=0, description="deadline of an image request without deadline_ms, seconds (per-kind SLO)"
    )
    slo_video_s: float | None = Field(
        default=None, gt=0, description="deadline of a video job without deadline_ms, seconds (per-kind SLO)"
    )
    aux: Literal["auto", "inline", "thread"] = Field(
        default="auto",
        description="where prompt encoding and VAE decoding run (auto: between steps on the CPU); see serving.auxwork",
    )
    max_image_size: int = Field(default=1024, ge=64)
    max_images: int = Field(default=8, ge=1)
    max_steps: int = Field(default=200, ge=1, le=1000)
    default_steps: int = Field(default=20, ge=1)
    default_guidance_scale: float = 7.5
    warmup: bool = Field(
        default=True, description="run one short request before reporting ready, so the first client pays no warm-up"
    )
    compile: bool = Field(
        default=False, description="compile the denoiser per shape bucket during warm-up (torch.compile; "
        "CUDA graphs on CUDA); see serving/compiled and docs/accelerators.md",
    )
    compile_backend: Literal["auto", "inductor", "aot_eager", "cudagraphs", "openxla"] = Field(
        default="auto", description="torch.compile backend (auto: openxla on xla devices, inductor elsewhere)",
    )
    compile_mode: Literal["auto", "default", "reduce-overhead", "max-autotune-no-cudagraphs"] = Field(
        default="auto", description="inductor mode (auto: reduce-overhead, i.e. CUDA graphs, on CUDA; default elsewhere)",
    )
    bucket_rows: str = Field(
        default="", description="denoiser row buckets, e.g. '1,2,4,8' (empty: powers of two up to 2 x max_batch); "
        "a step's batch is padded to the next bucket",
    )
    bucket_sizes: str = Field(
        default="", description="image sizes compiled for, e.g. '512x512,768x768' (empty: the model's default "
        "size); other sizes are refused with 400 when compiling",
    )
    compile_cache: str | None = Field(
        default=None, description="directory for the persistent compile caches (inductor/Triton, XLA, Neuron); "
        "back it with a volume so new replicas start without compiling",
    )
    graceful_shutdown_s: float = Field(default=60.0, ge=0)
    template_cache_bytes: int = Field(
        default=2 * 1024**3, ge=0,
        description="host memory for template activations (edits); least recently used spill or go",
    )
    edit_halo: int | None = Field(
        default=None, ge=0, le=16,
        description="tokens recomputed around an edit's mask at every attention resolution (default: "
                    "1, or 4 on latents of 16 cells or fewer; see serving/edits/masks.py)",
    )
    edit_crop_margin: int = Field(
        default=4, ge=0, le=64,
        description="latent cells of context around an edit's mask when only its neighbourhood is decoded "
                    "(see serving/edits/crop_decode.py)",
    )
    edit_crop_max_fraction: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="decode only an edit's mask neighbourhood when its crop is at most this fraction of the "
                    "latent (0, the default: always decode in full; 0.5 is the measured choice when on). An "
                    "approximation inside the mask: 28-31 dB masked PSNR on the trained mini-sd VAE "
                    "(docs/benchmarks.md)",
    )
    edit_conv_halo: int | None = Field(
        default=None, ge=0, le=32,
        description="latent cells around an edit's mask box in which a UNet edit computes its "
                    "latent-resolution convolution blocks (default: none, they run on the whole latent; see "
                    "serving/edits/windowed_convs.py). An approximation outside the box; SDXL-style UNets only",
    )
    template_disk_bytes: int = Field(
        default=0, ge=0, description="disk (safetensors) for spilled template activations (0: no disk tier)"
    )
    template_dir: str | None = Field(
        default=None, description="spill directory (default: a temporary one, removed at exit)"
    )
    video_dir: str | None = Field(
        default=None, description="video jobs and their MP4s; kept across restarts (default: a temporary one)"
    )
    video_max_jobs: int = Field(default=256, ge=1, description="video jobs held at once; one more is a 429")
    video_ttl_s: float = Field(default=3600.0, gt=0, description="seconds a finished video job is kept")
    video_content_bytes: int = Field(
        default=2 * 1024**3, ge=1024**2, description="disk for finished videos; the oldest are evicted beyond it"
    )
    max_upload_bytes: int = Field(
        default=32 * 1024**2, ge=1024, description="largest accepted multipart upload (edits, templates); larger is 413"
    )
    adapter_device_bytes: int = Field(
        default=1024**3, ge=0, description="device memory for LoRA adapters in use or recently used (LRU; "
        "adapters of running requests stay)",
    )
    adapter_host_bytes: int = Field(
        default=4 * 1024**3, ge=0, description="host memory for parsed LoRA adapters (LRU)",
    )
    adapter_disk_bytes: int = Field(
        default=16 * 1024**3, ge=0, description="disk for adapter files (LRU over re-readable sources; uploads stay)",
    )
    adapter_dir: str | None = Field(
        default=None, description="adapter files directory (default: a temporary one, removed at exit)"
    )
    max_adapter_bytes: int = Field(
        default=512 * 1024**2, ge=1024, description="largest accepted adapter file (upload or source); larger is 413"
    )
    max_adapters_per_request: int = Field(
        default=4, ge=0, le=16, description="LoRA adapters one request may name (0: no adapters on this worker)"
    )
    adapters: str | None = Field(
        default=None, description="LoRA adapters to register at start: comma-separated [*]name=source (source "
        "hf://owner/repo[/file] or a local path; * preloads it onto the device before the worker is ready)",
    )
    lora_max_unloaded_steps: int = Field(
        default=2, ge=0, description="bounded loading: steps a request may run before its adapters are in "
        "(then it waits for them)",
    )
    max_json_bytes: int = Field(
        default=1024**2, ge=1024, description="largest accepted JSON body (generations); larger is 413"
    )
    remote_image_urls: bool = Field(
        default=False, description="fetch http(s) image_url references of JSON edits (only public addresses, "
        "no redirects, within --max-upload-bytes and --remote-image-timeout-s; see serving/image_refs.py)",
    )
    remote_image_timeout_s: float = Field(default=10.0, gt=0, le=300, description="time limit of one image fetch")
    remote_image_networks: str | None = Field(
        default=None, description="comma-separated networks fetched from although not public (e.g. an in-cluster "
        "image store's 10.1.0.0/16)",
    )
    controlnets: str | None = Field(
        default=None, description="ControlNets requests may name: comma-separated name=source[:kind] (source a "
        "built-in such as tiny-controlnet, a directory or a hub id; kind canny, depth, pose, scribble or other)",
    )
    controlnet_placement: Literal["inline", "overlap"] = Field(
        default="inline", description="where ControlNets run: inline on the step loop, or overlap (an executor "
        "beside it computes each request's next residuals ahead; see docs/controlnet.md)",
    )
    max_controlnets: int = Field(default=2, ge=1, le=8, description="ControlNets one request may name")
    worker_token_file: str | None = Field(
        default=None,
        description="file holding the token the router sends (Authorization: Bearer); requests without it are "
        "401 (default: $STEPFLEET_WORKER_TOKEN; neither set: no token is asked for)",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v != "auto" and v not in BACKENDS:
            raise ValueError(f"device must be auto or one of {', '.join(BACKENDS)}")
        return v

    @field_validator("remote_image_networks")
    @classmethod
    def _networks(cls, v: str | None) -> str | None:
        from stepfleet.serving.image_refs import parse_networks

        parse_networks(v)  # a ValueError naming the entry that is not a network
        return v

    @field_validator("controlnets")
    @classmethod
    def _controlnets(cls, v: str | None) -> str | None:
        from stepfleet.serving.controlnet.spec import parse_registry

        parse_registry(v)  # a ValueError naming the bad entry
        return v

    @field_validator("adapters")
    @classmethod
    def _adapters(cls, v: str | None) -> str | None:
        from stepfleet.serving.adapters.spec import parse_adapters

        parse_adapters(v)  # raises ValueError naming the bad entry
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

    # --- the command line ---------------------------------------------------------------------

    @classmethod
    def argument_parser(
        cls, prog: str = "stepfleet worker", parents: Sequence[argparse.ArgumentParser] = ()
    ) -> argparse.ArgumentParser:
        """`stepfleet worker`'s parser, one flag per field; errors raise `InvalidSettings`."""
        ap = _Parser(prog=prog, description="Serve a diffusion model over HTTP.", parents=list(parents),
                     allow_abbrev=False, argument_default=argparse.SUPPRESS)
        for name, field in cls.model_fields.items():
            kind, choices = _flag_type(name, field.annotation)
            kwargs: dict[str, Any] = {"dest": name, "help": field.description}
            if kind is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs.update(type=kind, metavar=name.upper())
                if choices:
                    kwargs.update(choices=choices, metavar=None)
            if field.default is not None and kwargs["help"] is not None:
                kwargs["help"] += f" (default: {_render(field.default)})"
            ap.add_argument(_flag(name), **kwargs)
        return ap

    @classmethod
    def from_argv(
        cls, argv: Sequence[str], *, prog: str = "stepfleet worker", parents: Sequence[argparse.ArgumentParser] = ()
    ) -> WorkerSettings:
        """Settings from `stepfleet worker` flags; raises `InvalidSettings` naming the flag.

        Flags of `parents` (CLI-only ones such as `--log-level`) are accepted and ignored.
        """
        args = vars(cls.argument_parser(prog, parents).parse_args(list(argv)))
        try:
            return cls(**{k: v for k, v in args.items() if k in cls.model_fields})
        except ValidationError as exc:
            problems = "; ".join(
                f"{_flag(str(e['loc'][0])) if e['loc'] else 'settings'}: {e['msg']}" for e in exc.errors()
            )
            raise InvalidSettings(problems) from exc

    def to_argv(self, always: Collection[str] = ("model",)) -> list[str]:
        """The flags that make these settings: `model` and the fields in `always` (unless None),
        then every other field that differs from its default, in field order."""
        unknown = set(always) - set(type(self).model_fields)
        if unknown:
            raise ValueError(f"not settings: {', '.join(sorted(unknown))}")
        argv: list[str] = []
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if value is None or (name not in always and value == field.default):
                continue
            if isinstance(value, bool):
                argv.append(_flag(name) if value else _flag(name, negative=True))
                continue
            text = _render(value)
            # `--flag=-x` keeps a value that starts with a dash from reading as a flag.
            argv += [f"{_flag(name)}={text}"] if text.startswith("-") else [_flag(name), text]
        return argv


def _flag(name: str, negative: bool = False) -> str:
    return ("--no-" if negative else "--") + name.replace("_", "-")


def _render(value: Any) -> str:
    # repr() of a float is the shortest text that reads back as the same float.
    return repr(value) if isinstance(value, float) else str(value)


def _flag_type(name: str, annotation: Any) -> tuple[type, tuple[str, ...] | None]:
    """(argparse type, choices) of a field: its annotation with `| None` taken off."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"setting {name}: no flag for {annotation}")
        annotation, args = rest[0], typing.get_args(rest[0])
    if typing.get_origin(annotation) is Literal:
        if not all(isinstance(a, str) for a in args):
            raise TypeError(f"setting {name}: only string literals become choices")
        return str, tuple(args)
    if annotation in (bool, int, float, str):
        return annotation, None
    raise TypeError(f"setting {name}: no flag for {annotation}")
