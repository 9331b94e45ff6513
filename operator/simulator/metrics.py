"""What a run is judged by: SLO attainment, cost, failures and recovery after each event.

- attainment: requests served within the SLO latency over all requests offered (a failed
  request is a miss);
- cost per 1,000 images: the whole bill over the images actually served;
- dropped: requests that got no image — routed to a pool with no ready replica (503),
  turned away by a full queue (429) or lost with their replica;
- recovery after an event: from the event until the one-minute attainment is back at the
  SLO percentile for good. One-minute windows start at every second; the recovery is the
  start of the first window after which no window falls short — among the windows that
  start at or after the event and end by the next event (or the end of the run) — minus
  the event time; 0 when none falls short. It is conservative: any shortfall before the
  next event counts against the event.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .engine import RunLog
from .view import RequestLog

WINDOW_S = 60


@dataclass(frozen=True)
class PolicyResult:
    slo_attainment: float
    cost_usd: float
    cost_per_1k_images: float
    dropped: int
    recovery_s: list[float]
    requests: int
    served: int
    dropped_by_reason: dict[str, int]
    latency_p50_s: float | None
    latency_p95_s: float | None
    latency_p99_s: float | None
    mode_switches: int
    pool_cost_usd: dict[str, float]
    replica_hours: dict[str, float]
    wall_s: float

    def as_dict(self) -> dict[str, object]:
        return {
            "slo_attainment": round(self.slo_attainment, 6),
            "cost_usd": round(self.cost_usd, 4),
            "cost_per_1k_images": round(self.cost_per_1k_images, 6),
            "dropped": self.dropped,
            "recovery_s": [round(r, 1) for r in self.recovery_s],
            "requests": self.requests,
            "served": self.served,
            "dropped_by_reason": self.dropped_by_reason,
            "latency_p50_s": _round(self.latency_p50_s),
            "latency_p95_s": _round(self.latency_p95_s),
            "latency_p99_s": _round(self.latency_p99_s),
            "mode_switches": self.mode_switches,
            "pool_cost_usd": {k: round(v, 4) for k, v in self.pool_cost_usd.items()},
            "replica_hours": {k: round(v, 3) for k, v in self.replica_hours.items()},
            "wall_s": round(self.wall_s, 3),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def summarize(run: RunLog) -> PolicyResult:
    scenario = run.scenario
    log = run.log
    latency = log.latency_np[: log.count]
    arrival = log.arrival_s[: log.count]
    served = latency >= 0
    good = served & (latency <= scenario.slo.latency_s)
    requests = int(latency.size)
    n_served = int(served.sum())
    quantiles = (np.quantile(latency[served], [0.5, 0.95, 0.99]).tolist() if n_served
                 else [None, None, None])
    events = sorted(e.at_s for e in scenario.events)
    return PolicyResult(
        slo_attainment=float(good.sum() / requests) if requests else 1.0,
        cost_usd=run.cost_usd,
        cost_per_1k_images=run.cost_usd / n_served * 1000.0 if n_served else float("inf"),
        dropped=requests - n_served,
        recovery_s=recovery_times(arrival, good, events, scenario.duration_s,
                                  scenario.slo.percentile),
        requests=requests,
        served=n_served,
        dropped_by_reason={
            "no_ready_replica": int((latency == RequestLog.NO_REPLICA).sum()),
            "queue_full": int((latency == RequestLog.REJECTED).sum()),
            "replica_lost": int((latency == RequestLog.LOST).sum()),
        },
        latency_p50_s=quantiles[0],
        latency_p95_s=quantiles[1],
        latency_p99_s=quantiles[2],
        mode_switches=run.mode_switches,
        pool_cost_usd=run.pool_cost_usd,
        replica_hours=run.replica_hours,
        wall_s=run.wall_s,
    )


def window_attainment(arrival_s: np.ndarray, good: np.ndarray, duration_s: float,
                      window_s: int = WINDOW_S) -> tuple[np.ndarray, np.ndarray]:
    """Attainment of the one-minute window starting at each whole second, and how many
    requests each holds (windows running past the end are cut short)."""
    seconds = int(np.ceil(duration_s))
    bins = np.clip(arrival_s.astype(np.int64), 0, max(seconds - 1, 0))
    total = np.bincount(bins, minlength=seconds).astype(np.int64)
    ok = np.bincount(bins, weights=good.astype(np.float64), minlength=seconds)
    total_c = np.concatenate([[0], np.cumsum(total)])
    ok_c = np.concatenate([[0.0], np.cumsum(ok)])
    starts = np.arange(seconds)
    ends = np.minimum(starts + window_s, seconds)
    count = total_c[ends] - total_c[starts]
    hits = ok_c[ends] - ok_c[starts]
    with np.errstate(invalid="ignore", divide="ignore"):
        attainment = np.where(count > 0, hits / np.maximum(count, 1), 1.0)
    return attainment, count


def recovery_times(arrival_s: np.ndarray, good: np.ndarray, events_s: list[float],
                   duration_s: float, target: float) -> list[float]:
    if not events_s:
        return []
    attainment, _ = window_attainment(arrival_s, good, duration_s)
    short = attainment < target - 1e-12
    out = []
    for k, at in enumerate(events_s):
        until = events_s[k + 1] if k + 1 < len(events_s) else duration_s
        first = int(np.ceil(at))
        last = max(first, int(np.floor(until)) - WINDOW_S)  # last window ending by `until`
        bad = np.nonzero(short[first: last + 1])[0]
        out.append(0.0 if bad.size == 0 else float(first + bad[-1] + 1 - at))
    return out
