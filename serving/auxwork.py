"""Where the engine runs prompt encoding and VAE decoding: beside the step loop, or inside it.

Why two modes. On a GPU the auxiliary work is mostly host-side (tokenising, PIL
conversion) plus kernels queued on the device, so a separate thread overlaps it with the
step loop. On a CPU it is the opposite: every thread that runs a parallel torch op gets its
own OpenMP thread pool, and libgomp stops spin-waiting (it sleeps on a futex between
parallel regions) as soon as the pools together hold more threads than there are cores.
Measured on the 2-core CI machine with tiny-sd at 256x256: a UNet step takes 0.10-0.12 s
when one pool exists and 0.15-0.19 s (1.3 cores busy instead of 2) once a second thread
has run torch code — for every step, whether or not that thread is busy. Running the
auxiliary work inline, between steps, keeps one pool in the process; it also costs
nothing in parallelism, because on a CPU the two threads would share the same cores.

`AuxWork` hides the difference from the engine: `submit` either hands a job to one
background thread or queues it for the loop, which calls `run_pending` at each step
boundary.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)

AUX_MODES = ("auto", "inline", "thread")


def resolve_aux_mode(mode: str, device_type: str | None) -> str:
    """`auto` → `inline` on the CPU, `thread` on accelerators (and for runners that don't say)."""
    if mode not in AUX_MODES:
        raise ValueError(f"aux mode must be one of {AUX_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    return "inline" if device_type == "cpu" else "thread"


class AuxWork:
    """Jobs the step loop must not wait for (thread mode) or must run itself (inline mode)."""

    def __init__(self, mode: str, wake: Callable[[], None]) -> None:
        self.mode = mode
        self._wake = wake  # tells the loop there is something to do (inline mode)
        self._jobs: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stepfleet-aux") if mode == "thread" else None

    @property
    def inline(self) -> bool:
        return self._pool is None

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._pool is not None:
            self._pool.submit(fn, *args)
            return
        with self._lock:
            self._jobs.append((fn, args))
        self._wake()

    def pending(self) -> int:
        with self._lock:
            return len(self._jobs)

    def run_pending(self) -> int:
        """Run the queued jobs (inline mode; called by the loop thread); returns how many ran."""
        ran = 0
        while True:
            with self._lock:
                if not self._jobs:
                    return ran
                fn, args = self._jobs.popleft()
            try:
                fn(*args)
            except Exception:  # jobs report their own failures; this guards the loop itself
                log.exception("auxiliary job failed")
            ran += 1

    def shutdown(self) -> None:
        """Finish what was handed over: wait for the thread, or run the rest of the queue here."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=False)
        else:
            self.run_pending()
