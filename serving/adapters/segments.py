"""Which rows of one denoiser call take which adapter, at what scale: a pure plan.

A step batch lays out each request's rows as the runner builds them (`ModelRunner.
_batch_inputs`): [negative×n, positive×n] when guided, [positive×n] otherwise — both halves
carry the request's adapters, as diffusers' pipeline runs its whole doubled batch through the
LoRA-ed UNet. The plan groups rows by adapter (Punica's segments): each adapter's delta is
computed once, on the rows that use it, and added back to those rows; rows without adapters
appear in no group and pay nothing. A request naming two adapters is in two groups, so its
rows get the sum of both deltas (composition by sum, as `set_adapters([a, b], [wa, wb])`).

No torch here: `serving.adapters.hooks` turns groups into index tensors.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RowGroup:
    """One adapter's rows in the batch, in ascending order, and each row's scale."""

    adapter: Hashable
    rows: tuple[int, ...]
    scales: tuple[float, ...]

    @property
    def span(self) -> tuple[int, int] | None:
        """(start, stop) when the rows are one contiguous run (a slice instead of a gather)."""
        if self.rows and self.rows[-1] - self.rows[0] + 1 == len(self.rows):
            return self.rows[0], self.rows[-1] + 1
        return None

    @property
    def uniform_scale(self) -> float | None:
        """The one scale every row has, when they agree (a Python float, multiplied as PEFT does)."""
        first = self.scales[0]
        return first if all(s == first for s in self.scales) else None


@dataclass(frozen=True)
class Segment:
    """One request's rows in the batch and the adapters (key, scale) it asked for."""

    rows: int
    adapters: Sequence[tuple[Hashable, float]]


def uniform_block(groups: Sequence[RowGroup]) -> tuple[int, int, int] | None:
    """(start, stop, rows per group) when the groups are equal, consecutive runs with one scale each —
    the usual mixed batch (n=1 requests, each its own adapter): then one batched matmul per layer
    serves every group (`hooks`), instead of one per group."""
    if len(groups) < 2 or any(g.span is None or g.uniform_scale is None for g in groups):
        return None
    spans = [g.span for g in groups]
    k = spans[0][1] - spans[0][0]
    for (_, stop), (start, end) in zip(spans, spans[1:], strict=False):
        if start != stop or end - start != k:
            return None
    return spans[0][0], spans[-1][1], k


def plan_groups(segments: Sequence[Segment]) -> tuple[int, tuple[RowGroup, ...]]:
    """(total rows, one group per adapter in order of first use) for consecutive segments."""
    rows: dict[Hashable, list[int]] = {}
    scales: dict[Hashable, list[float]] = {}
    offset = 0
    for seg in segments:
        combined: dict[Hashable, float] = {}
        for key, scale in seg.adapters:  # one adapter named twice: its scales add up
            combined[key] = combined.get(key, 0.0) + float(scale)
        for key, scale in combined.items():
            if scale == 0.0:
                continue
            rows.setdefault(key, []).extend(range(offset, offset + seg.rows))
            scales.setdefault(key, []).extend([float(scale)] * seg.rows)
        offset += seg.rows
    return offset, tuple(RowGroup(k, tuple(rows[k]), tuple(scales[k])) for k in rows)
