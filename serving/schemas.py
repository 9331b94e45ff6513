"""Request and response bodies of the public Images API (OpenAI's fields plus stepfleet's).

One definition serves three purposes: the worker validates bodies with these models, the
router checks generation bodies with the same model before forwarding, and both document
them in `/openapi.json`. Unknown fields are rejected, as OpenAI does, so a typo
(`num_inference_step`) is an error that names the field instead of a silently ignored
setting.

Bounds here are the ones no worker can exceed (`MAX_IMAGES`, `MAX_STEPS` are the ceilings of
`WorkerSettings.max_batch` and `max_steps`): the router checks bodies against them without
knowing which worker will serve. Each worker holds tighter limits of its own (`--max-images`,
`--max-steps`, `--max-image-size`), checked by `params.validate` and written into that
worker's `/openapi.json` (`serving.http.openapi`).

Multipart bodies (edits, templates) are form models: FastAPI reads them with
`Annotated[Model, Form()]`, file fields as `UploadFile`.

What a model cannot take is refused here, naming the field, so no client mistake reaches a
tokenizer or the engine (where it was a 500 that the router retried on every worker, issue
19): text that is not valid Unicode (a lone surrogate, which JSON's `\\ud800` escape makes)
or longer than a bound, numbers that are not finite, and sizes in any spelling but ASCII
`WxH`. JSON bodies are strict, as their types say: `n: true` or `n: "2"` is an error, not 1
or 2 (a form sends every value as text, so form models convert text to numbers).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from fastapi import UploadFile
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)

from stepfleet.serving.controlnet.schema import ControlNetList
from stepfleet.serving.params import MAX_PARTIAL_IMAGES, OUTPUT_FORMATS, SCHEDULERS

#: The most images one request may ask for on any worker: `n` takes `n` slots of a step's
#: batch, and `WorkerSettings.max_batch` is at most 256 (tested).
MAX_IMAGES = 256
#: The most denoising steps any worker allows (`WorkerSettings.max_steps` is at most 1000).
MAX_STEPS = 1000
#: Sides in micro-conditioning sizes and crop offsets: far above any trained resolution,
#: low enough that no number overflows a half-precision time id.
MAX_CONDITIONING_SIDE = 16384

Scheduler = Literal[SCHEDULERS]  # type: ignore[valid-type]
OutputFormat = Literal[OUTPUT_FORMATS]  # type: ignore[valid-type]

#: Longest prompt (and negative prompt) in characters; what `params.Limits` allows too.
MAX_PROMPT_CHARS = 4000
#: Longest short text field (`model`, `user`, a template id, the ignored OpenAI settings).
MAX_NAME_CHARS = 256
#: Latest deadline a request may ask for: a day (a later one only overflows clocks).
MAX_DEADLINE_MS = 86_400_000

# ASCII digits only (`\d` also matches other scripts' digits, which int() reads), and the
# whole string: the JSON Schema patterns use `^...$`; the checks use `fullmatch`, so a
# trailing newline (which Python's `$` lets through) is refused too.
_SIZE = r"^(auto|[0-9]{1,5}x[0-9]{1,5})$"
_WXH = r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$"
_PAIR = re.compile(r"[ ]*([0-9]{1,5})[ ]*,[ ]*([0-9]{1,5})[ ]*")


def _unicode_text(value: str) -> str:
    """Refuse text that is not valid Unicode: lone surrogates cannot be encoded, so a tokenizer
    (or any UTF-8 output) fails on them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"must be valid Unicode text (a lone surrogate at position {exc.start})") from None
    return value


def _text(max_chars: int) -> Any:
    """A string of at most `max_chars` characters of valid Unicode."""
    return Annotated[str, StringConstraints(max_length=max_chars), AfterValidator(_unicode_text)]


#: What to draw (or not): a prompt.
Prompt = _text(MAX_PROMPT_CHARS)
#: Any short text field.
Name = _text(MAX_NAME_CHARS)


def _matching(pattern: str, form: str) -> AfterValidator:
    """Check `pattern` with a message a person reads (pydantic's would quote the regex)."""
    regex = re.compile(pattern.removeprefix("^").removesuffix("$"))

    def check(value: str) -> str:
        if not regex.fullmatch(value):
            raise ValueError(f"must look like {form} (got {value!r})")
        return value

    return AfterValidator(check)


#: OpenAI's `size`: "WxH" or "auto" (the worker checks sides against its limits).
Size = Annotated[str, _matching(_SIZE, "'1024x768' (width x height) or be 'auto'"),
                 WithJsonSchema({"type": "string", "pattern": _SIZE})]


def _sides_in_range(value: str) -> str:
    if any(int(side) > MAX_CONDITIONING_SIDE for side in value.split("x")):
        raise ValueError(f"width and height must be at most {MAX_CONDITIONING_SIDE} (got {value!r})")
    return value


#: A micro-conditioning size, "WxH" (positive sides).
WxH = Annotated[str, _matching(_WXH, "'1024x768' (width x height)"), AfterValidator(_sides_in_range),
                WithJsonSchema({"type": "string", "pattern": _WXH})]


def _top_left(value: Any) -> Any:
    """`"top,left"` or `[top, left]` → (top, left); anything else is a ValueError naming the forms."""
    if value is None:
        return None
    if isinstance(value, str) and (m := _PAIR.fullmatch(value)):
        pair = (int(m.group(1)), int(m.group(2)))
    elif (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        pair = (value[0], value[1])
    else:
        raise ValueError("must be 'top,left' or [top, left] (non-negative integers)")
    if not all(0 <= v <= MAX_CONDITIONING_SIDE for v in pair):
        raise ValueError(f"top and left must be between 0 and {MAX_CONDITIONING_SIDE}")
    return pair


#: A crop's top-left corner for SDXL micro-conditioning, as text or a pair.
TopLeft = Annotated[
    tuple[int, int] | None,
    BeforeValidator(_top_left),
    WithJsonSchema({
        "anyOf": [
            {"type": "string", "pattern": r"^[0-9]{1,5},[0-9]{1,5}$", "examples": ["0,0"]},
            {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": MAX_CONDITIONING_SIDE}] * 2,
             "minItems": 2, "maxItems": 2},
            {"type": "null"},
        ],
    }),
]

# Fields shared by generations, edits and template registrations (one description each).
_N = Field(1, ge=1, le=MAX_IMAGES, description="images to make (a worker allows up to its --max-images, "
                                                "at most its --max-batch; default 8 and 4)")
_STEPS = Field(None, ge=1, le=MAX_STEPS, description="denoising steps (a worker allows up to its --max-steps, "
                                                     "default 200; omitted: its --default-steps)")
_GUIDANCE = Field(None, ge=0, le=50, description="classifier-free guidance scale; <= 1 turns guidance off "
                                                 "(omitted: the worker's default, 7.5)")
_SEED = Field(None, ge=0, lt=2**63, description="random seed; the same seed and settings give the same image")
_SCHEDULER = Field(None, description="sampler (omitted: the model's own)")
_NEGATIVE = Field(None, description="what the image should not show")
_DEADLINE = Field(None, gt=0, le=MAX_DEADLINE_MS, description=(
    "milliseconds after arrival the result is due: orders waiting work on the worker, and the router "
    "gives up (504) when it passes"))
_PRIORITY = Field(None, description="'low', 'normal' (default) or 'high' (also 0, 1, 2)")
_COMPRESSION = Field(None, ge=0, le=100, description="JPEG/WebP quality, 0-100 (default 90)")
_RESPONSE_FORMAT = Field("b64_json", description="images are returned inline, base64-encoded")
_OUTPUT_FORMAT = Field("png", description="image file format")
_STRENGTH = Field(None, gt=0, le=1, description="how far from the template the edit may go, in (0, 1]")
_IGNORED = "accepted for compatibility with OpenAI clients; does not change a diffusion model's output"
#: Most input images an edit takes (OpenAI's limit).
MAX_EDIT_IMAGES = 16
Quality = Literal["low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"]
Background = Literal["transparent", "opaque", "auto"]


#: Most adapters one request may name on any worker (a worker's --max-adapters-per-request is lower).
MAX_LORA_PER_REQUEST = 16
_ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class LoraItem(BaseModel):
    """One adapter a request applies (`lora: [{"name": ..., "scale": ...}]`; several add up)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: Annotated[str, _matching(_ADAPTER_NAME, "an adapter name (letters, digits, '.', '_', '-')"),
                    WithJsonSchema({"type": "string", "pattern": _ADAPTER_NAME})] = Field(
        description="a registered adapter (POST /v1/adapters)")
    scale: float = Field(1.0, ge=-10, le=10, description="multiplies the adapter's delta (default 1)")


def _lora_text(value: Any) -> Any:
    """A JSON body sends `lora` as a list; a form as JSON text (FastAPI hands a list field its
    repeated form values: each a JSON list or object)."""
    import json

    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        return value
    items: list[Any] = []
    for text in texts:
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError('must be a JSON list like [{"name": "style", "scale": 0.8}]') from None
        items += parsed if isinstance(parsed, list) else [parsed]
    return items


LoraList = Annotated[Annotated[list[LoraItem], Field(max_length=MAX_LORA_PER_REQUEST)] | None,
                     BeforeValidator(_lora_text), Field(None, description=(
                         "LoRA adapters to apply, each {name, scale}; several compose by sum (a worker allows up "
                         "to its --max-adapters-per-request, default 4). In forms: the list as JSON text."))]


class ImageRequestFields(BaseModel):
    """Fields generations and edits share: OpenAI's, then stepfleet's extensions."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: Name | None = Field(None, description="must name the served model when given")
    n: int = _N
    response_format: Literal["b64_json"] | None = _RESPONSE_FORMAT
    output_format: OutputFormat | None = _OUTPUT_FORMAT
    output_compression: int | None = _COMPRESSION
    quality: Quality | None = Field(None, description=(
        "step budget: low = half the worker's --default-steps, medium/auto/standard = them, high/hd = twice "
        "(num_inference_steps, when given, wins)"))
    background: Background | None = Field(None, description=(
        "opaque or auto; transparent is refused (no served model draws an alpha channel)"))
    user: Name | None = Field(None, description="accepted; not recorded")
    safety_identifier: Name | None = Field(None, description="accepted; not recorded")
    stream: bool | None = Field(None, description=(
        "true: answer with Server-Sent Events (partial images, then the completed image); n must be 1"))
    partial_images: int | None = Field(None, ge=0, le=MAX_PARTIAL_IMAGES, description=(
        "previews streamed before the final image, 0-3, at evenly spaced steps (with stream: true)"))
    num_inference_steps: int | None = _STEPS
    guidance_scale: float | None = _GUIDANCE
    seed: int | None = _SEED
    scheduler: Scheduler | None = _SCHEDULER
    negative_prompt: Prompt | None = _NEGATIVE
    priority: Name | int | None = _PRIORITY
    deadline_ms: float | None = _DEADLINE
    controlnet: ControlNetList = None
    lora: LoraList = None
    lora_wait: Literal["bounded", "full"] | None = Field(None, description=(
        "bounded (default): start at once and take adapters still loading when they land (at the latest after "
        "the worker's --lora-max-unloaded-steps); full: wait for them before the first step"))


class ImageGenerationRequest(ImageRequestFields):
    """`POST /v1/images/generations`: text to image (a JSON body, validated strictly)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    prompt: Prompt = Field(description="what to draw")
    size: Size | None = Field("auto", description="'WxH' (multiples of 8, within the worker's "
                                                                "--max-image-size) or 'auto' (the model's own)")
    style: Literal["vivid", "natural"] | None = Field(None, description=_IGNORED)
    moderation: Literal["low", "auto"] | None = Field(None, description=(
        "accepted; no moderation hook is configured, so it changes nothing"))
    # SDXL micro-conditioning (families without it ignore these)
    original_size: WxH | None = Field(None, description=(
        "'WxH': the size the model is told the image was taken from (SDXL micro-conditioning; "
        "default: the output size). Families without micro-conditioning ignore it."))
    target_size: WxH | None = Field(None, description=(
        "'WxH': the size the model is told to aim for (SDXL micro-conditioning; default: the output "
        "size). Families without micro-conditioning ignore it."))
    crops_coords_top_left: TopLeft = Field(None, description=(
        "'top,left' or [top, left]: the crop the model is told the image was cut at (SDXL "
        "micro-conditioning; default 0,0). Families without micro-conditioning ignore it."))


class ImageEditForm(ImageRequestFields):
    """`POST /v1/images/edits` (multipart): inpaint the area a mask leaves transparent."""

    image: UploadFile | None = Field(None, description="PNG, JPEG or WebP; sides multiples of 8 (or send template_id)")
    image_list: list[UploadFile] | None = Field(
        None, alias="image[]", max_length=MAX_EDIT_IMAGES, description=(
            "images to edit (OpenAI clients' array form, up to 16): the first is edited (the mask applies to "
            "it); the others must be readable images and are reference images this model family cannot use"))
    mask: UploadFile | None = Field(None, description=(
        "PNG of the image's size; fully transparent pixels (alpha 0) mark the area to edit "
        "(omitted: the whole image may change)"))
    prompt: Prompt = Field(description="what the edited area should show")
    template_id: Name | None = Field(None, description="a registered template to edit instead of an uploaded image")
    size: Size | None = Field(None, description="must be the image's size, or 'auto'")
    input_fidelity: Literal["high", "low"] | None = Field(None, description=(
        "how closely to keep the input image when strength is not given: high = strength 0.6, low = 1.0"))
    #: Omitted generation settings default to the template's, so the edit takes the cached path.
    strength: float | None = _STRENGTH
    controlnet_image: list[UploadFile] | None = Field(None, alias="controlnet_image[]", max_length=8, description=(
        "control images for the `controlnet` entries sent without an inline image, in order"))


class ImageReference(BaseModel):
    """OpenAI's `ImageInputReferenceParam`: an image named by URL (`file_id` needs a Files API,
    which stepfleet has not)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    image_url: str | None = Field(None, description=(
        "a base64 data URL (data:image/png;base64,...), or an http(s) URL where the worker allows remote "
        "URLs (--remote-image-urls; off by default)"))
    file_id: Name | None = Field(None, description="not supported (no Files API): send image_url")

    @model_validator(mode="after")
    def _one_url(self) -> ImageReference:
        if self.file_id is not None:
            raise ValueError("file_id is not supported (stepfleet has no Files API); send image_url")
        if not self.image_url:
            raise ValueError("image_url is required")
        return self


class ImageEditJSON(ImageRequestFields):
    """`POST /v1/images/edits` with a JSON body (OpenAI's second form): images by URL."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    images: list[ImageReference] | None = Field(None, min_length=1, max_length=MAX_EDIT_IMAGES, description=(
        "images to edit, up to 16: the first is edited (the mask applies to it), the others must be images "
        "and are reference images this model family cannot use (or send template_id)"))
    mask: ImageReference | None = Field(None, description=(
        "a PNG of the first image's size; fully transparent pixels mark the area to edit"))
    prompt: Prompt = Field(description="what the edited area should show")
    template_id: Name | None = Field(None, description="a registered template to edit instead of images")
    size: Size | None = Field(None, description="must be the first image's size, or 'auto'")
    input_fidelity: Literal["high", "low"] | None = Field(None, description=(
        "how closely to keep the input image when strength is not given: high = strength 0.6, low = 1.0"))
    strength: float | None = _STRENGTH


class ImageVariationForm(BaseModel):
    """`POST /v1/images/variations` (multipart): variations of an image (image-to-image, no prompt)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    image: UploadFile = Field(description="PNG, JPEG or WebP; sides multiples of 8; the variations keep its size")
    model: Name | None = Field(None, description="must name the served model when given")
    n: int = _N
    response_format: Literal["b64_json"] | None = _RESPONSE_FORMAT
    size: Size | None = Field(None, description="must be the image's size, or 'auto'")
    user: Name | None = Field(None, description="accepted; not recorded")
    output_format: OutputFormat | None = _OUTPUT_FORMAT
    output_compression: int | None = _COMPRESSION
    strength: float | None = Field(None, gt=0, le=1, description=(
        "how far a variation may go from the image, in (0, 1] (default 0.6)"))
    prompt: Prompt | None = Field(None, description="optional text to steer the variations (default none)")
    num_inference_steps: int | None = _STEPS
    guidance_scale: float | None = _GUIDANCE
    seed: int | None = _SEED
    scheduler: Scheduler | None = _SCHEDULER
    priority: Name | int | None = _PRIORITY
    deadline_ms: float | None = _DEADLINE


class TemplateForm(BaseModel):
    """`POST /v1/templates` (multipart): register an image for cached edits."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    image: UploadFile = Field(description="PNG, JPEG or WebP; its size is the template's (sides multiples of 8)")
    prompt: Prompt = Field("", description="the prompt the template is recorded with")
    negative_prompt: Prompt | None = _NEGATIVE
    size: Size | None = Field(None, description="must be the image's size, or 'auto'")
    # The settings that key the cache: an edit with all of them equal takes the cached path.
    num_inference_steps: int | None = _STEPS
    guidance_scale: float | None = _GUIDANCE
    seed: int | None = Field(None, ge=0, lt=2**63, description="random seed (default 0)")
    scheduler: Scheduler | None = _SCHEDULER
    strength: float | None = Field(None, gt=0, le=1, description="default 1")


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class StepfleetInfo(BaseModel):
    request_id: str
    seed: int
    steps: int
    queue_s: float
    total_s: float
    #: Edits only: how the edit ran (also in the `X-Stepfleet-Edit-Path` header).
    edit_path: Literal["cached", "full"] | None = None
    template_id: str | None = None
    #: Requests with `lora`: the adapters, steps that ran before they landed, seconds waited for them.
    lora: LoraInfo | None = None


class LoraInfo(BaseModel):
    adapters: list[LoraItem]
    wait: Literal["bounded", "full"]
    steps_without_adapter: int = Field(description="denoising steps that ran before every adapter was loaded")
    waited_s: float = Field(description="seconds the request (or its step batch) waited for adapter loads")


class InputTokensDetails(BaseModel):
    image_tokens: int
    text_tokens: int


class Usage(BaseModel):
    """Tokens, defined for diffusion (docs/openai-compat.md): output = latent tokens × steps × images;
    input = prompt tokens + latent tokens of input images."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    total_tokens: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    background: Literal["opaque"]
    output_format: OutputFormat
    quality: Literal["low", "medium", "high"]
    size: str
    usage: Usage
    stepfleet: StepfleetInfo


class TemplateObject(BaseModel):
    id: str
    object: Literal["template"] = "template"
    created: int
    status: Literal["recording", "ready", "failed"]
    cached: bool = Field(description="false once any of its steps was evicted from both cache tiers")
    prompt: str
    size: str
    num_inference_steps: int
    scheduler: str | None
    guidance_scale: float
    seed: int
    strength: float
    error: str | None = None


class TemplateList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TemplateObject]


class TemplateDeleted(BaseModel):
    id: str
    object: Literal["template.deleted"] = "template.deleted"
    deleted: bool


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "stepfleet"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = Field(description="the request field to fix, when one is to blame")
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, OpenAI's shape (`serving.errors`)."""

    error: ErrorDetail


# -- /v1/adapters (LoRA) ---------------------------------------------------------------------

class AdapterObject(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    created: int
    source: str
    bytes: int = Field(description="the adapter file's size")
    sha256: str
    rank: int
    modules: int = Field(description="denoiser layers the adapter changes")
    tiers: list[Literal["device", "host", "disk"]] = Field(description="cache tiers holding it now")
    in_use: int = Field(description="running or queued requests using it")


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterObject]


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["adapter.deleted"] = "adapter.deleted"
    deleted: bool


class AdapterForm(BaseModel):
    """`POST /v1/adapters` (multipart): a safetensors `file`, or a `source` to read it from."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="the adapter's name in requests' `lora` (letters, digits, '.', '_', '-')")
    file: UploadFile | None = Field(None, description="a LoRA safetensors file (kohya/A1111, diffusers or PEFT keys)")
    source: str | None = Field(None, max_length=1024, description="hf://owner/repo[/file], pvc://path or a local path")
