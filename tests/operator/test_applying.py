"""Idempotent create-or-patch: the three-way merge and the conditions helper."""

from __future__ import annotations

import datetime as dt

from stepfleet.operator import applying, names
from stepfleet.operator.conditions import set_condition


def _desired(**spec):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "ns"}, "spec": spec}


def _live(desired, **server_defaults):
    live = applying.with_record(desired)
    live["spec"] = {**live["spec"], **server_defaults}
    live["metadata"]["resourceVersion"] = "7"
    return live


def test_create_when_missing_records_what_was_applied():
    action, body = applying.plan(None, _desired(type="ClusterIP"))
    assert action == "create"
    assert names.ANNOTATION_APPLIED in body["metadata"]["annotations"]


def test_unchanged_child_is_left_alone_despite_server_defaults():
    desired = _desired(type="ClusterIP", selector={"a": "1"})
    assert applying.plan(_live(desired, clusterIP="10.0.0.1"), desired) == ("none", None)


def test_drift_is_reverted():
    desired = _desired(type="ClusterIP", selector={"a": "1"})
    live = _live(desired)
    live["spec"]["selector"] = {"a": "2"}  # someone edited a managed field
    action, body = applying.plan(live, desired)
    assert action == "patch" and body["spec"]["selector"] == {"a": "1"}


def test_fields_dropped_from_desired_are_nulled():
    old = _desired(type="ClusterIP", selector={"a": "1", "b": "2"}, sessionAffinity="ClientIP")
    new = _desired(type="ClusterIP", selector={"a": "1"})
    action, body = applying.plan(_live(old), new)
    assert action == "patch"
    assert body["spec"]["selector"] == {"a": "1", "b": None}
    assert body["spec"]["sessionAffinity"] is None
    merged = applying.merge(_live(old), body)
    assert merged["spec"]["selector"] == {"a": "1"} and "sessionAffinity" not in merged["spec"]


def test_condition_transition_time_moves_only_on_status_change():
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    t1 = t0 + dt.timedelta(minutes=5)
    conds = set_condition([], "Ready", "False", "Progressing", "waiting", generation=1, now=t0)
    conds = set_condition(conds, "Ready", "False", "Progressing", "still waiting", generation=2, now=t1)
    assert conds[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z" and conds[0]["observedGeneration"] == 2
    conds = set_condition(conds, "Ready", "True", "Available", "ok", generation=2, now=t1)
    assert conds[0]["lastTransitionTime"] == "2026-01-01T00:05:00Z"
