"""Live-run helpers every benchmark shares: open-loop arrivals, one-at-a-time serving, timing.

Kept apart from the pure replay and trace modules because these use threads and the clock.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from stepfleet.serving.bench.trace import latency_stats


class Arrival(Protocol):
    arrival_s: float


def drive(trace: Sequence[Arrival], send: Callable[[Any], None]) -> None:
    """Call `send(request)` at each request's arrival time (open loop)."""
    t0 = time.monotonic()
    for r in sorted(trace, key=lambda r: r.arrival_s):
        delay = t0 + r.arrival_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        send(r)


def serve_one_at_a_time(trace: Sequence[Arrival], handle: Callable[[Any], None]) -> dict[str, float]:
    """A plain server: one worker thread runs `handle(request)` first come first served."""
    inbox: queue.Queue[tuple[Any, float] | None] = queue.Queue()
    arrivals: list[float] = []
    finishes: list[float] = []

    def serve() -> None:
        while (item := inbox.get()) is not None:
            r, arrived = item
            handle(r)
            arrivals.append(arrived)
            finishes.append(time.monotonic())

    worker = threading.Thread(target=serve, daemon=True)
    worker.start()
    drive(trace, lambda r: inbox.put((r, time.monotonic())))
    inbox.put(None)
    worker.join()
    return latency_stats(arrivals, finishes)


def interleaved_min(fns: dict[Any, Callable[[], Any]], reps: int) -> dict[Any, float]:
    """Time each callable `reps` times, round-robin, and keep each one's fastest run.

    Round-robin spreads a slow minute over all candidates alike, and the minimum is the
    figure least disturbed by other processes on a shared 2-core machine.
    """
    best = {k: float("inf") for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best
