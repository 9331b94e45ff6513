"""When to be in cost mode and when in capacity mode.

Enter capacity mode as soon as a pool the cost plan relies on is short: the cost plan
wants more replicas there than are ready, and the pool cannot get them. A short pool the
plan does not need more of changes nothing (it is noted, not acted on).

Leave only when every pool seen short has shown capacity again for a recovery window, and
a minimum dwell time has passed since entering. Both guard against flapping: capacity
often returns briefly before it returns for good, and a switch starts model loads that take
minutes — switching back before they finish wastes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from .model import ControlSettings, Mode, ModeSetting, PolicyState, PoolMemory
from .pools import PoolView


def track_shortages(state: PolicyState, pools: tuple[PoolView, ...],
                    now_s: float) -> dict[str, PoolMemory]:
    """Update each pool's memory: when it went short, and since when it shows capacity."""
    memories: dict[str, PoolMemory] = {}
    for pool in pools:
        memory = state.memory(pool.name)
        if pool.short_since is not None:
            since = pool.short_since if memory.short_since is None else memory.short_since
            memory = replace(memory, short_since=min(since, pool.short_since),
                             recovered_since=None)
        elif memory.short_since is not None and memory.recovered_since is None:
            memory = replace(memory, recovered_since=now_s)
        memories[pool.name] = memory
    return memories


@dataclass(frozen=True)
class ModeDecision:
    mode: Mode
    since_s: float
    changed: bool
    #: Pools the capacity plan must not rely on (seen short and not yet trusted again).
    short: frozenset[str]
    reasons: tuple[str, ...]
    #: Pools whose shortage memory is settled and can be forgotten.
    forget: frozenset[str]


def choose_mode(
    setting: ModeSetting,
    state: PolicyState,
    memories: Mapping[str, PoolMemory],
    pools: tuple[PoolView, ...],
    cost_targets: Mapping[str, int],
    now_s: float,
    control: ControlSettings,
) -> ModeDecision:
    since = now_s if state.mode_since_s is None else state.mode_since_s
    remembered = frozenset(n for n, m in memories.items() if m.short_since is not None)
    short_now = frozenset(p.name for p in pools if p.short_since is not None)

    if setting == "cost":
        return _switch(state.mode, "cost", since, now_s, frozenset(), remembered,
                       ("mode forced to cost by spec",))
    if setting == "capacity":
        return _switch(state.mode, "capacity", since, now_s, short_now, frozenset(),
                       ("mode forced to capacity by spec",))

    if state.mode == "cost":
        relied = sorted(p.name for p in pools
                        if p.name in short_now and cost_targets.get(p.name, 0) > p.ready)
        if relied:
            why = tuple(
                f"entering capacity mode: {p.name} short since t={p.short_since:.0f}s and the "
                f"cost plan needs {cost_targets[p.name]} replicas there, {p.ready} ready"
                for p in pools if p.name in relied and p.short_since is not None)
            return ModeDecision("capacity", now_s, True, short_now, why, frozenset())
        noted = tuple(f"{p.name} short since t={p.short_since:.0f}s; the cost plan needs no "
                      f"more of it ({cost_targets.get(p.name, 0)} wanted, {p.ready} ready)"
                      for p in pools if p.name in short_now and p.short_since is not None)
        recovered = frozenset(n for n in remembered if n not in short_now)
        return ModeDecision("cost", since, False, frozenset(), noted, recovered)

    # In capacity mode: wait for every remembered shortage to recover, and for the dwell.
    waiting: list[str] = []
    for name in sorted(remembered):
        memory = memories[name]
        if memory.recovered_since is None:
            waiting.append(f"{name} still short (since t={memory.short_since:.0f}s)")
        elif now_s - memory.recovered_since < control.recovery_window_s:
            left = control.recovery_window_s - (now_s - memory.recovered_since)
            waiting.append(f"{name} shows capacity since t={memory.recovered_since:.0f}s, "
                           f"{left:.0f}s of the {control.recovery_window_s:.0f}s recovery "
                           "window left")
    dwell_left = control.dwell_s - (now_s - since)
    if dwell_left > 0:
        waiting.append(f"{dwell_left:.0f}s of the {control.dwell_s:.0f}s dwell time left")
    if waiting:
        return ModeDecision("capacity", since, False, remembered,
                            tuple("staying in capacity mode: " + w for w in waiting),
                            frozenset())
    names = ", ".join(sorted(remembered)) or "no pool"
    return ModeDecision(
        "cost", now_s, True, frozenset(),
        (f"leaving capacity mode: {names} showed capacity for "
         f"{control.recovery_window_s:.0f}s and the {control.dwell_s:.0f}s dwell passed",),
        remembered)


def _switch(current: Mode, target: Mode, since: float, now_s: float, short: frozenset[str],
            forget: frozenset[str], reasons: tuple[str, ...]) -> ModeDecision:
    if current == target:
        return ModeDecision(target, since, False, short, reasons, forget)
    return ModeDecision(target, now_s, True, short, reasons, forget)
