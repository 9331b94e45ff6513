"""Issue 19, finding 2 for `stepfleet up`: a ready worker that stops answering is found hung by
the router's rule, taken out of the router, killed, restarted under its name and counted (pure)."""

from __future__ import annotations

import httpx
import pytest

from stepfleet.operator.local import fleet, processes
from stepfleet.operator.local.liveness import HangRule, is_hung, silent_polls_after
from stepfleet.operator.local.supervise import Kill, Start, WorkerView, on_exit, on_poll, reconcile
from stepfleet.operator.loop.measured import Metrics
from stepfleet.serving.router.config import RouterSettings


def ready(name: str = "cpu-1", **kw) -> WorkerView:
    return WorkerView(name=name, pool="cpu", phase="ready", started_s=0.0, url=f"http://127.0.0.1:1/{name}", **kw)


def test_the_default_rule_is_the_routers():
    router = RouterSettings()
    rule = HangRule()
    assert (rule.timeout_s, rule.polls, rule.poll_every_s) == (router.load_poll_timeout_s, router.hang_polls,
                                                                router.load_poll_s)
    assert rule.detection_s == pytest.approx(6.0)


@pytest.mark.parametrize("bad", [dict(polls=0), dict(timeout_s=0), dict(poll_every_s=-1)])
def test_a_rule_that_could_never_or_always_fire_is_refused(bad):
    with pytest.raises(ValueError):
        HangRule(**bad)


def test_silences_in_a_row_make_a_hang_and_any_answer_resets_them():
    rule = HangRule(polls=3)
    count = 0
    for result in ("silent", "silent", "answered", "silent", "refused", "silent"):
        count = silent_polls_after(count, result)
    assert count == 2 and not is_hung(count, rule)  # a refusal (exit, restart) neither counts nor resets
    assert is_hung(silent_polls_after(count, "silent"), rule)


def test_a_ready_worker_found_hung_is_killed_then_restarted_under_its_name_and_counted():
    rule = HangRule(polls=2)
    worker = ready()
    worker = on_poll(worker, "silent", rule)
    assert not worker.hung and reconcile({"cpu": 1}, [worker], now_s=10.0) == ()
    worker = on_poll(worker, "silent", rule)
    assert worker.hung and worker.hangs == 1
    # out of the router at once, and no longer counted as ready capacity
    assert fleet.router_config((fleet.LocalPool("cpu", 0.1),), [worker], None)["pools"] == []
    (seen,) = fleet.pool_observations((fleet.LocalPool("cpu", 0.1),), {"cpu": 1}, [worker], Metrics(window_s=1.0), {})
    assert seen.ready_replicas == 0
    (kill,) = reconcile({"cpu": 1}, [worker], now_s=10.0)  # it keeps its place: no second worker meanwhile
    assert isinstance(kill, Kill) and kill.name == "cpu-1" and "hung" in kill.reason
    dead = on_exit(worker, -9, now_s=10.0)
    (start,) = reconcile({"cpu": 1}, [dead], now_s=20.0)
    assert isinstance(start, Start) and start.name == "cpu-1" and start.restarts == 1 and start.hangs == 1
    assert "was hung" in start.reason


def test_polls_do_not_judge_workers_still_loading_or_already_hung():
    rule = HangRule(polls=1)
    loading = WorkerView(name="cpu-1", pool="cpu", phase="starting", started_s=0.0)
    assert on_poll(loading, "silent", rule) == loading
    hung = on_poll(ready(), "silent", rule)
    assert on_poll(hung, "silent", rule) == hung  # counted once, not once per poll while it dies


def test_a_hung_worker_the_pool_no_longer_needs_is_killed_and_forgotten():
    hung = on_poll(ready(), "silent", HangRule(polls=1))
    assert [type(a).__name__ for a in reconcile({"cpu": 0}, [hung], now_s=0.0)] == ["Kill", "Stop"]
    dead = on_exit(hung, -9, now_s=1.0)
    (forget,) = reconcile({"cpu": 0}, [dead], now_s=2.0)
    assert "was hung" in forget.reason and "not restarting" in forget.reason


def test_poll_alive_tells_a_silence_from_a_refusal_and_an_answer():
    def handler(request: httpx.Request) -> httpx.Response:
        if "silent" in str(request.url):
            raise httpx.ReadTimeout("no answer", request=request)
        if "gone" in str(request.url):
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(503)  # loading or failed: still an answer

    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        assert processes.poll_alive(http, "http://w/silent", 0.1) == "silent"
        assert processes.poll_alive(http, "http://w/gone", 0.1) == "refused"
        assert processes.poll_alive(http, "http://w/ok", 0.1) == "answered"
