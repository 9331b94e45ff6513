"""Pure rules of ControlNet requests and settings (no torch, no HTTP): the guidance window, the
worker's `--controlnets` list, and the checks of a request's `controlnet` entries.

Every rejection is an `InvalidParam` naming the field the way a client wrote it
(`controlnet[1].guidance_start`), so the HTTP layer answers 400 (404 for an unknown net) with
OpenAI's `param`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from stepfleet.serving.controlnet import BUILTIN_CONTROLNETS, KINDS
from stepfleet.serving.params import InvalidParam

#: Default most ControlNets per request (`--max-controlnets`): each one is a UNet-encoder's worth
#: of compute per step.
DEFAULT_MAX_CONTROLNETS = 2
#: Preprocessors a request may ask for; `none` sends its image to the net as is.
PREPROCESSORS: tuple[str, ...] = ("none", "canny")
#: diffusers' ControlNet docs' canny thresholds.
DEFAULT_CANNY = (100, 200)
#: A control image whose aspect ratio differs from the output's by more than this fraction is
#: refused rather than stretched (stretching would misplace every edge); closer ones are resized
#: to the output size exactly as diffusers' pipelines resize them.
ASPECT_TOLERANCE = 0.01
#: Fields of one `controlnet` entry.
FIELDS: tuple[str, ...] = ("name", "image", "conditioning_scale", "guidance_start", "guidance_end", "preprocess",
                           "low", "high")


def window_active(step: int, steps: int, start: float, end: float) -> bool:
    """Whether step `step` of `steps` is inside the guidance window: diffusers' `controlnet_keep`
    (`1 - (i/N < start or (i+1)/N > end)`), so windows match its pipelines step for step."""
    return not (step / steps < start or (step + 1) / steps > end)


@dataclass(frozen=True)
class ControlNetEntry:
    """One registered ControlNet: the name requests use, where its weights come from, what it reads."""

    name: str
    source: str
    kind: str = "other"


def parse_registry(text: str | None) -> tuple[ControlNetEntry, ...]:
    """`--controlnets`: comma-separated `name=source[:kind]`, or a bare built-in name
    (`tiny-controlnet`, kind canny). Raises ValueError naming the bad entry."""
    entries: list[ControlNetEntry] = []
    for raw in (text or "").split(","):
        item = raw.strip()
        if not item:
            continue
        name, eq, rest = item.partition("=")
        if not eq:
            if item not in BUILTIN_CONTROLNETS:
                raise ValueError(f"controlnet {item!r}: write name=source[:kind] (bare names: "
                                 f"{', '.join(BUILTIN_CONTROLNETS)})")
            entries.append(ControlNetEntry(item, item, "canny"))
            continue
        source, colon, kind = rest.rpartition(":") if ":" in rest else (rest, "", "")
        kind = kind if colon else ("canny" if source in BUILTIN_CONTROLNETS else "other")
        if not name.strip() or not source.strip():
            raise ValueError(f"controlnet {item!r}: name and source must not be empty")
        if kind not in KINDS:
            raise ValueError(f"controlnet {item!r}: kind must be one of {', '.join(KINDS)}")
        entries.append(ControlNetEntry(name.strip(), source.strip(), kind))
    names = [e.name for e in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"controlnet names must be unique (repeated: {', '.join(dupes)})")
    return tuple(entries)


def render_registry(entries: Sequence[ControlNetEntry]) -> str | None:
    """The `--controlnets` text of `entries` (the operator renders the CRD's list with it)."""
    return ",".join(f"{e.name}={e.source}:{e.kind}" for e in entries) or None


@dataclass(frozen=True)
class ControlRequest:
    """One checked `controlnet` entry, its image still encoded (decoded by `preprocess`)."""

    index: int
    name: str
    image: str | bytes  # base64 text (JSON) or the raw bytes of a multipart part
    conditioning_scale: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    preprocess: str = "none"
    low: int = DEFAULT_CANNY[0]
    high: int = DEFAULT_CANNY[1]

    def param(self, field: str) -> str:
        return f"controlnet[{self.index}].{field}"


def _number(value: object, param: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParam(param, f"must be a number (got {value!r})")
    if not lo <= float(value) <= hi:
        raise InvalidParam(param, f"must be between {lo:g} and {hi:g} (got {value})")
    return float(value)


def _threshold(value: object, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParam(param, f"must be an integer (got {value!r})")
    if not 0 <= value <= 255:
        raise InvalidParam(param, f"must be between 0 and 255 (got {value})")
    return value


def check_controls(raw: object, known: Collection[str], max_controls: int,
                   images: Mapping[int, bytes] | None = None) -> tuple[ControlRequest, ...]:
    """A request's `controlnet` list → checked entries (InvalidParam, code `controlnet_not_found` for
    an unknown name, which the HTTP layer answers 404). `images` are multipart parts
    (`controlnet[i].image`) standing in for an entry's base64 `image`."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidParam("controlnet", "must be a list of {name, image, ...} objects")
    if len(raw) > max_controls:
        raise InvalidParam("controlnet", f"at most {max_controls} ControlNets per request (got {len(raw)})",
                           code="too_many_controlnets")
    out: list[ControlRequest] = []
    for i, item in enumerate(raw):
        where = f"controlnet[{i}]"
        if not isinstance(item, dict):
            raise InvalidParam(where, "must be an object with name and image")
        unknown = sorted(set(item) - set(FIELDS))
        if unknown:
            raise InvalidParam(f"{where}.{unknown[0]}", f"unknown field (fields: {', '.join(FIELDS)})",
                               code="unknown_parameter")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidParam(f"{where}.name", "must be a registered ControlNet's name", code="missing_parameter")
        if name not in known:
            raise InvalidParam(f"{where}.name", f"unknown ControlNet {name!r} (GET /v1/controlnets lists them; "
                               f"registered: {', '.join(sorted(known)) or 'none'})", code="controlnet_not_found")
        image: str | bytes | None = (images or {}).get(i, item.get("image"))
        if image is None or image == "":
            raise InvalidParam(f"{where}.image", "a control image is required (base64 in JSON, or a multipart "
                               f"part named {where}.image)", code="missing_parameter")
        if not isinstance(image, (str, bytes)):
            raise InvalidParam(f"{where}.image", "must be a base64-encoded image")
        scale = _number(item.get("conditioning_scale", 1.0), f"{where}.conditioning_scale", 0.0, 10.0)
        start = _number(item.get("guidance_start", 0.0), f"{where}.guidance_start", 0.0, 1.0)
        end = _number(item.get("guidance_end", 1.0), f"{where}.guidance_end", 0.0, 1.0)
        if start > end:
            raise InvalidParam(f"{where}.guidance_start", f"must not exceed guidance_end ({start} > {end})")
        pre = item.get("preprocess", "none")
        if pre is None:
            pre = "none"
        if pre not in PREPROCESSORS:
            raise InvalidParam(f"{where}.preprocess", f"must be one of {', '.join(PREPROCESSORS)} (got {pre!r})")
        low = _threshold(item.get("low", DEFAULT_CANNY[0]), f"{where}.low")
        high = _threshold(item.get("high", DEFAULT_CANNY[1]), f"{where}.high")
        if pre == "canny" and low > high:
            raise InvalidParam(f"{where}.low", f"must not exceed high ({low} > {high})")
        out.append(ControlRequest(i, name, image, scale, start, end, str(pre), low, high))
    return tuple(out)


def registered(runner: object) -> tuple[ControlNetEntry, ...]:
    """The ControlNets of `runner`'s ControlNet extension (none without one), found without importing
    torch: the extension with a `controlnet_registry` that lists `entries()`."""
    for ext in getattr(runner, "extensions", ()) or ():
        registry = getattr(ext, "controlnet_registry", None)
        entries = getattr(registry, "entries", None)
        if callable(entries):
            return tuple(entries())
    return ()
