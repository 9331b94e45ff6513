"""Videos yield to images at step boundaries (GenServe's rule), within bounds (pure, no torch)."""

import math

from stepfleet.serving.contracts import StepResult
from stepfleet.serving.coschedule import CoScheduleConfig
from stepfleet.serving.costmodel import StepCostModel
from stepfleet.serving.planner import Phase, PlannerConfig, Seq, StepPlanner, apply_plan, update

IMG = (16, 1, 8, 8)
VID = (16, 3, 8, 8)
IMAGE_STEP_S, VIDEO_STEP_S = 0.1, 1.0


def planner(**kw):
    cost = StepCostModel()
    for rows in (1, 2, 4):
        cost.observe(IMG, rows, IMAGE_STEP_S)
        cost.observe(VID, rows, VIDEO_STEP_S)
    return StepPlanner(PlannerConfig(max_batch=4, coschedule=CoScheduleConfig(**kw)), cost)


def video(sid, steps=30, done=5, deadline=200.0, phase=Phase.RUNNING):
    return Seq(sid, VID, rows=1, steps_total=steps, arrival=0.0, deadline=deadline, steps_done=done, phase=phase,
               kind="video")


def image(sid, arrival=0.0, steps=10, deadline=3.0):
    return Seq(sid, IMG, rows=1, steps_total=steps, arrival=arrival, deadline=deadline, explicit_deadline=True,
               kind="image")


def test_running_videos_pause_for_an_image_that_would_miss_its_deadline():
    seqs = [video("v1"), video("v2", done=20), image("i1")]
    plan = planner().plan(seqs, now=0.0)
    assert plan.batch == ("i1",) and set(plan.paused) == {"v1", "v2"} and plan.shape == IMG
    assert any("pause videos" in r for r in plan.reasons)


def test_no_pause_when_the_image_makes_it_by_waiting():
    plan = planner().plan([video("v1", done=29), image("i1", deadline=5.0)], now=0.0)  # 1 video step left
    assert plan.batch == ("v1",) and not plan.paused


def test_no_pause_when_it_makes_more_videos_late_than_it_saves_images():
    tight = video("v1", deadline=26.5)  # 25 steps of 1 s left: 1.5 s of slack > the image's 1 s of service
    assert planner().plan([tight, image("i1")], now=0.0).paused == ("v1",)
    tighter = video("v1", deadline=25.5)  # 0.5 s slack < the image's 1 s of service: one video made late
    plan = planner().plan([tighter, image("i1")], now=0.0)
    assert plan.paused == ("v1",)  # one image saved, one video lost: the tie goes to the image
    assert any("1 image deadline(s) saved, 1 video(s) made late" in r for r in plan.reasons)
    both = [video("v1", deadline=25.5), video("v2", deadline=25.5), image("i1")]  # two lost for one saved
    plan = planner().plan(both, now=0.0)
    assert set(plan.batch) == {"v1", "v2"} and not plan.paused


def test_no_pause_for_an_image_that_misses_anyway():
    plan = planner().plan([video("v1"), image("i1", deadline=0.5)], now=0.0)  # needs 1 s, has 0.5 s
    assert plan.batch == ("v1",)


def test_disabled_video_preemption_lets_the_group_drain():
    plan = planner(video_preemption=False).plan([video("v1"), image("i1")], now=0.0)
    assert plan.batch == ("v1",) and not plan.paused


def test_bounded_number_of_paused_videos():
    paused = [video(f"p{i}", phase=Phase.PAUSED) for i in range(3)]
    seqs = [video("v1"), *paused, image("i1")]
    assert planner(max_paused_videos=4).plan(seqs, now=0.0).paused == ("v1",)
    assert planner(max_paused_videos=3).plan(seqs, now=0.0).batch == ("v1",)


def test_a_video_paused_past_its_bound_resumes_first_and_no_video_starves():
    """A steady stream of images with deadlines: the video still finishes, its pauses bounded."""
    p = planner(max_pause_s=5.0)
    v = video("v", steps=20, done=0, deadline=1000.0, phase=Phase.WAITING)
    live = {"v": v}
    now, arrivals, finished_at, longest_pause = 0.0, 0, None, 0.0
    for _ in range(2000):
        if now >= arrivals * 0.5:  # an image every 0.5 s, each due 1.5 s after it arrives
            sid = f"i{arrivals}"
            live[sid] = image(sid, arrival=now, steps=4, deadline=now + 1.5)
            arrivals += 1
        plan = p.plan(live.values(), now)
        if plan.idle:
            now += 0.05
            continue
        apply_plan(live, plan, now)
        dt = VIDEO_STEP_S if plan.shape == VID else IMAGE_STEP_S
        now += dt
        if v.paused_at is not None:
            longest_pause = max(longest_pause, now - v.paused_at)
        done = update(live, plan, StepResult(stepped=plan.batch, seconds=dt))
        if "v" in done.finished:
            finished_at = now
            break
    assert finished_at is not None, "the video starved"
    assert v.paused_s > 0  # it did yield to images
    assert v.paused_s <= 5.0 + 2 * VIDEO_STEP_S + 4 * IMAGE_STEP_S  # the bound, plus the steps that straddle it
    assert longest_pause <= 5.0 + 1.0
    assert math.isfinite(finished_at)


def test_apply_plan_accounts_pause_time():
    v = video("v")
    seqs = {"v": v, "i": image("i")}
    apply_plan(seqs, StepPlanner(PlannerConfig()).plan([], 0.0), 0.0)  # an idle plan changes nothing
    from stepfleet.serving.planner import StepPlan

    apply_plan(seqs, StepPlan(batch=("i",), paused=("v",)), now=1.0)
    assert v.phase is Phase.PAUSED and v.paused_at == 1.0
    apply_plan(seqs, StepPlan(batch=("v",)), now=4.0)
    assert v.phase is Phase.RUNNING and v.paused_s == 3.0 and v.paused_at is None


def test_an_image_behind_a_video_with_slack_still_runs():
    """EDF ranks an old paused video (earlier deadline) before a fresh image; it has slack, so the image goes."""
    old = video("old", done=10, deadline=2.5, phase=Phase.PAUSED)  # deadline 2.5 s < the image's 3 s
    old.steps_total, old.steps_done = 11, 10  # one 1 s step left, 1.5 s of slack
    plan = planner().plan([video("v1"), old, image("i1", deadline=3.0)], now=0.0)
    assert plan.batch == ("i1",) and "v1" in plan.paused


def test_a_video_that_misses_anyway_does_not_block_an_image():
    late = video("v1", deadline=10.0)  # 25 steps of 1 s left: it misses whatever happens
    plan = planner().plan([late, image("i1")], now=0.0)
    assert plan.batch == ("i1",) and plan.paused == ("v1",)
