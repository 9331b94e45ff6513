"""LoRA as a runner extension: each request's adapters applied to its own rows of a shared step.

Hooks (`runner.Extension`):

- `prepare`: a request with `params.lora` pins its adapters in the registry (a lease each,
  released when its state is dropped, so an adapter in use is never evicted) and starts
  loading any that is not on the device;
- `denoising`: builds the step's row plan (`segments.plan_groups`) from every request's
  adapters that have landed on the device, hooks their modules (`hooks.LoraHooks`, on the
  loop thread, so hooks never change under a running forward), and activates the plan
  around the one denoiser call. A `bounded` request whose adapter is still loading runs
  without it and counts the step (`LoraReport.steps_without`) — but at step `max_unloaded_steps`
  it waits for the load (the batch waits with it: the bound is what keeps the image close to
  the adapter's). A load that failed fails only the requests that asked for it (raised here,
  before the call; the engine then retries the others without them).
- `finish`: the request's pins are released (the decode needs no adapter); a request that
  fails or is cancelled releases them when its state is dropped.
- `after_step`: nothing.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Protocol

import torch

from stepfleet.serving.adapters.hooks import ActiveGroup, ActivePlan, LoraHooks
from stepfleet.serving.adapters.lora import LoraWeights
from stepfleet.serving.adapters.segments import Segment, plan_groups, uniform_block

if TYPE_CHECKING:
    from stepfleet.serving.contracts import ImageBatch
    from stepfleet.serving.runner import RequestState


_NO_INDEX = torch.empty(0, dtype=torch.long)


class Lease(Protocol):
    """A pinned adapter (`registry.AdapterRegistry.acquire`)."""

    name: str

    def landed(self) -> LoraWeights | None:
        """The device copy once loaded, else None; raises the load's error if it failed."""
        ...

    def wait(self, timeout: float | None = None) -> LoraWeights:
        """Block until loaded (raises the load's error, or TimeoutError)."""
        ...

    def release(self) -> None: ...


class AdapterSource(Protocol):
    def acquire(self, name: str) -> Lease:
        """Pin `name` and start loading it to the device if it is not there (KeyError: unknown)."""
        ...


class LoraRequest:
    """One request's leases and scales, beside its `RequestState`."""

    def __init__(self, leases: list[tuple[Lease, float]], bounded: bool) -> None:
        self.leases = leases
        self.bounded = bounded
        self.all_landed = False

    def release(self) -> None:
        for lease, _ in self.leases:
            lease.release()
        self.leases = []


class LoraExtension:
    """Per-row LoRA on a backbone's denoiser; adapters come from `source` (the registry)."""

    def __init__(self, denoiser: torch.nn.Module, source: AdapterSource, max_unloaded_steps: int = 2,
                 wait_timeout_s: float = 600.0) -> None:
        """`max_unloaded_steps`: the K of bounded loading — a request runs at most K steps before its
        adapters are in; `wait_timeout_s`: how long a step waits for a load before the request fails."""
        self.hooks = LoraHooks(denoiser)
        self.source = source
        self.max_unloaded_steps = max_unloaded_steps
        self.wait_timeout_s = wait_timeout_s
        self._states: weakref.WeakKeyDictionary[RequestState, LoraRequest] = weakref.WeakKeyDictionary()
        self._hooked: weakref.WeakSet[LoraWeights] = weakref.WeakSet()  # adapters whose modules have hooks

    def close(self) -> None:
        self.hooks.close()

    def prepare(self, state: RequestState) -> None:
        spec = state.params.lora
        if spec is None or not spec.adapters:
            return
        leases: list[tuple[Lease, float]] = []
        try:
            for ref in spec.adapters:
                leases.append((self.source.acquire(ref.name), float(ref.scale)))
        except BaseException:
            for lease, _ in leases:
                lease.release()
            raise
        own = LoraRequest(leases, bounded=spec.wait == "bounded")
        self._states[state] = own
        weakref.finalize(state, own.release)

    def denoising(self, batch: Sequence[RequestState]) -> AbstractContextManager[None]:
        segments: list[Segment] = []
        used: dict[int, LoraWeights] = {}  # id → weights: groups are keyed by identity
        for r in batch:
            own = self._states.get(r)
            adapters: list[tuple[int, float]] = []
            if own is not None:
                for weights, scale in self._landed(r, own):
                    used[id(weights)] = weights
                    adapters.append((id(weights), scale))
            segments.append(Segment(r.unet_rows, adapters))
        if not used:  # no request of this step has an adapter on the device: plain step
            return nullcontext()
        rows, groups = plan_groups(segments)
        device = next(iter(batch)).latents.device
        active = []
        for g in groups:
            weights = used[int(g.adapter)]
            if weights not in self._hooked:
                self.hooks.ensure(weights.layers)
                self._hooked.add(weights)
            span = g.span
            # A run of rows is sliced; only scattered rows need an index tensor (a copy to the device).
            index = torch.tensor(g.rows, dtype=torch.long, device=device) if span is None else _NO_INDEX
            uniform = g.uniform_scale
            scale: float | torch.Tensor = uniform if uniform is not None else torch.tensor(
                g.scales, device=device, dtype=next(iter(weights.layers.values())).down.dtype)
            active.append(ActiveGroup(weights, span, index, scale))
        return self.hooks.active(ActivePlan(rows, tuple(active), uniform_block(groups)))

    def _landed(self, state: RequestState, own: LoraRequest) -> list[tuple[LoraWeights, float]]:
        """The request's adapters that are on the device now (waiting for them when it must)."""
        spec = state.params.lora
        assert spec is not None
        must_wait = not own.bounded or state.step_index >= self.max_unloaded_steps
        out: list[tuple[LoraWeights, float]] = []
        missing = False
        for lease, scale in own.leases:
            weights = lease.landed()
            if weights is None and must_wait:
                t0 = time.perf_counter()
                weights = lease.wait(self.wait_timeout_s)
                spec.report.waited_s += time.perf_counter() - t0
            if weights is None:
                missing = True
            else:
                out.append((weights, scale))
        if missing:
            spec.report.steps_without += 1
        return out

    def after_step(self, state: RequestState, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def finish(self, state: RequestState, decode: Callable[[], ImageBatch]) -> ImageBatch | None:
        own = self._states.get(state)
        if own is not None:  # denoising is over: unpin now (a failed request's pins go with its state)
            own.release()
        return None
