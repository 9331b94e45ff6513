"""Partial images for streamed requests: a runner extension that renders predicted clean latents.

A step-level engine holds every request's latents at every step, so a preview is nearly
free: after a step, the scheduler's prediction of the clean latents (x0; `RequestState.
predicted_x0`, or computed from the model output where the scheduler does not return it) is
what the image would be if denoising stopped now. `PreviewExtension.after_step` renders it at
the steps `partial_steps` spaces evenly and hands the pixels to the request's
`StreamSpec.sink`; it never changes the latents, so a streamed request's final image is the
non-streamed one's, bit for bit (tested).

How x0 becomes pixels: a linear **latent → RGB projection** (4 numbers per latent pixel → 3,
plus a bias), fitted once per model from its own VAE (`fit_projection`: flat-coloured
images are encoded, and the map from each latent pixel to its 8×8 pixel block's mean colour is
solved by least squares), then upsampled to the request's size. Measured on the 2-core CPU
(`stepfleet bench stream`, docs/openai-compat.md): for tiny-sd at 256² one VAE decode of a
preview took about as long as a whole denoising step of the batch, and on the CPU it runs on
the loop thread, so every preview would stall every request in the batch by a step; the
projection takes well under a millisecond. Previews are a preview: colours and layout are
right, detail below 8 pixels is not. `method="vae"` decodes with the VAE instead (exact
x0 pictures, one decode per preview).

Nothing here fails a request: a preview that cannot be rendered or delivered is logged and
skipped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from stepfleet.serving.backbones.base import Backbone
    from stepfleet.serving.contracts import ImageBatch
    from stepfleet.serving.runner import RequestState

log = logging.getLogger(__name__)

#: Side of the flat-coloured blocks the projection is fitted on, in pixels (several latent
#: pixels, so the VAE's receptive field sees flat colour around each fitted sample).
_FIT_BLOCK = 32
_FIT_IMAGES = 6
_FIT_SIDE = 128


def partial_steps(total_steps: int, partial_images: int) -> tuple[int, ...]:
    """The steps (1-based, after which) a request's previews are rendered: evenly spaced, before
    the last step, distinct (a request of few steps gets fewer previews, as OpenAI allows)."""
    if partial_images <= 0 or total_steps <= 1:
        return ()
    steps = {min(total_steps - 1, max(1, round((i + 1) * total_steps / (partial_images + 1))))
             for i in range(partial_images)}
    return tuple(sorted(steps))


def predicted_x0(state: RequestState, sample: torch.Tensor) -> torch.Tensor:
    """The clean latents the last step predicted, for `sample` (the latents it started from)."""
    if state.predicted_x0 is not None:
        return state.predicted_x0
    scheduler = state.scheduler
    outputs = getattr(scheduler, "model_outputs", None)
    keeps_x0 = (getattr(scheduler.config, "algorithm_type", None) == "dpmsolver++"
                or getattr(scheduler.config, "predict_x0", False) is True)  # UniPC (Wan's scheduler) too
    if keeps_x0 and outputs and outputs[-1] is not None:
        return outputs[-1]  # DPM-Solver++ keeps its x0 prediction as the step's converted output
    out = state.model_output
    assert out is not None, "after_step runs after a model call"
    t = state.timesteps[state.step_index]
    if not hasattr(scheduler, "alphas_cumprod") and hasattr(scheduler, "sigmas"):
        # Flow matching (SD3, Flux): x_t = (1 - sigma)·x0 + sigma·noise and the model predicts
        # noise - x0, so x0 = x_t - sigma·v, with sigma = t / num_train_timesteps.
        sigma = float(t) / float(scheduler.config.num_train_timesteps)
        return sample.float() - sigma * out.float()
    alpha = scheduler.alphas_cumprod[int(t)].to(sample.device, torch.float32)
    a, s = alpha.sqrt(), (1 - alpha).sqrt()
    x, e = sample.float(), out.float()
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return a * x - s * e
    if kind == "sample":
        return e
    return (x - s * e) / a


def fit_projection(backbone: Backbone, seed: int = 0) -> torch.Tensor:
    """A (5, 3) map from latent pixels [c0..c3, 1] to RGB in [0, 1], fitted on the model's own VAE."""
    from PIL import Image

    g = np.random.default_rng(seed)
    blocks = _FIT_SIDE // _FIT_BLOCK
    xs, ys = [], []
    f = _FIT_SIDE // backbone.latent_shape(_FIT_SIDE, _FIT_SIDE)[-1]  # (C, h, w) or a video's (C, 1, h, w)
    for _ in range(_FIT_IMAGES):
        colours = g.integers(0, 256, size=(blocks, blocks, 3), dtype=np.uint8)
        pixels = np.kron(colours, np.ones((_FIT_BLOCK, _FIT_BLOCK, 1), dtype=np.uint8))
        with torch.inference_mode():
            z = backbone.encode_image(Image.fromarray(pixels)).float().cpu()[0]  # (C, h, w)
        z = z.reshape(z.shape[0], *z.shape[-2:])  # a video family's one-frame (C, 1, h, w)
        c, h, w = z.shape
        target = pixels.reshape(h, f, w, f, 3).mean(axis=(1, 3)) / 255.0
        # Only latent pixels inside a flat block (not at its edges) are clean samples of their colour.
        inner = np.zeros((h, w), dtype=bool)
        per = _FIT_BLOCK // f
        for i in range(h):
            for j in range(w):
                inner[i, j] = 0 < i % per < per - 1 and 0 < j % per < per - 1
        xs.append(z.permute(1, 2, 0).reshape(-1, c)[torch.from_numpy(inner.reshape(-1))])
        ys.append(torch.from_numpy(target.reshape(-1, 3)[inner.reshape(-1)]).float())
    x = torch.cat(xs)
    x = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    return torch.linalg.lstsq(x, torch.cat(ys)).solution  # (C + 1, 3)


def project(x0: torch.Tensor, projection: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Latents (n, C, h, w) → uint8 (n, H, W, 3) at `size` (width, height), by the fitted projection."""
    z = x0.detach().float().cpu()
    z = z.reshape(z.shape[0], z.shape[1], *z.shape[-2:])  # a video family's one-frame (n, C, 1, h, w)
    rgb = torch.einsum("nchw,ck->nkhw", z, projection[:-1]) + projection[-1].view(1, 3, 1, 1)
    w, h = size
    rgb = torch.nn.functional.interpolate(rgb, size=(h, w), mode="bilinear", align_corners=False)
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


class PreviewExtension:
    """Renders partial images of streamed requests (`params.stream`); inert for every other request."""

    def __init__(self, backbone: Backbone, method: str = "projection") -> None:
        if method not in ("projection", "vae"):
            raise ValueError(f"unknown preview method {method!r}")
        self.backbone = backbone
        self.method = method
        self._projection: torch.Tensor | None = None
        self._lock = threading.Lock()

    def projection(self) -> torch.Tensor:
        """The fitted latent → RGB map (fitted on first use, on the loop thread, then kept)."""
        with self._lock:
            if self._projection is None:
                self._projection = fit_projection(self.backbone)
            return self._projection

    def render(self, x0: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        if self.method == "vae":
            images = self.backbone.decode(x0, output_type="np")
            return (np.clip(np.asarray(images), 0, 1) * 255).round().astype(np.uint8)
        return project(x0, self.projection(), size)

    # -- runner.Extension ------------------------------------------------------------------------
    def prepare(self, state: RequestState) -> None:
        pass

    def denoising(self, batch: Sequence[RequestState]) -> AbstractContextManager[None]:
        return nullcontext()

    def after_step(self, state: RequestState, latents: torch.Tensor) -> torch.Tensor:
        spec = state.params.stream
        if spec is None or not spec.partial_images:
            return latents
        done = state.step_index + 1
        steps = partial_steps(len(state.timesteps), spec.partial_images)
        if done in steps:
            try:
                x0 = predicted_x0(state, state.latents)
                spec.sink(steps.index(done), self.render(x0, (state.params.width, state.params.height)))
            except Exception:  # a preview must never fail its request
                log.exception("partial image %d of a streamed request failed", steps.index(done))
        return latents

    def finish(self, state: RequestState, decode: Callable[[], ImageBatch]) -> ImageBatch | None:
        return None


def install(runner: object) -> PreviewExtension | None:
    """The runner's `PreviewExtension`, added to it if missing; None for a runner without a model
    (test fakes). Idempotent; call before the engine's loop starts stepping with it."""
    extensions = getattr(runner, "extensions", None)
    backbone = getattr(runner, "backbone", None)
    if extensions is None or backbone is None:
        return None
    for ext in extensions:
        if isinstance(ext, PreviewExtension):
            return ext
    ext = PreviewExtension(backbone)
    extensions.append(ext)
    return ext
