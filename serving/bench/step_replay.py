"""Step-level batching replayed on measured step costs: the loop the add-on benchmarks share.

The LoRA and ControlNet benchmarks (`lora_replay`, `controlnet_replay`) compare stepfleet's
mixed step batches with a server that batches only requests of one *group* (one adapter
state, one ControlNet set), as the peers do. Both are this loop with different costs: requests
join the running batch at step boundaries up to `max_batch`; with `group`, a batch admits only
requests of the group of the first one waiting when the batch was empty, paying
`switch_cost(old, new)` to change groups (merging a LoRA, say). Pure: a discrete-event
replay, no clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar


class Arriving(Protocol):
    @property
    def arrival(self) -> float: ...


R = TypeVar("R", bound=Arriving)


@dataclass
class _Running:
    req: Arriving
    steps_left: int


def replay(reqs: Sequence[R], steps: int, max_batch: int, step_cost: Callable[[Sequence[R]], float], *,
           group: Callable[[R], Hashable] | None = None,
           switch_cost: Callable[[Hashable, Hashable], float] = lambda old, new: 0.0,
           initial_group: Hashable = None) -> list[float]:
    """Each request's latency (completion − arrival), in completion order.

    `step_cost(running)` is the seconds of one step of that batch; `group` (None: mix freely)
    keys what may share a batch.
    """
    waiting: deque[R] = deque()
    pending = deque(sorted(reqs, key=lambda r: r.arrival))
    running: list[_Running] = []
    latencies: list[float] = []
    t, current = 0.0, initial_group
    while pending or waiting or running:
        while pending and pending[0].arrival <= t:
            waiting.append(pending.popleft())
        if not running and not waiting:
            t = pending[0].arrival
            continue
        if group is not None and not running and waiting and group(waiting[0]) != current:
            new = group(waiting[0])
            t += switch_cost(current, new)
            current = new
        while waiting and len(running) < max_batch and (group is None or group(waiting[0]) == current):
            running.append(_Running(waiting.popleft(), steps))
        t += step_cost([r.req for r in running])  # type: ignore[misc]
        for r in running:
            r.steps_left -= 1
        for r in [r for r in running if r.steps_left == 0]:
            latencies.append(t - r.req.arrival)
            running.remove(r)
    return latencies
