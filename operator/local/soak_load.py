"""The soak's load, as pure functions: when requests arrive, and what each answer counts as.

`stepfleet soak` drives open-loop Poisson load: arrivals do not wait for answers, as real
users do not, so a fleet that slows down meets a growing queue instead of a politely
slowing client (a closed loop would hide exactly the faults the soak is for). Every request
carries a deadline (`deadline_ms`, which the router enforces); the client gives up on an
attempt only `grace_s` after it, so an attempt still open then is *hung*, not slow.

An answer is one of (`Outcome`):

- ``ok``: 200 within the deadline (plus `grace_s` for the way back);
- ``late``: 200 after that: the router let a request run past its deadline;
- ``deadline_exceeded``: 504 with the JSON error `deadline_exceeded` (answered, in time, not served);
- ``refused``: 429/503 with `Retry-After` and no time left to retry within the deadline;
- ``client_error``: another 4xx with a JSON error (the soak sent something the API refuses);
- ``server_error``: a 5xx with a clear JSON error (`{"error": {"message", ...}}`);
- ``unclear_5xx``: a 5xx without one; ``hung``: no answer by deadline + grace;
  ``connection_error``: the connection to the router failed.

The last three are *lost*: the issue's criterion is that none is. A 429/503 with
`Retry-After` is not an outcome but a `Retry` (the client waits as told and sends the
request again with what is left of its deadline) while the wait fits in the deadline.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Outcome = Literal["ok", "late", "deadline_exceeded", "refused", "client_error", "server_error",
                  "unclear_5xx", "hung", "connection_error"]
#: Every outcome, in the order reports list them.
OUTCOMES: tuple[Outcome, ...] = ("ok", "late", "deadline_exceeded", "refused", "client_error", "server_error",
                                 "unclear_5xx", "hung", "connection_error")
#: Outcomes that mean the request was lost: never answered, or answered with an unexplained 5xx.
LOST: frozenset[Outcome] = frozenset({"unclear_5xx", "hung", "connection_error"})


def poisson_arrivals(rate_rps: float, duration_s: float, seed: int = 0) -> list[float]:
    """Arrival offsets (seconds from the start) of a Poisson process of `rate_rps` over `duration_s`.

    Exponential gaps from a seeded generator, so a soak's schedule can be replayed."""
    if rate_rps <= 0 or duration_s <= 0:
        return []
    rng = random.Random(seed)
    out: list[float] = []
    t = rng.expovariate(rate_rps)
    while t < duration_s:
        out.append(t)
        t += rng.expovariate(rate_rps)
    return out


def capacity_done(finishes: Sequence[float], start: float, now: float, window_s: float, min_count: int) -> bool:
    """Whether the closed-loop capacity burst may stop: `window_s` has passed and at least
    `min_count` answers came after the warm-up, or four windows have passed whatever came."""
    if now - start >= 4 * window_s:
        return True
    if now - start < window_s:
        return False
    warm_from = _warm_from(finishes, start, window_s)
    return sum(1 for t in finishes if t > warm_from) >= min_count


def _warm_from(finishes: Sequence[float], start: float, window_s: float) -> float:
    """The warm-up ends after a quarter of the window, and not before the first answer (a slow
    model's first batch would otherwise count as an idle fleet)."""
    return max(start + window_s / 4, min(finishes, default=start))


def capacity(finishes: Sequence[float], start: float, stop: float, window_s: float) -> dict:
    """Served requests per second of a closed-loop burst: answers after the warm-up, up to `stop`
    (when the clients stopped sending; answers to requests still in flight then are not counted)."""
    warm_from = _warm_from(finishes, start, window_s)
    counted = sum(1 for t in finishes if warm_from < t <= stop)
    span = stop - warm_from
    return {"rps": round(counted / span, 3) if span > 0 and counted else 0.0, "counted": counted,
            "measured_s": round(max(0.0, span), 2), "warm_up_s": round(warm_from - start, 2)}


def fault_times(duration_s: float, kill_at: float | None, stop_at: float | None) -> dict[str, float]:
    """When (seconds into the load) the worker is killed and when one is stopped; fractions of the run."""
    out: dict[str, float] = {}
    for kind, at in (("kill", kill_at), ("stop", stop_at)):
        if at is not None and 0 <= at < 1:
            out[kind] = at * duration_s
    return out


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """`Retry-After` in seconds (the delta form; HTTP dates are not sent by this project), or None."""
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def has_clear_error(body: object) -> bool:
    """True for the project's error shape: `{"error": {"message": "...", ...}}` with a non-empty message."""
    if not isinstance(body, dict):
        return False
    error = body.get("error")
    return isinstance(error, dict) and isinstance(error.get("message"), str) and bool(error["message"])


@dataclass(frozen=True)
class Retry:
    """Send the request again after `wait_s` (the answer's Retry-After)."""

    wait_s: float


def classify(status: int, headers: Mapping[str, str], body: object, elapsed_s: float, deadline_s: float,
             grace_s: float) -> Outcome | Retry:
    """What one HTTP answer means for a request sent `elapsed_s` ago with `deadline_s` in all.

    429/503 with Retry-After become a `Retry` when the wait still fits before the deadline."""
    if status == 200:
        return "ok" if elapsed_s <= deadline_s + grace_s else "late"
    if status in (429, 503):
        wait = retry_after_s(headers)
        if wait is not None:
            return Retry(wait) if elapsed_s + wait < deadline_s else "refused"
    if status == 504 and has_clear_error(body) and body["error"].get("code") == "deadline_exceeded":  # type: ignore[index]
        return "deadline_exceeded"
    if 400 <= status < 500:
        return "client_error"
    if status >= 500:
        return "server_error" if has_clear_error(body) else "unclear_5xx"
    return "unclear_5xx"  # 1xx/3xx: not an answer this API gives


def quantile(values: Sequence[float], q: float) -> float | None:
    """The `q` quantile (linear interpolation between order statistics); None when empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Tally:
    """Outcomes, retries and latencies (of `ok` answers, arrival to answer, retries included)."""

    counts: dict[str, int]
    retries: int = 0
    latencies_s: list[float] | None = None
    #: Seconds per timeline bucket (by arrival time): where in the run each outcome happened.
    bucket_s: float = 10.0
    timeline: dict[int, dict[str, int]] | None = None

    @classmethod
    def empty(cls, bucket_s: float = 10.0) -> Tally:
        return cls(counts={o: 0 for o in OUTCOMES}, latencies_s=[], bucket_s=bucket_s, timeline={})

    def add(self, outcome: Outcome, latency_s: float, retries: int, at_s: float = 0.0) -> None:
        self.counts[outcome] += 1
        self.retries += retries
        if outcome in ("ok", "late") and self.latencies_s is not None:
            self.latencies_s.append(latency_s)
        if self.timeline is not None:
            bucket = self.timeline.setdefault(int(at_s // self.bucket_s), {})
            bucket[outcome] = bucket.get(outcome, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def lost(self) -> int:
        return sum(self.counts[o] for o in LOST)

    def summary(self) -> dict:
        lat = self.latencies_s or []
        return {
            "requests": self.total,
            "outcomes": dict(self.counts),
            "lost": self.lost,
            "retries": self.retries,
            "served_share": round(self.counts["ok"] / self.total, 4) if self.total else 0.0,
            "latency_s": {"p50": rounded(quantile(lat, 0.5)), "p95": rounded(quantile(lat, 0.95)),
                          "max": rounded(max(lat) if lat else None)},
            "timeline": [{"from_s": round(b * self.bucket_s, 1), **counts}
                         for b, counts in sorted((self.timeline or {}).items())],
        }


def rounded(x: float | None) -> float | None:
    """`x` to four decimals for reports (None stays None)."""
    return None if x is None else round(x, 4)
