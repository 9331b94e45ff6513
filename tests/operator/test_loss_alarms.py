"""`loop.alarms`: which Deployment changes wake the control loop early (pure bookkeeping)."""

from __future__ import annotations

from stepfleet.operator.loop.alarms import LossWatch, lost_ready

SERVICE = ("ml", "sd15")


def deployment(ready: int, desired: int, uid: str = "u1") -> dict:
    return {"metadata": {"uid": uid, "name": "sd15-l4", "namespace": "ml"},
            "spec": {"replicas": desired}, "status": {"readyReplicas": ready}}


def test_lost_ready_is_a_fall_below_both_the_last_count_and_the_desired_one():
    assert lost_ready(5, 3, 5)
    assert not lost_ready(None, 0, 5)  # the first sight of a Deployment is no loss
    assert not lost_ready(5, 3, 3)  # a planned scale-down lowered spec.replicas first
    assert not lost_ready(3, 5, 5)  # more ready is never a loss


def test_a_loss_raises_one_alarm_for_its_service_and_scale_downs_raise_none():
    watch = LossWatch()
    assert not watch.observe(SERVICE, deployment(4, 4))
    assert not watch.take(SERVICE)
    assert not watch.observe(SERVICE, deployment(4, 2))  # asked to shrink: nothing lost yet
    assert not watch.observe(SERVICE, deployment(2, 2))  # the shrink lands
    assert watch.observe(SERVICE, deployment(0, 2))  # both ready pods vanish
    assert watch.take(SERVICE) and not watch.take(SERVICE)
    assert not watch.take(("ml", "other"))


def test_deployments_are_tracked_apart_and_forgotten_on_delete():
    watch = LossWatch()
    watch.observe(SERVICE, deployment(3, 3, uid="a"))
    assert not watch.observe(SERVICE, deployment(1, 3, uid="b"))  # b's first sight
    watch.forget(deployment(3, 3, uid="a"))
    assert not watch.observe(SERVICE, deployment(0, 3, uid="a"))  # forgotten: a first sight again
