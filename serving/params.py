"""What a client may ask of the engine, and the limits that keep a worker safe.

Pure data and validation (no torch, no HTTP): the worker app turns a JSON body into
`GenerationParams` and the engine trusts them. Every rejection names the field, so the HTTP
layer can answer 400 with OpenAI's `param`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

SCHEDULERS: tuple[str, ...] = ("ddim", "euler", "euler_a", "dpmpp_2m", "lcm",
                             "flow_euler", "flow_heun")  # the last two: SD3/Flux only (`schedulers`)
OUTPUT_FORMATS: tuple[str, ...] = ("png", "jpeg", "webp")
#: OpenAI's `partial_images`: at most this many previews per streamed request.
MAX_PARTIAL_IMAGES = 3
#: OpenAI's `quality` → denoising steps, as a multiple of the worker's `--default-steps` (each
#: model's own budget, set per pool); an explicit `num_inference_steps` wins. `auto` and
#: DALL·E's `standard` are `medium`; its `hd`, and `xhigh`/`max`, are `high`.
QUALITY_STEP_FACTORS: dict[str, float] = {"low": 0.5, "medium": 1.0, "high": 2.0}
QUALITY_ALIASES: dict[str, str] = {"auto": "medium", "standard": "medium", "hd": "high", "xhigh": "high",
                                   "max": "high"}
#: LCM's schedule is distilled from 50 original steps; it cannot sample more than that.
LCM_MAX_STEPS = 50


class Priority(enum.IntEnum):
    """Priority classes: a higher class is always served before a lower one."""

    LOW = 0
    NORMAL = 1
    HIGH = 2

    @classmethod
    def parse(cls, value: str | int | None) -> Priority:
        if value is None:
            return cls.NORMAL
        if isinstance(value, bool):
            raise InvalidParam("priority", "must be one of 'low', 'normal', 'high'")
        if isinstance(value, int):
            if value in (0, 1, 2):
                return cls(value)
        elif isinstance(value, str) and value.upper() in cls.__members__:
            return cls[value.upper()]
        raise InvalidParam("priority", f"must be one of 'low', 'normal', 'high' (got {value!r})")


class InvalidParam(ValueError):
    """A request field has a value the worker cannot serve; `param` names the field."""

    def __init__(self, param: str, message: str, code: str = "invalid_value") -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message
        self.code = code


@dataclass(frozen=True)
class Limits:
    """A worker's guard rails; the defaults suit SD-1.x-class models."""

    max_image_size: int = 1024
    min_image_size: int = 64
    max_steps: int = 200
    max_images: int = 8
    max_prompt_chars: int = 4000


@dataclass(frozen=True)
class GenerationParams:
    """One validated text-to-image request (all `n` images share prompt, settings and seed)."""

    prompt: str
    width: int
    height: int
    n: int = 1
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    negative_prompt: str | None = None
    scheduler: str | None = None  # None: the model's own default scheduler
    seed: int | None = None
    priority: Priority = Priority.NORMAL
    deadline_ms: float | None = None  # relative to arrival; None: the engine derives one
    output_format: str = "png"
    #: SDXL micro-conditioning (families without it ignore these), in diffusers' (height, width)
    #: order: the size the image is "taken from" and the target size (None: the request's
    #: size), and a crop's top-left corner (top, left).
    original_size: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    #: Set for image edits and template registrations; None for plain text-to-image.
    edit: EditSpec | None = None
    #: Set for streamed requests (`stream: true`): where partial images go.
    stream: StreamSpec | None = None
    #: ControlNets applied to this request (`controlnet: [...]`, `serving.controlnet`); their
    #: residuals sum, as diffusers' MultiControlNet sums them.
    controlnet: tuple[ControlSpec, ...] = ()
    #: LoRA adapters to apply (`lora: [{name, scale}]`); None: the base model alone.
    lora: LoraSpec | None = None
    #: Frames of a video (video families only, `serving.videos`); None: an image (one frame).
    num_frames: int | None = None


@dataclass(frozen=True, eq=False)
class EditSpec:
    """What makes a request an edit (or a template registration), beside its generation settings.

    Plain data: the HTTP layer decodes and checks uploads (so a bad mask is a 400 naming
    `mask`), the runner turns them into tensors. `record` registers `template_id`: the
    template's image is run once in full while its activations are stored. An edit names
    a registered `template_id` or brings its own `image`; `pixel_mask` is an (H, W) bool
    tensor, True where the image may change. `use_cache=False` forces full compute.
    """

    record: bool = False
    template_id: str | None = None
    image: object = None  # PIL image of the request's size (record, or an edit without a template)
    pixel_mask: object = None  # (H, W) bool tensor (edits only)
    strength: float = 1.0
    use_cache: bool = True


@dataclass(frozen=True, eq=False)
class ControlSpec:
    """One ControlNet on one request: the registered net `name`, its control `image` (a PIL RGB
    image of the request's size, decoded, preprocessed and resized by the HTTP layer), the residuals'
    `conditioning_scale`, and the guidance window as fractions of the request's steps (diffusers'
    `control_guidance_start`/`_end`: step i of N is controlled iff start <= i/N and (i+1)/N <= end)."""

    name: str
    image: object
    conditioning_scale: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0


@dataclass(frozen=True, eq=False)
class StreamSpec:
    """A streamed request's previews: `partial_images` (0-3) at evenly spaced steps, each handed to
    `sink(index, images)` on the engine's loop thread (`images`: uint8 (n, H, W, 3)); the sink
    must return at once (the HTTP layer hands it to its event loop)."""

    partial_images: int
    sink: Callable[[int, object], None]


#: `lora_wait`: `bounded` starts denoising at once and takes an adapter that is still loading
#: when it lands (at the latest before step K); `full` waits for every adapter first.
LORA_WAITS: tuple[str, ...] = ("bounded", "full")


@dataclass(frozen=True)
class LoraRef:
    """One adapter a request names, and the factor its low-rank delta is scaled by."""

    name: str
    scale: float = 1.0


@dataclass(eq=False)
class LoraReport:
    """What the adapters extension tells the response: steps that ran before an adapter landed."""

    steps_without: int = 0
    waited_s: float = 0.0


@dataclass(frozen=True, eq=False)
class LoraSpec:
    """A request's adapters (composed by summing their deltas) and how it waits for their loading.

    Plain data, checked by the HTTP layer against the registry (unknown name: 404); `report`
    is filled on the engine's loop thread while the request runs.
    """

    adapters: tuple[LoraRef, ...]
    wait: str = "bounded"
    report: LoraReport = field(default_factory=LoraReport)


def resolve_quality(quality: str | None, default_steps: int, max_steps: int) -> tuple[str, int]:
    """(`quality` as run, its step budget): `low` half the default steps, `high` twice (at most
    `max_steps`), `medium`/`auto`/omitted the default."""
    q = QUALITY_ALIASES.get(quality or "auto", quality or "auto")
    if q not in QUALITY_STEP_FACTORS:
        raise InvalidParam("quality", f"must be one of low, medium, high, auto (got {quality!r})")
    return q, max(1, min(max_steps, round(default_steps * QUALITY_STEP_FACTORS[q])))


def check_background(background: str | None) -> str:
    """`opaque` and `auto` are what every served model draws; `transparent` needs an alpha channel
    no Stable Diffusion VAE has."""
    if background == "transparent":
        raise InvalidParam("background", "transparent backgrounds need a model that draws an alpha channel; "
                           "this model draws opaque images (send 'opaque' or 'auto')", code="unsupported_value")
    return "opaque"


def parse_size(size: str | None, default: tuple[int, int], limits: Limits) -> tuple[int, int]:
    """OpenAI's `size` ("WxH" or "auto") → (width, height), checked against the model's limits."""
    if size is None or size == "auto":
        return default
    if not isinstance(size, str) or "x" not in size:
        raise InvalidParam("size", f"must look like '256x256' or be 'auto' (got {size!r})")
    w_s, _, h_s = size.partition("x")
    try:
        width, height = int(w_s), int(h_s)
    except ValueError:
        raise InvalidParam("size", f"must look like '256x256' or be 'auto' (got {size!r})") from None
    for dim in (width, height):
        if dim % 8:
            raise InvalidParam("size", f"width and height must be multiples of 8 (got {size})")
        if dim < limits.min_image_size or dim > limits.max_image_size:
            raise InvalidParam(
                "size",
                f"width and height must be between {limits.min_image_size} and "
                f"{limits.max_image_size} for this model (got {size})",
            )
    return width, height


def validate(params: GenerationParams, limits: Limits) -> GenerationParams:
    """Check ranges the schema cannot express; raise InvalidParam naming the field."""
    if (not params.prompt or not params.prompt.strip()) and (params.edit is None or params.edit.image is None):
        raise InvalidParam("prompt", "must be a non-empty string")  # variations of an image need none
    if len(params.prompt) > limits.max_prompt_chars:
        raise InvalidParam("prompt", f"must be at most {limits.max_prompt_chars} characters")
    if not 1 <= params.n <= limits.max_images:
        raise InvalidParam("n", f"must be between 1 and {limits.max_images} (got {params.n})")
    if not 1 <= params.num_inference_steps <= limits.max_steps:
        raise InvalidParam(
            "num_inference_steps",
            f"must be between 1 and {limits.max_steps} (got {params.num_inference_steps})",
        )
    if params.scheduler is not None and params.scheduler not in SCHEDULERS:
        raise InvalidParam(
            "scheduler", f"unknown scheduler {params.scheduler!r}; choose one of {', '.join(SCHEDULERS)}"
        )
    if params.scheduler == "lcm" and params.num_inference_steps > LCM_MAX_STEPS:
        raise InvalidParam("num_inference_steps", f"the lcm scheduler supports at most {LCM_MAX_STEPS} steps")
    if not 0.0 <= params.guidance_scale <= 50.0:
        raise InvalidParam("guidance_scale", f"must be between 0 and 50 (got {params.guidance_scale})")
    if params.seed is not None and not 0 <= params.seed < 2**63:
        raise InvalidParam("seed", "must be a non-negative 64-bit integer")
    if params.deadline_ms is not None and params.deadline_ms <= 0:
        raise InvalidParam("deadline_ms", "must be positive")
    if params.edit is not None and not 0.0 < params.edit.strength <= 1.0:
        raise InvalidParam("strength", f"must be in (0, 1] (got {params.edit.strength})")
    if params.stream is not None and not 0 <= params.stream.partial_images <= MAX_PARTIAL_IMAGES:
        raise InvalidParam("partial_images", f"must be between 0 and {MAX_PARTIAL_IMAGES} "
                           f"(got {params.stream.partial_images})")
    if params.output_format not in OUTPUT_FORMATS:
        raise InvalidParam("output_format", f"must be one of {', '.join(OUTPUT_FORMATS)}")
    return params
