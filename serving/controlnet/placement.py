"""Where a ControlNet runs: inline on the step loop, or on an executor that overlaps with it.

Katz ("ControlNet-as-a-Service") takes most of its latency win from running ControlNets apart
from the base model, so their time overlaps with the base model's instead of adding to it. A
request's ControlNet input for step i+1 (its latents, its timestep, its conditioning) is known as
soon as its scheduler finished step i, so its residuals can be computed while the loop does
everything else before the next UNet call: other requests' steps of another latent shape,
prompt encodings and decodes (inline on a CPU), planning. The step loop then waits only for
residuals that are due in the call it is about to make, and never for those of a request that is
paused, in another batch, or outside its guidance window (`extension.ControlNetExtension`).

An executor is anything with `submit(fn) -> Future` (`ControlExecutor`): `InlineExecutor` runs
the job at once on the caller's thread (the CPU default: on two cores a second thread only takes
time from the UNet), `ThreadExecutor` on one worker thread (another device's stream, or a remote
ControlNet service, would slot in here). Tests use a deliberately slow fake one.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol, TypeVar

T = TypeVar("T")


class ControlExecutor(Protocol):
    """Runs ControlNet jobs; `overlaps` says whether submitting ahead of need pays off."""

    #: True when a submitted job runs beside the caller (so jobs are submitted a step ahead).
    overlaps: bool

    def submit(self, fn: Callable[[], T]) -> Future[T]: ...

    def shutdown(self) -> None: ...


class InlineExecutor:
    """Runs each job at once on the calling (step loop) thread: no overlap, no extra thread."""

    overlaps = False

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn())
        except BaseException as exc:  # delivered where the result is waited for, like a pool's
            future.set_exception(exc)
        return future

    def shutdown(self) -> None:
        pass


class ThreadExecutor:
    """Runs jobs on one worker thread beside the step loop (FIFO, so a step's jobs finish in order)."""

    overlaps = True

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="stepfleet-controlnet")

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        return self._pool.submit(fn)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def make_executor(placement: str) -> ControlExecutor:
    """The executor for `--controlnet-placement` (`inline` or `overlap`)."""
    if placement == "inline":
        return InlineExecutor()
    if placement == "overlap":
        return ThreadExecutor()
    raise ValueError(f"unknown ControlNet placement {placement!r}; choose inline or overlap")
