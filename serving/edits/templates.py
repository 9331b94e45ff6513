"""Registered templates: what an edit needs besides the cached activations, and the cache key.

A template is an image run once through the denoising loop (a RECORD run: full compute that
stores each step's attention activations in the `TemplateCache`). The settings of that run
— size, steps, scheduler, guidance, seed, strength — are its `TemplateKey`: an edit whose
settings give the same key sees, outside its mask, exactly the latents the template saw at
every step, so the cached activations are valid for it (the cached path). Any other edit of
the template still works, by full compute (the fallback), and says so.

The registry keeps, per template, only small things: the image (for the final composite),
its latents, and the template's noised latents per step (what an edit's latents are outside
the mask); the big per-step activations live in the bounded cache. It is bounded in count;
the oldest template beyond `max_templates` is forgotten (and dropped from the cache).
"""

from __future__ import annotations

import enum
import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


class TemplateState(enum.Enum):
    RECORDING = "recording"  # its RECORD run has not finished
    READY = "ready"  # recorded: edits with its key take the cached path
    FAILED = "failed"  # its RECORD run failed


@dataclass(frozen=True)
class TemplateKey:
    """The settings an edit must share with its template to reuse the cached activations."""

    width: int
    height: int
    steps: int
    scheduler: str | None
    guidance_scale: float
    seed: int
    strength: float = 1.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "size": f"{self.width}x{self.height}",
            "num_inference_steps": self.steps,
            "scheduler": self.scheduler,
            "guidance_scale": self.guidance_scale,
            "seed": self.seed,
            "strength": self.strength,
        }


def image_digest(image: Any) -> str:
    """A content hash of a PIL image's pixels (so the same picture uploaded again finds its template)."""
    h = hashlib.sha256()
    h.update(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()[:32]


@dataclass
class Template:
    id: str
    key: TemplateKey
    prompt: str
    image: Any  # PIL RGB image, the template's pixels (kept exactly outside every edit's mask)
    digest: str
    created: int = field(default_factory=lambda: int(time.time()))
    state: TemplateState = TemplateState.RECORDING
    error: str | None = None
    #: Set by the runner during the RECORD run (CPU tensors): image latents, and the latents
    #: an edit must have outside its mask before step i (noised[i]) and at the end (noised[-1]).
    latents: Any = None
    noised: list[Any] | None = None
    template_rows: int = 1  # UNet rows recorded per step (2 with classifier-free guidance)
    #: The decode of its latents' up-path GroupNorm sums (`crop_decode.NormStats`), set when its
    #: RECORD run finishes: what lets an edit decode only its mask's neighbourhood.
    decode_stats: Any = None

    def public(self, cached: bool) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "template",
            "created": self.created,
            "status": self.state.value,
            "cached": cached,
            "prompt": self.prompt,
            **self.key.as_dict(),
            **({"error": self.error} if self.error else {}),
        }


class TemplateRegistry:
    """Thread-safe templates by id (and by image digest), bounded in count, oldest forgotten first."""

    def __init__(self, max_templates: int = 1024) -> None:
        self.max_templates = max_templates
        self._by_id: OrderedDict[str, Template] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, template: Template) -> list[Template]:
        """Register; returns the templates forgotten to stay within `max_templates`."""
        with self._lock:
            self._by_id[template.id] = template
            gone = []
            while len(self._by_id) > self.max_templates:
                _, old = self._by_id.popitem(last=False)
                gone.append(old)
            return gone

    def get(self, template_id: str) -> Template | None:
        with self._lock:
            return self._by_id.get(template_id)

    def remove(self, template_id: str) -> Template | None:
        with self._lock:
            return self._by_id.pop(template_id, None)

    def find(self, digest: str, key: TemplateKey | None = None) -> Template | None:
        """The newest ready template of this image (with this key, when given)."""
        with self._lock:
            for t in reversed(self._by_id.values()):
                if t.digest == digest and t.state is TemplateState.READY and (key is None or t.key == key):
                    return t
        return None

    def all(self) -> list[Template]:
        with self._lock:
            return list(self._by_id.values())


def record_params(template: Template, negative_prompt: str | None = None):
    """The engine request that registers `template` (its RECORD run)."""
    from stepfleet.serving.params import EditSpec, GenerationParams

    k = template.key
    return GenerationParams(
        prompt=template.prompt or " ",
        width=k.width,
        height=k.height,
        n=1,
        num_inference_steps=k.steps,
        guidance_scale=k.guidance_scale,
        negative_prompt=negative_prompt,
        scheduler=k.scheduler,
        seed=k.seed,
        edit=EditSpec(record=True, template_id=template.id, strength=k.strength),
    )
