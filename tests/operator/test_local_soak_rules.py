"""The pure parts of `stepfleet soak`: the Poisson schedule, what an answer counts as, and the verdict
(flat vs growing RSS, leaks, lost requests, faults). The whole command runs in tests/e2e/test_soak.py."""

from __future__ import annotations

import statistics

import pytest

from stepfleet.operator.local import soak_load, soak_verdict
from stepfleet.operator.local.soak_load import Retry, classify
from stepfleet.operator.local.soak_verdict import FlatRule, RssSeries, criteria, rss_report

# --- the schedule ------------------------------------------------------------------------------

def test_poisson_arrivals_have_the_rate_and_exponential_gaps_and_replay_by_seed():
    arrivals = soak_load.poisson_arrivals(5.0, 2000.0, seed=3)
    assert arrivals == sorted(arrivals) and 0 < arrivals[0] and arrivals[-1] < 2000.0
    assert len(arrivals) / 2000.0 == pytest.approx(5.0, rel=0.05)
    gaps = [b - a for a, b in zip(arrivals[:-1], arrivals[1:], strict=True)]
    # Exponential: mean = standard deviation = 1/rate (a fixed-interval schedule has sd 0).
    assert statistics.fmean(gaps) == pytest.approx(0.2, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(0.2, rel=0.1)
    assert soak_load.poisson_arrivals(5.0, 2000.0, seed=3) == arrivals
    assert soak_load.poisson_arrivals(5.0, 2000.0, seed=4) != arrivals
    assert soak_load.poisson_arrivals(0.0, 10.0) == [] == soak_load.poisson_arrivals(1.0, 0.0)


def test_fault_times_are_shares_of_the_run_and_negative_or_none_means_no_fault():
    assert soak_load.fault_times(600, 0.3, 0.6) == {"kill": 180.0, "stop": 360.0}
    assert soak_load.fault_times(600, None, 0.6) == {"stop": 360.0}
    assert soak_load.fault_times(600, 1.0, None) == {}


def test_capacity_counts_answers_after_the_warm_up_and_before_the_clients_stopped():
    finishes = [1.0, 2.0, 3.0, 4.0, 5.0, 9.0, 11.0, 12.5]  # seconds since the start
    # Warm-up: a quarter of a 10 s window; 4.0 .. 9.0 count (10 s: the clients stopped; 11 and 12.5 were in flight).
    assert soak_load.capacity(finishes, 0.0, 10.0, 10.0) == {"rps": 0.533, "counted": 4, "measured_s": 7.5,
                                                             "warm_up_s": 2.5}
    # A slow model: nothing came in the first quarter; the warm-up lasts until the first answer.
    slow = [8.0, 8.0, 8.0, 8.0, 16.0, 16.0, 16.0, 16.0]
    assert soak_load.capacity(slow, 0.0, 20.0, 10.0) == {"rps": 0.333, "counted": 4, "measured_s": 12.0,
                                                         "warm_up_s": 8.0}
    assert soak_load.capacity([], 0.0, 40.0, 10.0)["rps"] == 0.0


def test_the_capacity_burst_goes_on_until_enough_answers_or_four_windows():
    assert not soak_load.capacity_done([1, 2, 3, 4, 5, 6], 0.0, 9.0, 10.0, 4)  # the window is not over
    assert soak_load.capacity_done([1, 2, 3, 4, 5, 6], 0.0, 10.0, 10.0, 4)  # 4 after the 2.5 s warm-up
    assert not soak_load.capacity_done([8.0, 8.0, 8.0], 0.0, 20.0, 10.0, 4)  # a slow model: wait for more
    assert soak_load.capacity_done([], 0.0, 40.0, 10.0, 4)  # but not for ever


# --- what an answer counts as ------------------------------------------------------------------

ERR = {"error": {"message": "no worker answered", "type": "server_error", "param": None, "code": "x"}}


@pytest.mark.parametrize(("status", "headers", "body", "elapsed", "expected"), [
    (200, {}, None, 3.0, "ok"),
    (200, {}, None, 11.9, "ok"),  # within the deadline plus the grace for the way back
    (200, {}, None, 12.5, "late"),
    (429, {"Retry-After": "2"}, ERR, 3.0, Retry(2.0)),
    (503, {"retry-after": "1"}, ERR, 3.0, Retry(1.0)),
    (429, {"Retry-After": "8"}, ERR, 3.0, "refused"),  # the wait does not fit in the deadline
    (429, {}, ERR, 3.0, "client_error"),  # no Retry-After: nothing to retry on, but a clear answer
    (503, {}, ERR, 3.0, "server_error"),
    (503, {"Retry-After": "soon"}, ERR, 3.0, "server_error"),
    (504, {}, {"error": {"message": "deadline_ms passed", "code": "deadline_exceeded"}}, 10.0,
     "deadline_exceeded"),
    (504, {}, ERR, 10.0, "server_error"),
    (400, {}, ERR, 0.1, "client_error"),
    (500, {}, ERR, 1.0, "server_error"),
    (500, {}, {"detail": "Internal Server Error"}, 1.0, "unclear_5xx"),
    (502, {}, None, 1.0, "unclear_5xx"),
    (500, {}, {"error": {"message": ""}}, 1.0, "unclear_5xx"),
    (302, {}, None, 1.0, "unclear_5xx"),
])
def test_classify(status, headers, body, elapsed, expected):
    assert classify(status, headers, body, elapsed, deadline_s=10.0, grace_s=2.0) == expected


def test_lost_counts_hung_connection_errors_and_unclear_5xx_only():
    tally = soak_load.Tally.empty(bucket_s=10)
    for outcome, at in [("ok", 1), ("ok", 12), ("deadline_exceeded", 13), ("refused", 14), ("server_error", 15),
                        ("hung", 25), ("connection_error", 26), ("unclear_5xx", 27)]:
        tally.add(outcome, 1.0, retries=1, at_s=at)
    s = tally.summary()
    assert s["requests"] == 8 and s["lost"] == 3 and s["retries"] == 8 and s["served_share"] == 0.25
    assert s["latency_s"]["p50"] == 1.0
    assert [b["from_s"] for b in s["timeline"]] == [0.0, 10.0, 20.0]
    assert s["timeline"][2] == {"from_s": 20.0, "hung": 1, "connection_error": 1, "unclear_5xx": 1}


def test_quantile_interpolates_and_is_none_when_empty():
    assert soak_load.quantile([], 0.5) is None
    assert soak_load.quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert soak_load.quantile([0.0, 10.0], 0.95) == pytest.approx(9.5)


# --- RSS: flat or growing ----------------------------------------------------------------------

RULE = FlatRule(warmup_s=60, baseline_s=60, max_slope_mb_per_min=1.0, noise_mb=8.0, max_growth_ratio=0.05,
                min_span_s=60)


def _series(mb_at, *, minutes=10, every_s=5, alive=True, name="cpu-1", pid=7):
    return RssSeries(name, pid, tuple((t, mb_at(t)) for t in range(0, minutes * 60 + 1, every_s)), alive)


def test_flat_memory_with_warmup_and_noise_is_flat():
    # Grows during the first minute (model load, first batches), then wobbles by +-3 MiB.
    def mb(t):
        return 400 + min(t, 60) * 2 + (3 if (t // 5) % 2 else -3)

    r = rss_report(_series(mb), RULE)
    assert r["judged"] and r["flat"], r
    assert r["first_mb"] == 397 and r["max_mb"] == 523 and abs(r["slope_mb_per_min"]) < 1


def test_a_slow_leak_over_the_second_half_is_growing():
    r = rss_report(_series(lambda t: 500 + 3 * t / 60), RULE)  # 3 MiB/min: 30 MiB over ten minutes
    assert r["judged"] and not r["flat"]
    assert r["slope_mb_per_min"] == pytest.approx(3.0, rel=1e-3)
    assert "slope 3.00 MiB/min" in r["why"] and "over the baseline" in r["why"]


def test_a_step_up_late_in_the_run_fails_on_growth_over_the_baseline():
    r = rss_report(_series(lambda t: 500 if t < 590 else 560), RULE)  # a jump in the last samples
    assert r["judged"] and not r["flat"] and "over the baseline 500 MiB" in r["why"]


def test_short_or_dead_processes_are_reported_not_judged():
    killed = rss_report(_series(lambda t: 500 + t, alive=False), RULE)
    assert not killed["judged"] and killed["flat"] is None and "not alive" in killed["why"]
    assert killed["last_mb"] > killed["first_mb"]  # still reported
    short = rss_report(_series(lambda t: 500.0, minutes=1), RULE)  # 60 s of life, 60 s of it warm-up
    assert not short["judged"] and "judged span" in short["why"]
    empty = rss_report(RssSeries("router", 1, (), True), RULE)
    assert not empty["judged"] and empty["why"] == "no samples"


def test_in_a_short_run_a_small_slope_is_within_the_noise_floor():
    rule = FlatRule(warmup_s=4, min_span_s=8, noise_mb=8.0)
    # 40 s at 6 MiB/min: 2 MiB over the second half, below the noise floor.
    r = rss_report(RssSeries("router", 1, tuple((t, 60 + 0.1 * t) for t in range(0, 41)), True), rule)
    assert r["judged"] and r["flat"] and r["slope_mb_per_min"] == pytest.approx(6.0, rel=1e-3)


# --- the verdict -------------------------------------------------------------------------------

def _load(**counts):
    tally = soak_load.Tally.empty()
    for outcome, n in counts.items():
        for _ in range(n):
            tally.add(outcome, 1.0, 0)
    return tally.summary()


def _rss(flat=True):
    return [{"process": "router", "pid": 1, "judged": True, "flat": True, "why": "flat"},
            {"process": "cpu-1", "pid": 2, "judged": True, "flat": flat, "why": "slope 3 MiB/min"},
            {"process": "cpu-2", "pid": 3, "judged": False, "flat": None, "why": "not alive at the end"}]


ZERO = {"router": {"stepfleet_router_inflight_requests": 0.0}, "cpu-1": {"stepfleet_queue_depth": 0.0}}
FAULTS = [{"kind": "kill", "worker": "cpu-1", "injected": True, "recovered": True, "recovered_after_s": 12.0},
          {"kind": "stop", "worker": "cpu-1", "injected": True, "recovered": True, "recovered_after_s": 20.0}]


def _criteria(load=None, rss=None, leaks=ZERO, faults=FAULTS, code=0):
    return criteria(load or _load(ok=90, deadline_exceeded=5, refused=5), rss or _rss(), leaks, faults,
                    min_served_share=0.5, fleet_exit_code=code)


def test_a_clean_soak_passes_every_criterion():
    found = _criteria()
    assert soak_verdict.verdict(found), {k: c for k, c in found.items() if not c.passed}
    assert set(found) == {"no_request_lost", "none_past_deadline", "served", "rss_flat", "no_leaks",
                          "faults_recovered", "fleet_stopped_cleanly"}
    assert "kill cpu-1 back in 12.0s" in found["faults_recovered"].detail


@pytest.mark.parametrize(("kwargs", "failed", "says"), [
    ({"load": _load(ok=90, hung=1)}, "no_request_lost", "1 lost of 91 (hung 1"),
    ({"load": _load(ok=90, connection_error=2)}, "no_request_lost", "connection errors 2"),
    ({"load": _load(ok=90, unclear_5xx=1)}, "no_request_lost", "5xx without a clear error 1"),
    ({"load": _load(ok=90, late=1)}, "none_past_deadline", "1 answered 200 after"),
    ({"load": _load(ok=10, deadline_exceeded=90)}, "served", "10 of 100"),
    ({"rss": _rss(flat=False)}, "rss_flat", "cpu-1 (pid 2): slope 3 MiB/min"),
    ({"rss": _rss()[:1]}, "rss_flat", "too few samples"),
    ({"leaks": {**ZERO, "router": {"stepfleet_router_inflight_requests": 2.0}}}, "no_leaks",
     "router.stepfleet_router_inflight_requests=2"),
    ({"leaks": None}, "no_leaks", "did not drain"),
    ({"leaks": {}}, "no_leaks", "no counters read"),
    ({"faults": [{**FAULTS[0]}, {**FAULTS[1], "recovered": False, "why": "not found hung"}]}, "faults_recovered",
     "stop cpu-1: not found hung"),
    ({"faults": [{"kind": "kill", "worker": None, "injected": False, "recovered": False,
                  "why": "no ready worker"}]}, "faults_recovered", "no ready worker"),
    ({"code": 1}, "fleet_stopped_cleanly", "exited with 1"),
])
def test_each_criterion_fails_on_its_own_and_says_why(kwargs, failed, says):
    found = _criteria(**kwargs)
    assert [k for k, c in found.items() if not c.passed] == [failed]
    assert says in found[failed].detail
    assert not soak_verdict.verdict(found)


def test_the_summary_names_each_criterion_and_the_result():
    found = _criteria(load=_load(ok=90, hung=1))
    report = {"config": {"load": 0.9, "duration_s": 600, "deadline_s": 30}, "target_rps": 2.7,
              "capacity": {"rps": 3.0, "concurrency": 16, "window_s": 30, "counted": 60, "measured_s": 20}, "load": _load(ok=90, hung=1),
              "faults": [{**f, "at_s": 180, "pid": 5, "new_pid": 6} for f in FAULTS],
              "rss": [{**r, "first_mb": 1.0, "last_mb": 2.0, "max_mb": 2.0} for r in _rss()], "leaks": ZERO,
              "client_loop_lag_s": {"p99": 0.01, "max": 0.2},
              "hung_requests": [{"sent_at_s": 20, "try": 1, "status": 504, "answered_after_s": 19.5},
                                {"sent_at_s": 21, "try": 2, "status": "TimeoutError", "answered_after_s": None}],
              "criteria": {k: {"pass": c.passed, "detail": c.detail} for k, c in found.items()}, "pass": False}
    text = soak_verdict.summary_text(report)
    assert "FAIL no_request_lost: 1 lost of 91" in text and "PASS rss_flat" in text
    assert "fault kill at 180s: cpu-1 pid 5 -> 6, back in 12.0s" in text
    assert "hung requests followed: 2; answered after all: 1 (status 504, at most 19.5s after sending); never: 1" \
        in text
    assert "capacity 3.00 req/s (closed loop, 16 clients, 60 answers over 20s)" in text
    assert text.endswith("soak FAILED")


def test_the_command_refuses_settings_that_cannot_make_a_soak_before_starting_anything(capsys):
    from stepfleet.operator.local.soak import main

    assert main(["--workers", "1"]) == 2
    assert "--workers must be at least 2" in capsys.readouterr().err
    assert main(["--load", "0"]) == 2
    assert "0 < --load <= 2" in capsys.readouterr().err
