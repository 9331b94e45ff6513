"""`stepfleet up`'s supervision rules: desired workers per pool vs the workers there are (pure)."""

from __future__ import annotations

import pytest

from stepfleet.operator.local.supervise import (
    MAX_BACKOFF_S,
    Forget,
    Start,
    Stop,
    WorkerView,
    on_exit,
    on_ready,
    reconcile,
    restart_delay_s,
)


def w(name: str, phase: str = "ready", pool: str | None = None, started: float = 0.0, **kw) -> WorkerView:
    return WorkerView(name=name, pool=pool or name.rsplit("-", 1)[0], phase=phase, started_s=started, **kw)


def kinds(actions) -> list[tuple[str, str]]:
    return [(type(a).__name__, a.name) for a in actions]


class TestStartingAndStopping:
    def test_an_empty_fleet_starts_the_wanted_workers_under_fresh_names(self):
        actions = reconcile({"cheap": 2, "fast": 1}, [], now_s=0.0)
        assert kinds(actions) == [("Start", "cheap-1"), ("Start", "cheap-2"), ("Start", "fast-1")]
        assert all(isinstance(a, Start) and a.restarts == 0 for a in actions)

    def test_a_fleet_at_its_size_does_nothing(self):
        assert reconcile({"cpu": 2}, [w("cpu-1"), w("cpu-2", "starting")], now_s=5.0) == ()

    def test_new_names_skip_the_taken_ones(self):
        actions = reconcile({"cpu": 3}, [w("cpu-2")], now_s=0.0)
        assert kinds(actions) == [("Start", "cpu-1"), ("Start", "cpu-3")]

    def test_scale_down_stops_workers_not_ready_first_then_the_newest(self):
        fleet = [w("cpu-1", started=1), w("cpu-2", started=5), w("cpu-3", "starting", started=2), w("cpu-4", started=3)]
        assert kinds(reconcile({"cpu": 2}, fleet, now_s=10.0)) == [("Stop", "cpu-3"), ("Stop", "cpu-2")]

    def test_a_pool_no_longer_wanted_is_stopped_entirely(self):
        assert kinds(reconcile({}, [w("old-1"), w("old-2")], now_s=0.0)) == [("Stop", "old-1"), ("Stop", "old-2")]

    def test_stopping_workers_count_for_nothing(self):
        # A draining worker has left the router: the pool needs a replacement now.
        actions = reconcile({"cpu": 1}, [w("cpu-1", "stopping")], now_s=0.0)
        assert kinds(actions) == [("Start", "cpu-2")]

    def test_a_worker_stopped_on_purpose_is_forgotten_not_restarted(self):
        actions = reconcile({"cpu": 1}, [w("cpu-1"), w("cpu-2", "stopped", exited_s=1.0, exit_code=0)], now_s=2.0)
        assert kinds(actions) == [("Forget", "cpu-2")]


class TestCrashes:
    def test_a_crashed_worker_is_restarted_under_its_name_after_the_first_backoff(self):
        dead = w("cpu-1", "crashed", exited_s=10.0, exit_code=-9, unready_since_s=10.0)
        assert reconcile({"cpu": 1}, [dead], now_s=10.0 + restart_delay_s(0) / 2) == ()  # holds its place
        (action,) = reconcile({"cpu": 1}, [dead], now_s=10.0 + restart_delay_s(0))
        assert isinstance(action, Start) and action.name == "cpu-1" and action.restarts == 1
        assert "killed by signal 9" in action.reason and "restart 1" in action.reason
        assert action.unready_since_s == 10.0

    def test_backoff_doubles_up_to_a_ceiling(self):
        delays = [restart_delay_s(n) for n in range(10)]
        assert delays[:4] == [0.5, 1.0, 2.0, 4.0]
        assert max(delays) == MAX_BACKOFF_S and delays == sorted(delays)
        looping = w("cpu-1", "crashed", exited_s=100.0, exit_code=1, restarts=3)
        assert reconcile({"cpu": 1}, [looping], now_s=103.9) == ()
        assert kinds(reconcile({"cpu": 1}, [looping], now_s=104.0)) == [("Start", "cpu-1")]

    def test_a_crashed_worker_the_pool_no_longer_needs_is_forgotten(self):
        actions = reconcile({"cpu": 1}, [w("cpu-1"), w("cpu-2", "crashed", exited_s=0.0, exit_code=1)], now_s=60.0)
        assert kinds(actions) == [("Forget", "cpu-2")]
        assert isinstance(actions[0], Forget) and "not restarting" in actions[0].reason

    def test_a_crash_with_others_missing_restarts_it_and_starts_the_rest(self):
        actions = reconcile({"cpu": 3}, [w("cpu-1", "crashed", exited_s=0.0, exit_code=1)], now_s=60.0)
        assert kinds(actions) == [("Start", "cpu-1"), ("Start", "cpu-2"), ("Start", "cpu-3")]

    def test_exit_while_stopping_is_a_stop_and_otherwise_a_crash(self):
        assert on_exit(w("cpu-1", "stopping"), 0, 5.0).phase == "stopped"
        crashed = on_exit(w("cpu-1", "ready"), -9, 5.0)
        assert (crashed.phase, crashed.exit_code, crashed.exited_s, crashed.unready_since_s) == ("crashed", -9, 5.0, 5.0)

    def test_readiness_resets_the_restart_count(self):
        back = on_ready(w("cpu-1", "starting", restarts=4, unready_since_s=1.0))
        assert (back.phase, back.restarts, back.unready_since_s) == ("ready", 0, None)


@pytest.mark.parametrize("want", [0, 1, 3])
def test_applying_the_actions_reaches_the_desired_size(want):
    """Apply reconcile's actions to the views as the process layer would: one pass suffices."""
    fleet = [w("cpu-1"), w("cpu-2", "starting", started=1), w("cpu-3", "crashed", exited_s=0.0, exit_code=1),
             w("cpu-4", "stopped", exited_s=0.0)]
    for action in reconcile({"cpu": want}, fleet, now_s=100.0):
        if isinstance(action, Start):
            fleet = [v for v in fleet if v.name != action.name] + [w(action.name, "starting", started=100.0)]
        elif isinstance(action, Stop):
            fleet = [v if v.name != action.name else w(v.name, "stopping") for v in fleet]
        else:
            fleet = [v for v in fleet if v.name != action.name]
    assert sum(v.live for v in fleet) == want
    assert reconcile({"cpu": want}, [v for v in fleet if v.phase != "stopping"], now_s=100.0) == ()


@pytest.mark.parametrize("module", ["supervise.py", "fleet.py"])
def test_the_local_loop_rules_import_no_process_http_or_model_code(module):
    from tests.test_layering import HEAVY, ROOT, imported_modules

    mods = imported_modules(ROOT / "operator" / "local" / module)
    assert sorted(m for m in mods if m.split(".")[0] in (*HEAVY, "subprocess", "socket", "signal")) == []
