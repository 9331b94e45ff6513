"""What a request will cost a worker, predicted from its fields before it is sent.

Balancing by request count fails when requests differ tenfold in cost. The unit here is a
*step-row at 512×512*: one denoising step of one UNet row of a 512×512 image. A request
costs `steps × rows × pixels/512²`, where rows double under classifier-free guidance (the
worker runs the conditional and unconditional rows together). An edit on a worker that
holds its template's activations computes attention only for masked tokens; the rest of
the step (convolutions, the unmasked tokens' cheap path) still runs, so a cached edit costs
`EDIT_FLOOR + (1 - EDIT_FLOOR) × mask_ratio` of a full one. Transformer blocks are about
half of a step at 32×32 latents and 70 % at 64×64 (docs/TOOLING measurements), hence the
0.4 floor. Only relative costs matter: the router learns each worker's speed in these units.

Pure: no I/O, no clock. `mask_ratio_from_png` decodes a PNG in memory (CPU only).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

REFERENCE_PIXELS = 512 * 512
#: Share of a full step that a cached edit still pays with an empty mask.
EDIT_FLOOR = 0.4
#: Cost of a request that does no denoising (model list, template lookups).
TRIVIAL_UNITS = 0.1


@dataclass(frozen=True)
class RequestCost:
    """A request's predicted cost, and what balancing needs to know about it."""

    kind: str  # "generation", "edit" or "other"
    #: Cost where the request's template is cached (or for non-edits, anywhere).
    units: float
    #: Cost where it is not cached (an edit recomputes the whole image); == units otherwise.
    uncached_units: float
    template_id: str | None = None
    #: The worker the router knows holds the template (where it was registered), if any.
    home: str | None = None
    #: Another key to prefer a rendezvous home for (a request's LoRA adapters, `router.adapters`);
    #: `uncached_units` is its cost away from that home.
    affinity: str | None = None


def parse_size(size: str | None, default: int) -> tuple[int, int]:
    """`"WxH"` → (W, H); "auto", missing or malformed → the default (the worker validates)."""
    if size and "x" in size:
        w, _, h = size.partition("x")
        if w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0:
            return int(w), int(h)
    return default, default


def generation_units(steps: int, width: int, height: int, n: int = 1, guidance_scale: float | None = 7.5) -> float:
    rows = max(1, n) * (2 if guidance_scale is None or guidance_scale > 1 else 1)
    return max(TRIVIAL_UNITS, max(1, steps) * rows * (width * height) / REFERENCE_PIXELS)


def edit_fraction(mask_ratio: float | None) -> float:
    """Share of a full request's cost that a cached edit pays."""
    if mask_ratio is None:
        return 1.0
    ratio = min(1.0, max(0.0, mask_ratio))
    return EDIT_FLOOR + (1.0 - EDIT_FLOOR) * ratio


def generation_cost(body: dict, default_steps: int, default_size: int) -> RequestCost:
    w, h = parse_size(body.get("size") if isinstance(body.get("size"), str) else None, default_size)
    steps = body.get("num_inference_steps") or default_steps
    n = body.get("n") or 1
    units = generation_units(int(steps), w, h, int(n), body.get("guidance_scale"))
    return RequestCost("generation", units, units)


def edit_cost(fields: dict[str, str], mask_ratio: float | None, default_steps: int, default_size: int) -> RequestCost:
    """Cost of a multipart edit from its text fields and the mask's edited share."""
    w, h = parse_size(fields.get("size"), default_size)
    steps = _int(fields.get("num_inference_steps"), default_steps)
    n = _int(fields.get("n"), 1)
    guidance = _float(fields.get("guidance_scale"))
    full = generation_units(steps, w, h, n, guidance)
    template = fields.get("template_id") or None
    cached = full * edit_fraction(mask_ratio) if template else full
    return RequestCost("edit", cached, full, template)


def trivial_cost(template_id: str | None = None) -> RequestCost:
    return RequestCost("other", TRIVIAL_UNITS, TRIVIAL_UNITS, template_id)


def mask_ratio_from_png(data: bytes) -> float | None:
    """Share of pixels to edit: fully transparent ones (OpenAI's mask convention); None if unreadable."""
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            if img.mode not in ("RGBA", "LA", "PA") and "transparency" not in img.info:
                return 1.0  # no alpha: the whole image may change
            alpha = img.convert("RGBA").getchannel("A")
            alpha.thumbnail((128, 128))  # a ratio does not need every pixel
            hist = alpha.histogram()
            total = sum(hist)
            return hist[0] / total if total else None
    except Exception:
        return None


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        return default


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None
