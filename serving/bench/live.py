"""Live-run helpers every benchmark shares: open-loop arrivals, one-at-a-time serving, timing.

Kept apart from the pure replay and trace modules because these use threads and the clock.
"""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

from stepfleet.serving.bench.trace import live_stats

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


def serve_one_at_a_time(trace: Sequence[Arrival], handle: Callable[[Any], None]) -> dict[str, object]:
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
    return live_stats(arrivals, finishes)


def serve_dynamic_batches(
    trace: Sequence[Arrival],
    run_group: Callable[[list[Any]], None],
    group_key: Callable[[Any], Hashable],
    max_batch: int,
    wait_s: float = 0.1,
) -> dict[str, object]:
    """A server with the dynamic batching of Ray Serve's `@serve.batch` and LitServe.

    One worker thread takes the first waiting request, then collects more until it holds
    `max_batch` or `wait_s` has passed since it took the first (Ray Serve's
    `batch_wait_timeout_s`, LitServe's `batch_timeout`; a backlog fills the batch at once).
    The batch is split into groups that one pipeline call can serve (`group_key`: equal step
    counts), and each group runs to completion as one call, `run_group(requests)`; its
    requests finish when that call returns. Then the next batch is collected.
    """
    inbox: queue.Queue[tuple[Any, float] | None] = queue.Queue()
    arrivals: list[float] = []
    finishes: list[float] = []

    def serve() -> None:
        closing = False
        while not closing:
            first = inbox.get()
            if first is None:
                return
            batch = [first]
            started = time.monotonic()
            while len(batch) < max_batch:
                try:
                    item = inbox.get(timeout=max(0.0, started + wait_s - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                    break
                batch.append(item)
            groups: dict[Hashable, list[tuple[Any, float]]] = {}
            for item in batch:
                groups.setdefault(group_key(item[0]), []).append(item)
            for group in groups.values():
                run_group([r for r, _ in group])
                done = time.monotonic()
                arrivals.extend(arrived for _, arrived in group)
                finishes.extend(done for _ in group)

    worker = threading.Thread(target=serve, daemon=True)
    worker.start()
    drive(trace, lambda r: inbox.put((r, time.monotonic())))
    inbox.put(None)
    worker.join()
    return live_stats(arrivals, finishes)


@contextlib.contextmanager
def cpu_noise(enabled: bool = True) -> Iterator[int | None]:
    """A CPU-bound competing process on one core while the block runs (`bench engine --noise`).

    Why: the figures that matter come from shared machines, where another process takes a
    core for minutes; a policy tuned by one quiet timing lost to request-level batching there
    (issue 21). A busy loop pinned to the last core we may use is the simplest such neighbour.
    Yields its pid (None when disabled).
    """
    if not enabled:
        yield None
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if cores:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(proc.pid, {cores[-1]})
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
