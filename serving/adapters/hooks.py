"""Unmerged, per-row LoRA inside one batched denoiser call.

Each LoRA-ed `Linear`/`Conv2d` of the denoiser gets a forward hook once (when the first
adapter touching it is placed on the device). The base layer runs as always, once, for every
row of the batch; while a plan is active (`active`), the hook adds, for each adapter group of
the plan that has a layer here, `up(down(x[rows])) * scale` to those rows of the output — a
slice when the rows are contiguous, a gather/index-add otherwise. Outside `active` the hook
returns at once, so requests without adapters cost one attribute read per hooked module.

Nothing is merged into the base weights and nothing is patched per request: the base weight
tensor is shared by every row, which is what lets rows with different adapters share a step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from stepfleet.serving.adapters.lora import LoraWeights


@dataclass(frozen=True)
class ActiveGroup:
    """One adapter's rows of the current call, ready for the hooks."""

    weights: LoraWeights
    span: tuple[int, int] | None  # contiguous rows, or None (use `index`)
    index: torch.Tensor  # (k,) long, the rows
    scale: float | torch.Tensor  # one scale, or (k,) per row


@dataclass(frozen=True)
class ActivePlan:
    rows: int
    groups: tuple[ActiveGroup, ...]
    #: (start, stop, rows per group) when the groups are equal consecutive runs (`segments.uniform_block`).
    block: tuple[int, int, int] | None = None

    @property
    def key(self) -> tuple:
        """What the stacked weights of a block depend on (the weights objects themselves, kept alive by it)."""
        return tuple((g.weights, g.scale) for g in self.groups)


class RowMismatch(RuntimeError):
    """A hooked module saw a batch of another size than the plan's (e.g. a masked-compute edit in the
    same call): the engine then retries each request alone, where the sizes agree."""


class LoraHooks:
    """The forward hooks on one denoiser's LoRA-ed modules."""

    def __init__(self, denoiser: torch.nn.Module) -> None:
        self.denoiser = denoiser
        self._handles: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._plan: ActivePlan | None = None
        #: Stacked (down^T, scaled up^T) per layer for the last few block plans: a batch keeps its
        #: composition for many steps, so stacking is paid once per composition, not per step.
        self._stacks: dict[tuple, dict[str, tuple[torch.Tensor, torch.Tensor] | None]] = {}

    @property
    def hooked(self) -> frozenset[str]:
        return frozenset(self._handles)

    def ensure(self, module_names: Iterable[str]) -> None:
        """Hook every named module not hooked yet (names were checked by `lora.parse_lora`)."""
        for name in module_names:
            if name not in self._handles:
                module = self.denoiser.get_submodule(name)
                self._handles[name] = module.register_forward_hook(self._hook(name))

    def close(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()

    @contextmanager
    def active(self, plan: ActivePlan) -> Iterator[None]:
        self._plan = plan
        try:
            yield
        finally:
            self._plan = None

    def _hook(self, name: str):
        def add_deltas(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            plan = self._plan
            if plan is None or not args:
                return None
            x = args[0]
            if plan.block is not None and self._block(name, plan, x, output):
                return output
            touched = False
            for group in plan.groups:
                layer = group.weights.layers.get(name)
                if layer is None:
                    continue
                if x.shape[0] != plan.rows:
                    raise RowMismatch(f"{name}: {x.shape[0]} rows reached a LoRA-ed layer, the batch has {plan.rows}")
                if group.span is not None:
                    start, stop = group.span
                    xs = x[start:stop]
                else:
                    xs = x.index_select(0, group.index)
                if isinstance(group.scale, float):
                    factor: float | torch.Tensor = group.scale * layer.scaling  # as PEFT's `scale * alpha / r`
                else:
                    factor = (group.scale * layer.scaling).view(-1, *([1] * (output.ndim - 1)))
                if group.span is not None and layer.stride is None and isinstance(factor, float) \
                        and output.is_contiguous():
                    # The common case in one fused op: out[rows] += factor * (x A^T) B^T.
                    hidden = torch.nn.functional.linear(xs, layer.down)
                    out = output[start:stop].view(-1, output.shape[-1])
                    out.addmm_(hidden.reshape(-1, hidden.shape[-1]), layer.up.t(), alpha=factor)
                elif group.span is not None:
                    output[start:stop] += layer.delta(xs) * factor
                else:
                    output.index_add_(0, group.index, layer.delta(xs) * factor)
                touched = True
            return output if touched else None

        return add_deltas

    def _block(self, name: str, plan: ActivePlan, x: torch.Tensor, output: torch.Tensor) -> bool:
        """Every group's delta in two batched matmuls (Punica's segmented GEMM, for equal segments);
        False when this layer does not suit (a group without it, convs, mixed ranks)."""
        assert plan.block is not None
        stacks = self._stacks.get(plan.key)
        if stacks is None:
            while len(self._stacks) >= 2:
                self._stacks.pop(next(iter(self._stacks)))
            stacks = self._stacks[plan.key] = {}
        if name not in stacks:
            layers = [g.weights.layers.get(name) for g in plan.groups]
            ok = all(la is not None and la.stride is None for la in layers) and \
                len({la.down.shape for la in layers if la is not None}) == 1
            stacks[name] = None if not ok else (
                torch.stack([la.down.t() for la in layers]),  # (G, in, r)
                torch.stack([la.up.t() * (float(g.scale) * la.scaling) for g, la in zip(plan.groups, layers,
                                                                                       strict=True)]),  # (G, r, out)
            )
        stacked = stacks[name]
        if stacked is None or not output.is_contiguous():
            return False
        if x.shape[0] != plan.rows:
            raise RowMismatch(f"{name}: {x.shape[0]} rows reached a LoRA-ed layer, the batch has {plan.rows}")
        start, stop, _ = plan.block
        downs, ups = stacked
        g = downs.shape[0]
        hidden = torch.bmm(x[start:stop].reshape(g, -1, downs.shape[1]), downs)
        output[start:stop].view(g, -1, output.shape[-1]).baddbmm_(hidden, ups)
        return True
