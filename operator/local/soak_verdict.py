"""The soak's verdict from its samples, as pure functions: is memory flat, is anything leaked or lost?

Issue 19's criteria for `stepfleet soak`: no request lost or left hanging past its deadline,
router and worker RSS flat, every leaked-resource counter back to zero once the load stops
and the fleet drains, and the faults injected along the way (a killed and a hung worker)
recovered by the fleet. This module turns what the soak recorded into a pass or fail per
criterion, each with the figures that decided it, so a failed soak says why.

*Flat RSS.* Each process's resident memory is sampled over its life (a restarted worker is a
new process with its own series). The first `warmup_s` of a series are skipped (model load,
allocator pools filling, the first batches of each size); then the baseline is the median of
the next `baseline_s`, and the process is flat when both hold:

- the least-squares slope over the second half of the judged span is at most
  `max_slope_mb_per_min`, or what that slope adds over the second half is within `noise_mb`
  (a short run cannot tell a slow leak from noise, and says so by passing on the noise floor);
- the last sample is within `max(noise_mb, max_growth_ratio × baseline)` of the baseline.

Only processes alive at the end with at least `min_span_s` judged are judged; the others
(the killed worker, one restarted too late) are reported, not judged.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: (seconds since the load started, resident memory in MiB)
Sample = tuple[float, float]


@dataclass(frozen=True)
class FlatRule:
    """When a process's RSS counts as flat; seconds and MiB."""

    #: Skipped at the start of each process's series (model load, first batches).
    warmup_s: float = 60.0
    #: The baseline is the median over this long after the warm-up (less for short series).
    baseline_s: float = 60.0
    #: Growth rate over the second half that counts as a leak.
    max_slope_mb_per_min: float = 1.0
    #: Growth below this is noise (allocator arenas, page cache of the model files).
    noise_mb: float = 8.0
    #: The last sample may exceed the baseline by this share of it (or `noise_mb`, the larger).
    max_growth_ratio: float = 0.05
    #: A process judged over less than this is reported, not judged.
    min_span_s: float = 60.0


@dataclass(frozen=True)
class RssSeries:
    """One process's samples: the router, or one incarnation (pid) of a worker."""

    process: str
    pid: int
    samples: tuple[Sample, ...]
    alive_at_end: bool


def slope_mb_per_min(samples: Sequence[Sample]) -> float | None:
    """Least-squares slope of MiB against minutes; None with fewer than two distinct times."""
    if len(samples) < 2:
        return None
    ts = [t / 60.0 for t, _ in samples]
    ys = [y for _, y in samples]
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((t - mt) ** 2 for t in ts)
    if var == 0:
        return None
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / var


def rss_report(series: RssSeries, rule: FlatRule) -> dict:
    """First/last/max, baseline, slope and growth of one process, and whether it is judged and flat."""
    samples = sorted(series.samples)
    out: dict = {"process": series.process, "pid": series.pid, "alive_at_end": series.alive_at_end,
                 "samples": len(samples)}
    if not samples:
        return {**out, "judged": False, "flat": None, "why": "no samples"}
    values = [y for _, y in samples]
    out.update(first_mb=round(values[0], 1), last_mb=round(values[-1], 1), max_mb=round(max(values), 1))
    start = samples[0][0] + rule.warmup_s
    judged = [(t, y) for t, y in samples if t >= start]
    span = judged[-1][0] - judged[0][0] if len(judged) >= 2 else 0.0
    if len(judged) >= 2:
        base_end = judged[0][0] + min(rule.baseline_s, span / 4)
        baseline = statistics.median([y for t, y in judged if t <= base_end])
        half = [(t, y) for t, y in judged if t >= judged[0][0] + span / 2]
        slope = slope_mb_per_min(half)
        growth = judged[-1][1] - baseline
        out.update(baseline_mb=round(baseline, 1), slope_mb_per_min=None if slope is None else round(slope, 3),
                   growth_mb=round(growth, 1), judged_span_s=round(span, 1))
    if not series.alive_at_end:
        return {**out, "judged": False, "flat": None, "why": "not alive at the end (killed or restarted)"}
    if len(judged) < 2 or span < rule.min_span_s:
        return {**out, "judged": False, "flat": None,
                "why": f"judged span {span:.0f}s < {rule.min_span_s:.0f}s after a {rule.warmup_s:.0f}s warm-up"}
    half_min = span / 2 / 60.0
    slope_ok = slope is None or slope <= rule.max_slope_mb_per_min or slope * half_min <= rule.noise_mb
    growth_ok = growth <= max(rule.noise_mb, rule.max_growth_ratio * baseline)
    why = []
    if not slope_ok:
        why.append(f"slope {slope:.2f} MiB/min > {rule.max_slope_mb_per_min:g} over the second half")
    if not growth_ok:
        why.append(f"last {judged[-1][1]:.0f} MiB is {growth:.1f} MiB over the baseline {baseline:.0f} MiB")
    return {**out, "judged": True, "flat": slope_ok and growth_ok, "why": "; ".join(why) or "flat"}


def nonzero_counters(leaks: Mapping[str, Mapping[str, float]]) -> list[str]:
    """`process.counter=value` for every leak counter not back to zero."""
    return [f"{proc}.{name}={value:g}" for proc, counters in sorted(leaks.items())
            for name, value in sorted(counters.items()) if abs(value) > 1e-9]


@dataclass(frozen=True)
class Criterion:
    passed: bool
    detail: str


def criteria(
    load: Mapping,
    rss: Sequence[Mapping],
    leaks: Mapping[str, Mapping[str, float]] | None,
    faults: Sequence[Mapping],
    *,
    min_served_share: float,
    fleet_exit_code: int | None,
) -> dict[str, Criterion]:
    """Pass or fail per criterion, from the load's summary (`soak_load.Tally.summary`), the RSS
    reports, the leak counters after the drain (None: the drain never finished), and the faults."""
    out: dict[str, Criterion] = {}
    outcomes = load["outcomes"]
    out["no_request_lost"] = Criterion(
        load["lost"] == 0,
        f"{load['lost']} lost of {load['requests']} (hung {outcomes['hung']}, connection errors "
        f"{outcomes['connection_error']}, 5xx without a clear error {outcomes['unclear_5xx']})")
    out["none_past_deadline"] = Criterion(outcomes["late"] == 0, f"{outcomes['late']} answered 200 after their deadline")
    out["served"] = Criterion(
        load["requests"] > 0 and load["served_share"] >= min_served_share,
        f"{outcomes['ok']} of {load['requests']} served within their deadline "
        f"({load['served_share']:.1%}; at least {min_served_share:.0%} wanted)")
    judged = [r for r in rss if r.get("judged")]
    growing = [f"{r['process']} (pid {r['pid']}): {r['why']}" for r in judged if not r.get("flat")]
    router_judged = any(r["process"] == "router" for r in judged)
    worker_judged = any(r["process"] != "router" for r in judged)
    out["rss_flat"] = Criterion(
        not growing and router_judged and worker_judged,
        "; ".join(growing) if growing else
        f"{len(judged)} processes flat" if router_judged and worker_judged else
        "too few samples to judge the router and a worker")
    if leaks is None:
        out["no_leaks"] = Criterion(False, "the fleet did not drain: leak counters not read")
    else:
        left = nonzero_counters(leaks)
        n = sum(len(c) for c in leaks.values())
        out["no_leaks"] = Criterion(not left and n > 0, ", ".join(left) if left else
                                    f"{n} counters at zero over {len(leaks)} processes" if n else "no counters read")
    wanted = [f for f in faults if f.get("injected")]
    unrecovered = [f"{f['kind']} {f.get('worker')}: {f.get('why', 'not recovered')}" for f in faults
                   if not f.get("recovered")]
    out["faults_recovered"] = Criterion(
        bool(wanted) and not unrecovered if faults else True,
        "; ".join(unrecovered) if unrecovered else
        ", ".join(f"{f['kind']} {f['worker']} back in {f['recovered_after_s']:.1f}s" for f in faults) or "no faults asked")
    if fleet_exit_code is not None:
        out["fleet_stopped_cleanly"] = Criterion(fleet_exit_code == 0, f"`stepfleet up` exited with {fleet_exit_code}")
    return out


def verdict(found: Mapping[str, Criterion]) -> bool:
    return all(c.passed for c in found.values())


def summary_text(report: Mapping) -> str:
    """The human summary of a soak report (the JSON `stepfleet soak --json` prints)."""
    lines = []
    cap, load = report.get("capacity") or {}, report["load"]
    lines.append(f"capacity {cap.get('rps', 0):.2f} req/s (closed loop, {cap.get('concurrency')} clients, "
                 f"{cap.get('counted', 0)} answers over {cap.get('measured_s', 0):.0f}s); load {report['config']['load']:g} x = "
                 f"{report['target_rps']:.2f} req/s for {report['config']['duration_s']:g}s, deadline "
                 f"{report['config']['deadline_s']:g}s")
    outcomes = ", ".join(f"{k} {v}" for k, v in load["outcomes"].items() if v)
    lat = load["latency_s"]
    lines.append(f"requests {load['requests']}: {outcomes or 'none'}; retries {load['retries']}; lost {load['lost']}")
    lines.append(f"latency of served: p50 {_s(lat['p50'])}, p95 {_s(lat['p95'])}, max {_s(lat['max'])}")
    hung = report.get("hung_requests") or []
    if hung:
        later = [h for h in hung if h.get("answered_after_s") is not None]
        statuses = sorted({str(h["status"]) for h in later})
        lines.append(f"hung requests followed: {len(hung)}; answered after all: {len(later)} "
                     f"(status {', '.join(statuses) or '-'}, at most "
                     f"{max((h['answered_after_s'] for h in later), default=0):.1f}s after sending); "
                     f"never: {len(hung) - len(later)}")
    lag = report.get("client_loop_lag_s") or {}
    if lag:
        lines.append(f"the soak client's own event-loop lag: p99 {_s(lag.get('p99'))}, max {_s(lag.get('max'))} "
                     "(large values mean the client, not the fleet, may have made answers late)")
    for f in report.get("faults", []):
        lines.append(f"fault {f['kind']} at {f.get('at_s', 0):.0f}s: {f.get('worker')} pid {f.get('pid')} -> "
                     f"{f.get('new_pid')}, " + (f"back in {f['recovered_after_s']:.1f}s" if f.get("recovered")
                                                else f"NOT recovered ({f.get('why')})"))
    lines.append("RSS (MiB)      pid   first    last     max  baseline  slope/min  judged")
    for r in report.get("rss", []):
        slope = r.get("slope_mb_per_min")
        lines.append(f"{r['process']:<12} {r['pid']:>5} {r.get('first_mb', 0):>7.1f} {r.get('last_mb', 0):>7.1f} "
                     f"{r.get('max_mb', 0):>7.1f} {_mb(r.get('baseline_mb')):>9} "
                     f"{'-' if slope is None else f'{slope:.2f}':>10}  "
                     f"{('flat' if r['flat'] else 'GROWING') if r['judged'] else 'no: ' + r['why']}")
    leaks = report.get("leaks")
    if leaks is not None:
        for proc, counters in sorted(leaks.items()):
            lines.append(f"leak counters {proc}: " + ", ".join(f"{k}={v:g}" for k, v in sorted(counters.items())))
    for name, c in report["criteria"].items():
        lines.append(f"{'PASS' if c['pass'] else 'FAIL'} {name}: {c['detail']}")
    lines.append("soak " + ("passed" if report["pass"] else "FAILED"))
    return "\n".join(lines)


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}s"
