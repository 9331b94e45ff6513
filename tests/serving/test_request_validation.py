"""Issue 19, finding 5: what a client sends wrong is a 400 naming the field (413 when too large),
on a worker as on the router — never a 500 — and the request validators hold for any input
(hypothesis).

The worker here serves a `FakeRunner` engine: what is checked is what reaches it.
"""

from __future__ import annotations

import json
import math
import re

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from stepfleet.serving.app import create_app
from stepfleet.serving.engine import Engine, EngineConfig
from stepfleet.serving.errors import APIError
from stepfleet.serving.jsonbody import MAX_DEPTH, nested_deeper_than, parse_object
from stepfleet.serving.schemas import (
    MAX_NAME_CHARS,
    MAX_PROMPT_CHARS,
    ImageEditForm,
    ImageGenerationRequest,
)
from stepfleet.serving.settings import WorkerSettings
from tests.serving.fakes import FakeRunner
from tests.serving.test_router_faults import BAD_BODIES

SIZE_RE = re.compile(r"auto|[0-9]{1,5}x[0-9]{1,5}")


@pytest.fixture(scope="module")
def worker(serve_app):
    fake = FakeRunner(step_s=0.0)
    app = create_app(WorkerSettings(warmup=False, max_json_bytes=2_000_000), engine=Engine(fake, EngineConfig()))
    with serve_app(app) as base:
        yield base, fake


@pytest.mark.parametrize(("body", "param"), BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_a_worker_answers_client_mistakes_with_400_naming_the_field(worker, body, param):
    base, fake = worker
    before = len(fake.batches)
    r = httpx.post(f"{base}/v1/images/generations", content=body, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert r.json()["error"]["code"] == ("invalid_json" if param is None else "invalid_value")
    assert len(fake.batches) == before  # nothing ran


def test_a_worker_refuses_json_bodies_over_its_limit_before_reading_them(serve_app):
    app = create_app(WorkerSettings(warmup=False, max_json_bytes=4096), engine=Engine(FakeRunner(), EngineConfig()))
    with serve_app(app) as base:
        r = httpx.post(f"{base}/v1/images/generations", json={"prompt": "x", "user": "u" * 5000}, timeout=30)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        ok = httpx.post(f"{base}/v1/images/generations", json={"prompt": "x", "num_inference_steps": 1}, timeout=30)
        assert ok.status_code == 200, ok.text


# -- the validators, for any input ------------------------------------------------------------------

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
FIELDS = sorted(ImageGenerationRequest.model_fields)


def _check_accepted(req: ImageGenerationRequest) -> None:
    """What an accepted generation request must be, whatever was sent."""
    for name in FIELDS:
        value = getattr(req, name)
        if isinstance(value, str):
            value.encode("utf-8")  # no lone surrogates
            limit = MAX_PROMPT_CHARS if name in ("prompt", "negative_prompt") else MAX_NAME_CHARS
            assert len(value) <= limit, name
        if isinstance(value, float):
            assert math.isfinite(value), name
    assert type(req.n) is int and 1 <= req.n
    assert req.num_inference_steps is None or type(req.num_inference_steps) is int
    assert req.size is None or SIZE_RE.fullmatch(req.size)
    assert req.deadline_ms is None or 0 < req.deadline_ms <= 86_400_000
    assert req.priority is None or type(req.priority) in (str, int)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=st.text(max_size=50) | JSON_VALUES, overrides=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES,
                                                                             max_size=4))
def test_generation_validation_accepts_only_what_a_model_can_take(prompt, overrides):
    try:
        req = ImageGenerationRequest.model_validate({"prompt": prompt, **overrides})
    except ValidationError as exc:
        assert exc.errors()  # every refusal names a location
        return
    _check_accepted(req)


@settings(max_examples=200, deadline=None)
@given(fields=st.dictionaries(st.sampled_from(["n", "size", "seed", "guidance_scale", "deadline_ms", "strength",
                                               "negative_prompt", "template_id", "priority"]),
                              st.text(max_size=12), max_size=4))
def test_edit_form_validation_converts_text_and_refuses_the_rest(fields):
    try:
        form = ImageEditForm.model_validate({"prompt": "p", **fields})
    except ValidationError:
        return
    assert type(form.n) is int and form.n >= 1
    assert form.size is None or SIZE_RE.fullmatch(form.size)
    for value in (form.guidance_scale, form.deadline_ms, form.strength):
        assert value is None or math.isfinite(value)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | JSON_VALUES.map(lambda v: json.dumps(v).encode()))
def test_json_bodies_parse_to_an_object_or_a_400(body):
    try:
        data = parse_object(body)
    except APIError as exc:
        assert exc.status == 400 and exc.code == "invalid_json"
        return
    assert isinstance(data, dict)


def _depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES, st.integers(min_value=0, max_value=6))
def test_the_depth_scan_agrees_with_the_parser(value, limit):
    body = json.dumps(value).encode()
    assert nested_deeper_than(body, limit) == (_depth(value) > limit)


def test_depth_is_refused_before_the_parser_recurses():
    for body in (b"[" * 100_000, b'{"a":' * 50_000, b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1)):
        with pytest.raises(APIError) as err:
            parse_object(body)
        assert err.value.status == 400 and "nested deeper" in err.value.message
    assert parse_object(b'{"a": ' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}") == {
        "a": json.loads(b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1))}
