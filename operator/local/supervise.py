"""Supervision as a pure function: the workers wanted per pool vs the workers there are.

`reconcile(desired, workers, now_s)` returns the actions that move the fleet toward what
the control loop wants, and nothing else: it starts no process and reads no clock, so a
crash, a scale-down during a start or a crash loop is a table in a test.

Rules:

- A worker that exited while it was meant to run *crashed*: it is restarted under the same
  name (so the user can follow it in the log) after a backoff that doubles with each restart
  since it was last ready (0.5 s, 1 s, 2 s, ... at most `MAX_BACKOFF_S`), unless the pool no
  longer needs it, in which case it is forgotten.
- A worker that exited after being asked to stop is forgotten.
- Missing workers are started under fresh names `POOL-N`.
- Excess workers are stopped, those not ready first, then the newest: a ready worker has
  paid its model load, a starting one has not yet.
- Stopping workers count for nothing: they have left the router and are draining.
- A ready worker that stops answering (`liveness`: the router's rule) is *hung*: it is taken
  out of the router and killed with SIGKILL (a stopped process cannot act on SIGTERM), then
  restarted like a crash; `hangs` counts how often, over the worker's life.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from .liveness import HangRule, PollResult, is_hung, silent_polls_after

#: starting: process up, model loading; ready: `/readyz` answered 200; stopping: asked to stop
#: (SIGTERM sent), draining; crashed: exited on its own; stopped: exited after a stop.
Phase = Literal["starting", "ready", "stopping", "crashed", "stopped"]

#: Longest wait before restarting a crashed worker.
MAX_BACKOFF_S = 30.0
#: First restart delay; doubles with each restart since the worker was last ready.
FIRST_BACKOFF_S = 0.5


@dataclass(frozen=True)
class WorkerView:
    """One worker as the supervisor sees it (the process layer keeps the Popen)."""

    name: str
    pool: str
    phase: Phase
    #: When the current process started (epoch seconds).
    started_s: float
    url: str | None = None
    pid: int | None = None
    exited_s: float | None = None
    exit_code: int | None = None
    #: Restarts since the worker was last ready (reset when it becomes ready).
    restarts: int = 0
    #: Since when the worker has been meant to serve but not ready (None while ready).
    unready_since_s: float | None = None
    #: Liveness polls in a row this process left unanswered (ready workers only).
    silent_polls: int = 0
    #: The current process was found hung (and is being killed).
    hung: bool = False
    #: Times this worker was found hung and restarted, over its whole life (never reset).
    hangs: int = 0

    @property
    def live(self) -> bool:
        return self.phase in ("starting", "ready")


@dataclass(frozen=True)
class Start:
    """Start a worker process; `restarts` > 0 replaces a crashed one of the same name."""

    pool: str
    name: str
    reason: str
    restarts: int = 0
    #: Carried over from the crashed process, so "never becomes ready" spans restarts.
    unready_since_s: float | None = None
    #: Carried over: times the worker was found hung.
    hangs: int = 0


@dataclass(frozen=True)
class Stop:
    """Take a worker out of the router and ask it to finish its work and exit (SIGTERM)."""

    name: str
    reason: str


@dataclass(frozen=True)
class Forget:
    """Drop an exited worker's record."""

    name: str
    reason: str


@dataclass(frozen=True)
class Kill:
    """A hung worker: out of the router, SIGKILL; its exit then counts as a crash (restarted)."""

    name: str
    reason: str


Action = Start | Stop | Forget | Kill


def restart_delay_s(restarts: int) -> float:
    """Backoff before the next restart, given restarts so far since last ready."""
    return min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2.0 ** max(0, restarts))


def _exit_text(code: int | None, hung: bool = False) -> str:
    if hung:
        return "was hung (answered no liveness poll) and was killed"
    if code is None:
        return "exited"
    if code < 0:
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _next_names(pool: str, taken: Iterable[str], count: int) -> list[str]:
    taken = set(taken)
    out: list[str] = []
    n = 1
    while len(out) < count:
        name = f"{pool}-{n}"
        if name not in taken:
            out.append(name)
        n += 1
    return out


def reconcile(desired: Mapping[str, int], workers: Sequence[WorkerView], now_s: float) -> tuple[Action, ...]:
    """Actions that bring each pool in `desired` to its number of live workers.

    Pools not in `desired` get no workers (their workers are stopped). A crashed worker
    whose backoff has not passed yet is neither restarted nor replaced: it holds its place.
    """
    actions: list[Action] = []
    names = [w.name for w in workers]
    pools = list(desired) + sorted({w.pool for w in workers} - set(desired))
    for pool in pools:
        want = max(0, int(desired.get(pool, 0)))
        mine = [w for w in workers if w.pool == pool]
        live = [w for w in mine if w.live]
        crashed = sorted((w for w in mine if w.phase == "crashed"), key=lambda w: w.name)
        for w in mine:
            if w.phase == "stopped":
                actions.append(Forget(w.name, f"worker {w.name} stopped"))
            elif w.live and w.hung:
                # It keeps its place: killed now, restarted under its name once it has exited.
                actions.append(Kill(w.name, f"worker {w.name} answered no liveness poll {w.silent_polls} times in "
                                            f"a row: hung; killing it to restart it (hang {w.hangs})"))
        holding = 0  # crashed workers kept (restarting now or after their backoff)
        for w in crashed:
            if len(live) + holding >= want:
                actions.append(Forget(w.name, f"worker {w.name} {_exit_text(w.exit_code, w.hung)}; pool {pool} "
                                              f"needs {want}, not restarting"))
                continue
            holding += 1
            delay = restart_delay_s(w.restarts)
            if w.exited_s is None or now_s >= w.exited_s + delay:
                actions.append(Start(pool, w.name, restarts=w.restarts + 1, hangs=w.hangs,
                                     unready_since_s=w.unready_since_s if w.unready_since_s is not None else now_s,
                                     reason=f"worker {w.name} {_exit_text(w.exit_code, w.hung)}; restarting "
                                            f"(restart {w.restarts + 1})"))
        missing = want - len(live) - holding
        if missing > 0:
            for name in _next_names(pool, names, missing):
                names.append(name)
                actions.append(Start(pool, name, reason=f"pool {pool}: {len(live) + holding} of {want} workers; "
                                                        f"starting {name}"))
        elif missing < 0:
            # Not ready first, then the newest.
            order = sorted(live, key=lambda w: (w.phase == "ready", -w.started_s, w.name))
            for w in order[: -missing]:
                actions.append(Stop(w.name, f"pool {pool}: {len(live)} workers, plan wants {want}; stopping {w.name}"))
    return tuple(actions)


def on_poll(worker: WorkerView, result: PollResult, rule: HangRule) -> WorkerView:
    """The worker's record after a liveness poll; a ready worker silent `rule.polls` times is hung.

    The first time it is found hung, `hangs` counts it (the kill and the restart follow)."""
    if worker.phase != "ready" or worker.hung:
        return worker
    silent = silent_polls_after(worker.silent_polls, result)
    if is_hung(silent, rule):
        return replace(worker, silent_polls=silent, hung=True, hangs=worker.hangs + 1)
    return replace(worker, silent_polls=silent)


def on_exit(worker: WorkerView, exit_code: int | None, now_s: float) -> WorkerView:
    """The worker's record after its process exited: crashed, or stopped if it was stopping."""
    if worker.phase == "stopping":
        return replace(worker, phase="stopped", exited_s=now_s, exit_code=exit_code)
    return replace(worker, phase="crashed", exited_s=now_s, exit_code=exit_code,
                   unready_since_s=worker.unready_since_s if worker.unready_since_s is not None else now_s)


def on_ready(worker: WorkerView) -> WorkerView:
    """The worker's record once `/readyz` answered: ready, its restart count reset."""
    return replace(worker, phase="ready", restarts=0, unready_since_s=None)
