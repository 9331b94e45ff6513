"""Live-run helpers every benchmark shares: open-loop arrivals, one-at-a-time serving, timing.

Kept apart from the pure replay and trace modules because these use threads and the clock.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from stepfleet.serving.bench.trace import latency_stats

T = TypeVar("T")


def isolated(fn: Callable[[], T]) -> T:
    """Run `fn` on a new thread, wait, and return its result (or raise its exception).

    Why: each thread that runs torch code on a CPU keeps its own OpenMP pool until it
    exits, and two pools on a small machine slow every later step by about 1.5x (see
    `serving.auxwork`). Running each torch phase of a benchmark on a thread that ends with
    the phase keeps the main thread pool-free, so the live phases (the fifo server thread,
    the engine's loop thread) run under the same conditions the cost table was measured in.
    """
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    t = threading.Thread(target=body, name="bench-phase")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


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
