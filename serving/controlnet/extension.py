"""ControlNet as a runner extension: per-request control inside one mixed step batch.

diffusers' `StableDiffusionControlNetPipeline` (and the SDXL one) run, at every step, the
ControlNet on the same rows as the UNet — `[negative×n, positive×n]` under classifier-free
guidance, with the control image repeated on every row (not guess mode) — scale its residuals by
`conditioning_scale × keep` (keep: 0 outside the guidance window) and add them to the UNet's
skip connections; a `MultiControlNetModel` sums its nets' residuals. A step batch here mixes
requests, so per step (`denoiser_inputs`):

1. each request inside its window contributes its rows to each net it uses (its control image
   expanded on those rows, its scale per row); a request outside its window contributes nothing
   (diffusers runs the net with scale 0 there: zeros either way);
2. each net runs once, on its rows only (gathered with `index_select`), with the rows' own
   timesteps and conditioning — for SDXL the added `text_embeds`/`time_ids` too: every key of
   the conditioning other than `encoder_hidden_states` is the nets' `added_cond_kwargs`, as the
   ControlNet mirrors the UNet's arguments;
3. the scaled residuals are added into batch-wide zeros at those rows (`index_add_`): rows
   without control get zeros, which leave the UNet's additions bit-identical, and rows with two
   nets get their sum in the order diffusers sums them.

A batch in which no row is controlled passes no residuals at all. Control images are prepared
in `prepare` exactly as the pipelines' `prepare_image` does (resized to the output size, [0, 1],
not normalised).

Placement (`placement`): with an overlapping executor, `after_step` submits a request's next-step
ControlNet runs as soon as its latents exist, and `denoiser_inputs` waits only for the futures of
the requests in this batch that are inside their window. A prefetch is used only if it was made
from the very latents the request now has (another extension may have changed them after us);
otherwise the rows are computed in the step's own batched run.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch

from stepfleet.serving.backbones.base import Backbone, DenoiserExtras
from stepfleet.serving.controlnet.placement import ControlExecutor, InlineExecutor
from stepfleet.serving.controlnet.registry import ControlNetRegistry
from stepfleet.serving.controlnet.spec import window_active

if TYPE_CHECKING:
    from stepfleet.serving.contracts import ImageBatch
    from stepfleet.serving.runner import RequestState

#: The cost variant of a controlled request's steps (`RequestState.cost_variant`).
CONTROLNET_VARIANT = "controlnet"
#: One net's output for some rows: the down-block residuals and the mid-block residual, scaled.
Residuals = tuple[list[torch.Tensor], torch.Tensor]


@dataclass(eq=False)
class ActiveControl:
    """One ControlNet on one request, its image ready for the net."""

    name: str
    image: torch.Tensor  # (1, 3, H, W), the pipelines' prepared control image
    scale: float
    start: float
    end: float


@dataclass(eq=False)
class Prefetch:
    step: int
    latents: torch.Tensor  # the latents it was computed from (identity, not value, is checked)
    future: Future[Residuals]


@dataclass(eq=False)
class ControlState:
    controls: list[ActiveControl]
    prefetched: dict[int, Prefetch] = field(default_factory=dict)


def run_net(net: torch.nn.Module, sample: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor],
            image: torch.Tensor, scales: torch.Tensor) -> Residuals:
    """One ControlNet call on some rows, residuals scaled per row (safe on any thread)."""
    with torch.inference_mode():
        added = {k: v for k, v in cond.items() if k != "encoder_hidden_states"}
        down, mid = net(sample, timestep, encoder_hidden_states=cond["encoder_hidden_states"], controlnet_cond=image,
                        conditioning_scale=1.0, added_cond_kwargs=added or None, return_dict=False)
        s = scales.to(device=mid.device, dtype=mid.dtype).view(-1, 1, 1, 1)
        return [d * s for d in down], mid * s


def control_image(image: object, width: int, height: int, vae_scale_factor: int, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """A PIL image → (1, 3, H, W) as the ControlNet pipelines' `prepare_image` makes it."""
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor, do_convert_rgb=True, do_normalize=False)
    x = processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
    return x.to(device=device, dtype=dtype)


def gather(due: Sequence[tuple[torch.Tensor, Future[Residuals]]], rows: int) -> Residuals:
    """Wait for the runs and add each into batch-wide zeros at its rows (in submission order)."""
    down: list[torch.Tensor] | None = None
    mid: torch.Tensor | None = None
    for idx, future in due:
        d, m = future.result()
        if down is None or mid is None:
            down = [torch.zeros((rows, *x.shape[1:]), dtype=x.dtype, device=x.device) for x in d]
            mid = torch.zeros((rows, *m.shape[1:]), dtype=m.dtype, device=m.device)
        for acc, x in zip(down, d, strict=True):
            acc.index_add_(0, idx, x)
        mid.index_add_(0, idx, m)
    assert down is not None and mid is not None
    return down, mid


class Deferred:
    """Residuals still being computed, handed to the UNet call before they exist.

    A UNet consumes ControlNet residuals only after its down blocks (`zip` over the down residuals)
    and its mid block (`sample + mid residual`), so with an overlapping executor the nets run while
    the UNet's encoder does: the first of those two uses waits for them (`gather`, once). The down
    residuals are a `list` whose iteration resolves them; the mid residual resolves in `+`. Only
    this UNet contract is relied on (diffusers' `UNet2DConditionModel.forward`; tested against it).
    """

    def __init__(self, resolve: Callable[[], Residuals]) -> None:
        self._resolve = resolve
        self._value: Residuals | None = None

    def value(self) -> Residuals:
        if self._value is None:
            self._value = self._resolve()
        return self._value

    def down(self) -> list[torch.Tensor]:
        return _DeferredDown(self)

    def mid(self) -> torch.Tensor:
        return cast(torch.Tensor, _DeferredMid(self))


class _DeferredDown(list):  # type: ignore[type-arg]
    def __init__(self, owner: Deferred) -> None:
        super().__init__()
        self._owner = owner

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._owner.value()[0])

    def __len__(self) -> int:
        return len(self._owner.value()[0])

    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        return self._owner.value()[0][i]


class _DeferredMid:
    def __init__(self, owner: Deferred) -> None:
        self._owner = owner

    def __radd__(self, other: torch.Tensor) -> torch.Tensor:
        return other + self._owner.value()[1]

    def __add__(self, other: torch.Tensor) -> torch.Tensor:
        return self._owner.value()[1] + other


class ControlNetExtension:
    """Runs the registered ControlNets for the requests that ask for them; inert for the others."""

    def __init__(self, backbone: Backbone, registry: ControlNetRegistry, executor: ControlExecutor | None = None,
                 ) -> None:
        self.backbone = backbone
        self.registry = registry
        self.executor: ControlExecutor = executor or InlineExecutor()
        c, h, w = backbone.latent_shape(256, 256)
        self.vae_scale_factor = 256 // w
        self._states: weakref.WeakKeyDictionary[RequestState, ControlState] = weakref.WeakKeyDictionary()
        #: Counters for tests and the benchmark: net runs, rows run, prefetches used / submitted.
        self.stats: dict[str, int] = {"runs": 0, "rows": 0, "prefetched": 0, "prefetch_used": 0}

    @property
    def controlnet_registry(self) -> ControlNetRegistry:
        """What the worker's HTTP layer lists and checks names against (`spec.registered`)."""
        return self.registry

    def close(self) -> None:
        self.executor.shutdown()

    def control_state(self, state: RequestState) -> ControlState | None:
        return self._states.get(state)

    # -- runner.Extension ------------------------------------------------------------------------
    def prepare(self, state: RequestState) -> None:
        specs = state.params.controlnet
        if not specs:
            return
        params, device, dtype = state.params, state.latents.device, state.latents.dtype
        controls = []
        for spec in specs:
            if spec.name not in self.registry:
                raise KeyError(f"ControlNet {spec.name!r} is not registered")
            image = control_image(spec.image, params.width, params.height, self.vae_scale_factor, device, dtype)
            controls.append(ActiveControl(spec.name, image, float(spec.conditioning_scale),
                                          float(spec.guidance_start), float(spec.guidance_end)))
        self._states[state] = ControlState(controls)
        # Its steps cost a net's run more: the engine learns their cost apart (`costmodel`).
        state.cost_variant = CONTROLNET_VARIANT

    def denoising(self, batch: Sequence[RequestState]) -> AbstractContextManager[None]:
        return nullcontext()

    def after_step(self, state: RequestState, latents: torch.Tensor) -> torch.Tensor:
        if self.executor.overlaps:
            self._prefetch(state, latents)
        return latents

    def finish(self, state: RequestState, decode: Callable[[], ImageBatch]) -> ImageBatch | None:
        cs = self._states.pop(state, None)
        if cs is not None:
            cs.prefetched.clear()
        return None

    # -- runner.InputExtension -------------------------------------------------------------------
    def denoiser_inputs(self, batch: Sequence[RequestState], sample: torch.Tensor, timestep: torch.Tensor,
                        cond: Mapping[str, torch.Tensor]) -> DenoiserExtras:
        """The batch's residuals: each net on its due rows only, summed per row, zeros elsewhere."""
        due: list[tuple[torch.Tensor, Future[Residuals]]] = []
        groups: dict[str, list[tuple[int, int, ActiveControl]]] = {}
        offset = 0
        for r in batch:
            rows = r.unet_rows
            cs = self._states.get(r)
            if cs is not None:
                total = len(r.timesteps)
                for j, c in enumerate(cs.controls):
                    pre = cs.prefetched.pop(j, None)
                    if not window_active(r.step_index, total, c.start, c.end):
                        continue  # not due: nothing to run, nothing to wait for
                    if pre is not None and pre.step == r.step_index and pre.latents is r.latents:
                        due.append((torch.arange(offset, offset + rows, device=sample.device), pre.future))
                        self.stats["prefetch_used"] += 1
                    else:
                        groups.setdefault(c.name, []).append((offset, rows, c))
                cs.prefetched.clear()  # anything left over is stale
            offset += rows
        for name, parts in groups.items():
            idx = torch.cat([torch.arange(o, o + k, device=sample.device) for o, k, _ in parts])
            image = torch.cat([c.image.expand(k, -1, -1, -1) for _, k, c in parts])
            scales = torch.cat([torch.full((k,), c.scale) for _, k, c in parts])
            sub = {key: v.index_select(0, idx) for key, v in cond.items()}
            due.append((idx, self._submit(name, sample.index_select(0, idx), timestep.index_select(0, idx), sub,
                                          image, scales)))
        if not due:
            return {}
        rows = int(sample.shape[0])
        if not self.executor.overlaps:
            down, mid = gather(due, rows)
            return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        deferred = Deferred(lambda: gather(due, rows))
        return {"down_block_additional_residuals": deferred.down(), "mid_block_additional_residual": deferred.mid()}

    # -- internals -------------------------------------------------------------------------------
    def _submit(self, name: str, sample: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor],
                image: torch.Tensor, scales: torch.Tensor) -> Future[Residuals]:
        net = self.registry.net(name)
        self.stats["runs"] += 1
        self.stats["rows"] += int(sample.shape[0])
        return self.executor.submit(lambda: run_net(net, sample, timestep, cond, image, scales))

    def _prefetch(self, state: RequestState, latents: torch.Tensor) -> None:
        """Submit `state`'s next-step runs now, from its new latents (see the module docstring)."""
        cs = self._states.get(state)
        nxt = state.step_index + 1
        if cs is None or nxt >= len(state.timesteps):
            return
        todo = [(j, c) for j, c in enumerate(cs.controls)
                if window_active(nxt, len(state.timesteps), c.start, c.end)]
        if not todo:
            return
        t = state.timesteps[nxt]
        x = state.scheduler.scale_model_input(latents, t)
        copies = 2 if state.guided else 1
        rows = copies * state.images
        sample = torch.cat([x] * copies) if copies > 1 else x
        tf = t.float() if torch.is_tensor(t) else torch.tensor(float(t))
        timestep = tf.to(x.device).expand(rows)
        parts = [state.conditioning.negative, state.conditioning.positive] if state.guided else \
            [state.conditioning.positive]
        cond = {k: torch.cat([p[k] for p in parts if p is not None]) for k in state.conditioning.positive}
        for j, c in todo:
            future = self._submit(c.name, sample, timestep, cond, c.image.expand(rows, -1, -1, -1),
                                  torch.full((rows,), c.scale))
            cs.prefetched[j] = Prefetch(nxt, latents, future)
            self.stats["prefetched"] += 1
