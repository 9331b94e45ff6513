"""The step planner's decisions, on hand-built sequences (no torch), as in vLLM's scheduler tests."""

import math

from stepfleet.serving.contracts import StepResult
from stepfleet.serving.costmodel import StepCostModel
from stepfleet.serving.planner import (
    Phase,
    PlannerConfig,
    Seq,
    SizingMode,
    StepPlanner,
    apply_plan,
    size_batch,
    update,
)

SHAPE = (4, 32, 32)
OTHER = (4, 64, 64)


def seq(sid, arrival=0.0, steps=10, rows=1, shape=SHAPE, priority=1, deadline=math.inf, explicit=False, phase=Phase.WAITING, done=0):
    return Seq(id=sid, shape=shape, rows=rows, steps_total=steps, arrival=arrival, deadline=deadline,
               explicit_deadline=explicit, priority=priority, phase=phase, steps_done=done)


def planner(**kw):
    cost = StepCostModel()
    cost.observe(SHAPE, 1, 0.1)
    cost.observe(SHAPE, 4, 0.2)
    return StepPlanner(PlannerConfig(**kw), cost)


def run_steps(p, seqs, steps, now=0.0, dt=0.1):
    """Drive the planner like the engine does; returns the plans."""
    table = {s.id: s for s in seqs}
    plans = []
    for _ in range(steps):
        plan = p.plan(table.values(), now)
        plans.append(plan)
        if plan.idle:
            break
        apply_plan(table, plan)
        update(table, plan, StepResult(stepped=plan.batch))
        now += dt
    return plans


def test_admits_up_to_max_batch_in_arrival_order():
    p = planner(max_batch=2)
    plan = p.plan([seq("a", 0), seq("b", 1), seq("c", 2)], now=3)
    assert plan.batch == ("a", "b") and plan.admitted == ("a", "b")


def test_new_request_joins_running_batch_at_next_step():
    p = planner(max_batch=4)
    running = seq("a", 0, phase=Phase.RUNNING, done=3)
    plan = p.plan([running, seq("b", 1)], now=1)
    assert plan.batch == ("a", "b") and plan.admitted == ("b",)


def test_finished_request_leaves_and_frees_its_slot():
    p = planner(max_batch=1)
    plans = run_steps(p, [seq("a", 0, steps=2), seq("b", 0.5, steps=1)], steps=5)
    assert [pl.batch for pl in plans if not pl.idle] == [("a",), ("a",), ("b",)]


def test_earliest_deadline_first_among_waiting():
    p = planner(max_batch=1)
    plan = p.plan([seq("late", 0, deadline=50), seq("soon", 5, deadline=10)], now=6)
    assert plan.batch == ("soon",)


def test_overdue_requests_go_first_in_arrival_order():
    p = planner(max_batch=1)
    # Derived deadlines (4x solo service): the long request's passed at 4, the short one's at 3.
    long_, short = seq("long", 0, steps=30, deadline=4), seq("short", 1, steps=10, deadline=3)
    fresh = seq("fresh", 5.5, steps=10, deadline=6.5)  # still in time
    order = [p.plan([long_, short, fresh][i:], now=6).batch for i in range(3)]
    assert order == [("long",), ("short",), ("fresh",)]
    # Before either is overdue, earliest deadline first: the short one overtakes.
    assert p.plan([long_, short, fresh], now=2).batch == ("short",)
    # Without the rule, overdue requests keep their deadline order and the long one waits.
    edf = StepPlanner(PlannerConfig(max_batch=1, overdue_by_arrival=False), p.cost)
    assert edf.plan([long_, short, fresh], now=6).batch == ("short",)


def test_missed_explicit_deadlines_keep_earliest_deadline_order():
    p = planner(max_batch=1)
    plan = p.plan([seq("older", 1, deadline=4, explicit=True), seq("newer", 2, deadline=3, explicit=True)], now=6)
    assert plan.batch == ("newer",)


def test_priority_class_beats_deadline():
    p = planner(max_batch=1)
    plan = p.plan([seq("normal", 0, deadline=1), seq("vip", 5, priority=2, deadline=100)], now=6)
    assert plan.batch == ("vip",)


def test_one_shape_per_step_and_fifo_across_shapes():
    p = planner(max_batch=4)
    a = seq("a", 0, phase=Phase.RUNNING, done=1)
    big = seq("big", 1, shape=OTHER)
    late_small = seq("late", 2)
    plan = p.plan([a, big, late_small], now=3)
    # `late` arrived after `big` (another shape), so it may not jump ahead of it: the group drains.
    assert plan.batch == ("a",)
    assert set(plan.batch) <= {"a"} and plan.shape == SHAPE


def test_shape_group_drains_then_other_shape_runs():
    p = planner(max_batch=4)
    plans = run_steps(p, [seq("a", 0, steps=2), seq("big", 1, shape=OTHER, steps=1), seq("late", 2, steps=1)], 6)
    batches = [pl.batch for pl in plans if not pl.idle]
    assert batches[0] == ("a",)  # the plan at t=0 sees every seq, but `big` is older than `late`
    assert ("big",) in batches
    assert batches.index(("big",)) < next(i for i, b in enumerate(batches) if "late" in b)


def test_higher_priority_preempts_most_slack_running_request():
    p = planner(max_batch=2)
    r1 = seq("r1", 0, phase=Phase.RUNNING, done=2, deadline=100)
    r2 = seq("r2", 0, phase=Phase.RUNNING, done=2, deadline=5)
    vip = seq("vip", 1, priority=2)
    plan = p.plan([r1, r2, vip], now=1)
    assert plan.paused == ("r1",)
    assert set(plan.batch) == {"r2", "vip"}
    assert any("preempts r1" in r for r in plan.reasons)


def test_same_class_preemption_needs_deadline_at_risk():
    p = planner(max_batch=1)
    running = seq("r", 0, steps=50, phase=Phase.RUNNING, done=1, deadline=1000)
    relaxed = seq("relaxed", 1, steps=5, deadline=1000, explicit=True)
    assert p.plan([running, relaxed], now=1).paused == ()
    urgent = seq("urgent", 1, steps=5, deadline=2.5, explicit=True)
    plan = p.plan([running, urgent], now=1)
    assert plan.paused == ("r",) and plan.batch == ("urgent",)


def test_no_preemption_when_victim_cannot_afford_it():
    p = planner(max_batch=1)
    running = seq("r", 0, steps=50, phase=Phase.RUNNING, done=1, deadline=6)
    urgent = seq("urgent", 1, steps=5, deadline=2.5, explicit=True)
    assert p.plan([running, urgent], now=1).paused == ()


def test_paused_request_resumes_where_it_stopped():
    p = planner(max_batch=1)
    paused = seq("p", 0, steps=10, phase=Phase.PAUSED, done=4)
    plan = p.plan([paused], now=2)
    assert plan.resumed == ("p",) and plan.batch == ("p",)
    assert paused.steps_done == 4


def test_preemption_disabled():
    p = planner(max_batch=1, preemption=False)
    running = seq("r", 0, phase=Phase.RUNNING, done=1)
    assert p.plan([running, seq("vip", 1, priority=2)], now=1).batch == ("r",)


def test_n_images_take_n_slots():
    p = planner(max_batch=4)
    plan = p.plan([seq("three", 0, rows=3), seq("two", 1, rows=2), seq("one", 2, rows=1)], now=3)
    assert plan.batch == ("three",)  # head-of-line `two` does not fit; `one` may not jump ahead


def test_static_waits_to_fill_then_runs_to_completion():
    p = planner(max_batch=2, policy="static", static_wait_s=1.0)
    first = p.plan([seq("a", 0)], now=0.2)
    assert first.idle and first.wake_at == 1.0
    plan = p.plan([seq("a", 0), seq("b", 0.5)], now=0.6)
    assert plan.batch == ("a", "b")
    table = {"a": seq("a", 0, phase=Phase.RUNNING), "c": seq("c", 0.7)}
    assert p.plan(table.values(), now=0.8).batch == ("a",)  # nobody joins a running static batch


def test_static_runs_partial_batch_after_timeout():
    p = planner(max_batch=4, policy="static", static_wait_s=1.0)
    assert p.plan([seq("a", 0)], now=1.5).batch == ("a",)


def curve(points):
    cost = StepCostModel()
    for rows, seconds in points:
        for _ in range(cost.min_samples):
            cost.observe(SHAPE, rows, seconds)
    return cost


#: Batching pays up to 2 rows; one more gains 3 % per row, the fourth 5 % more: latency-first
#: sizing stops at 2, throughput-first sizing fills to 4.
FLATTENING = ((1, 0.10), (2, 0.12), (3, 0.174), (4, 0.22))


def test_idle_queue_keeps_the_batch_small_where_batching_stops_paying():
    p = StepPlanner(PlannerConfig(max_batch=4, min_batch_gain=0.05), curve(FLATTENING))
    plan = p.plan([seq(s, 5.0) for s in "abcd"], now=5.0)  # all just arrived: nothing queues yet
    assert plan.batch == ("a", "b")
    assert plan.sizing.mode is SizingMode.LIGHT and plan.sizing.cap_rows == 2
    assert any("batch held at 2 rows" in r for r in plan.reasons)
    uncapped = StepPlanner(PlannerConfig(max_batch=4, min_batch_gain=0.0), curve(FLATTENING))
    assert uncapped.plan([seq(s, 5.0) for s in "abcd"], now=5.0).batch == tuple("abcd")


def test_backlog_takes_every_throughput_gain_up_to_max_batch():
    p = StepPlanner(PlannerConfig(max_batch=4, min_batch_gain=0.05), curve(FLATTENING))
    # `a` has waited 0.6 s, more than half of its 1.0 s solo service time: work is queueing.
    plan = p.plan([seq(s, 4.4) for s in "abcd"], now=5.0)
    assert plan.batch == tuple("abcd")
    assert plan.sizing.mode is SizingMode.BACKLOG and plan.sizing.cap_images == 4
    assert plan.reasons[0].startswith("backlog: a waited 0.60s")
    # A running batch grows too: the next step admits the queue up to max_batch.
    running = [seq(s, 4.4, phase=Phase.RUNNING, done=2) for s in "ab"]
    assert p.plan([*running, seq("c", 4.4), seq("d", 4.4)], now=5.0).batch == tuple("abcd")


def test_backlog_takes_no_batch_that_gains_nothing():
    p = StepPlanner(PlannerConfig(max_batch=4), curve(((1, 0.10), (2, 0.12), (3, 0.18), (4, 0.24))))
    plan = p.plan([seq(s, 0.0) for s in "abcd"], now=5.0)  # per row 60 ms from 2 rows on: no gain
    assert plan.sizing.mode is SizingMode.BACKLOG and plan.batch == ("a", "b")


def test_backlog_skips_a_bigger_batch_that_gains_under_backlog_min_gain():
    # Per row 100, 65, 62.2, 61.25 ms: the fourth row gains 1.5 %, the third 4.3 %.
    points = ((1, 0.100), (2, 0.130), (3, 0.1866), (4, 0.245))
    p = StepPlanner(PlannerConfig(max_batch=4, backlog_min_gain=0.02), curve(points))
    plan = p.plan([seq(s, 0.0) for s in "abcd"], now=5.0)
    assert plan.sizing.mode is SizingMode.BACKLOG and plan.sizing.cap_rows == 3 and plan.batch == tuple("abc")
    # With no threshold every gain counts, however small.
    anything = StepPlanner(PlannerConfig(max_batch=4, backlog_min_gain=0.0), curve(points))
    assert anything.plan([seq(s, 0.0) for s in "abcd"], now=5.0).batch == tuple("abcd")


#: A flat (accelerator-like) curve: bigger batches gain a lot of throughput, and cost little latency.
FLAT = ((1, 0.10), (2, 0.11), (3, 0.12), (4, 0.13))


def test_deadline_at_risk_gets_the_batch_that_finishes_it_soonest_even_a_smaller_one():
    p = StepPlanner(PlannerConfig(max_batch=4), curve(FLAT))
    # The backlog would fill the batch (1.3 s for 10 steps); `u` must finish within 1.05 s,
    # which only a batch of its own does (1.0 s). The others wait a little longer.
    urgent = seq("u", 0.0, deadline=5.0 + 1.05, explicit=True)
    plan = p.plan([urgent, *(seq(s, 0.0) for s in "xyz")], now=5.0)
    assert plan.batch == ("u",)
    assert plan.sizing.mode is SizingMode.DEADLINE and plan.sizing.cap_rows == 1
    assert "deadline: 1 explicit deadline(s) missed" in plan.sizing.why


def test_deadlines_at_risk_get_a_bigger_batch_when_that_finishes_them_soonest():
    cost = curve(((1, 0.10), (2, 0.19), (3, 0.28), (4, 0.30)))  # per row 100, 95, 93, 75 ms
    p = StepPlanner(PlannerConfig(max_batch=4, min_batch_gain=0.05), cost)
    # Just arrived, so nothing queues: the light rule stops at 2 rows (a third gains 2 %),
    # which finishes them in pairs at 1.9 and 3.8 s. Four at once are all done at 3.0 s.
    urgent = [seq(s, 5.0, deadline=5.0 + 3.1, explicit=True) for s in "abcd"]
    plan = p.plan(urgent, now=5.0)
    assert plan.batch == tuple("abcd")
    assert plan.sizing.mode is SizingMode.DEADLINE and plan.sizing.cap_rows == 4
    # Deadlines that every batch meets, or that none can save, leave the base rule in charge.
    relaxed = [seq(s, 5.0, deadline=100.0, explicit=True) for s in "abcd"]
    assert p.plan(relaxed, now=5.0).sizing.mode is SizingMode.LIGHT
    hopeless = [seq(s, 5.0, deadline=5.5, explicit=True) for s in "abcd"]
    assert p.plan(hopeless, now=5.0).sizing.mode is SizingMode.LIGHT


def test_sizing_is_a_pure_function_of_the_queue():
    cost = curve(FLATTENING)
    cfg = PlannerConfig(max_batch=4)
    queue = [seq(s, 4.4) for s in "abcd"]
    assert size_batch([], queue, 5.0, cfg, cost) == size_batch([], queue, 5.0, cfg, cost)
    assert size_batch([], queue, 4.5, cfg, cost).mode is SizingMode.LIGHT
    assert size_batch([], queue, 5.0, cfg, cost).mode is SizingMode.BACKLOG


def test_unmeasured_batch_sizes_are_explored():
    cost = StepCostModel()
    cost.observe(SHAPE, 1, 0.1)  # only the solo cost is known: bigger batches may pay, try them
    p = StepPlanner(PlannerConfig(max_batch=4), cost)
    assert len(p.plan([seq(s, i) for i, s in enumerate("abcd")], now=5).batch) == 4


def test_each_cost_variant_is_batched_by_its_own_curve():
    # On a CPU, batching edits on cached activations costs more per image than it saves,
    # while full steps of the same shape still gain: edits stay one to a batch, generations fill.
    from stepfleet.serving.costmodel import cost_key

    edit = cost_key(SHAPE, "cached-edit")
    cost = StepCostModel()
    cost.calibrate(SHAPE, {1: 0.10, 2: 0.15, 3: 0.20, 4: 0.25})
    for rows, seconds in ((1, 0.05), (2, 0.11)):
        for _ in range(cost.min_samples):
            cost.observe(edit, rows, seconds)
    p = StepPlanner(PlannerConfig(max_batch=4), cost)

    def edit_seq(sid, arrival):
        s = seq(sid, arrival)
        s.cost_key = edit
        return s

    assert p.plan([edit_seq(s, i) for i, s in enumerate("abc")], now=5).batch == ("a",)
    assert p.plan([seq(s, i) for i, s in enumerate("abcd")], now=5).batch == tuple("abcd")
    mixed = p.plan([edit_seq("e1", 0), seq("g1", 1), seq("g2", 2), edit_seq("e2", 3)], now=5)
    assert mixed.batch == ("e1", "g1", "g2")  # the second edit would pass the edits' cap


def test_update_advances_who_stepped_and_retires_finished_and_failed():
    table = {s.id: s for s in (seq("a", steps=2, done=1), seq("b", steps=5), seq("c", steps=5))}
    plan = StepPlanner(PlannerConfig(max_batch=4)).plan(table.values(), 0.0)
    apply_plan(table, plan)
    retired = update(table, plan, StepResult(stepped=("a", "b"), failed={"c": RuntimeError("bad")}))
    assert retired.finished == ("a",) and retired.failed == ("c",)
    assert set(table) == {"b"} and table["b"].steps_done == 1


def test_request_larger_than_a_batch_runs_alone_instead_of_blocking_its_shape():
    for policy in ("continuous", "static"):
        p = planner(max_batch=2, policy=policy, static_wait_s=0.0)
        plans = run_steps(p, [seq("big", 0, steps=2, rows=3), seq("small", 1, steps=2)], steps=10, now=5.0)
        batches = [pl.batch for pl in plans if not pl.idle]
        assert batches == [("big",), ("big",), ("small",), ("small",)], policy
