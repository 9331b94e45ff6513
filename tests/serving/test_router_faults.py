"""Issue 19, router side, over real HTTP: in-flight slots never leak, hung workers are failed over
and come back, deadlines bound every request, and client mistakes never reach a worker.

Each test names the finding it covers; each failed on the code before the fix.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
from contextlib import ExitStack

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serving.router_fakes import FakeWorker
from tests.serving.test_router_http import _png, gen, pools_yaml, router

#: Fast health checks, so a hang is found in about a second.
FAST_HEALTH = {"load_poll_s": 0.1, "load_poll_timeout_s": 0.3, "hang_polls": 2}


@pytest.fixture(scope="module")
def pair(serve_app):
    workers = [FakeWorker("a"), FakeWorker("b")]
    with ExitStack() as stack:
        urls = [stack.enter_context(serve_app(w.app())) for w in workers]
        yield list(zip(workers, urls, strict=True))


@pytest.fixture(autouse=True)
def _reset(pair):
    yield
    for w, _ in pair:
        w.seen.clear()
        w.status, w.delay_s, w.backlog_s, w.hung = 200, 0.0, 0.0, False


def inflight(base: str) -> list[int]:
    state = httpx.get(f"{base}/router/state", timeout=10).json()
    return [e["inflight"] for p in state["pools"] for e in p["endpoints"]]


def endpoint(base: str, url: str) -> dict:
    state = httpx.get(f"{base}/router/state", timeout=10).json()
    return next(e for p in state["pools"] for e in p["endpoints"] if e["url"] == url)


def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


# -- finding 1: the router locked itself into refusing all traffic ---------------------------------

def test_clients_that_leave_give_their_slots_back(serve_app, tmp_path, pair):
    (wa, ua), _ = pair
    wa.delay_s = 1.0
    with router(serve_app, tmp_path, pools_yaml(("p", [ua], 1.0)), max_inflight_per_worker=3) as (base, _):
        for _ in range(6):  # twice the slots: each client gives up before the worker answers
            with pytest.raises(httpx.ReadTimeout):
                gen(base, timeout=0.2)
        wait_for(lambda: inflight(base) == [0])
        wa.delay_s = 0.0
        r = gen(base)
        assert r.status_code == 200, r.text  # before the fix: 429 "every worker is saturated", for good


def test_paths_outside_latin1_are_forwarded_percent_encoded(serve_app, tmp_path, pair):
    (wa, ua), _ = pair
    with router(serve_app, tmp_path, pools_yaml(("p", [ua], 1.0)), max_inflight_per_worker=2) as (base, _):
        for _ in range(5):  # more than the slots: none may leak
            r = httpx.get(f"{base}/v1/models/€ü%2F", timeout=10)
            assert r.status_code == 200, r.text  # before: 500 (latin-1 encoding) and a leaked slot
        assert wa.seen[-1].path == "/v1/models/€ü/"  # the worker reads the client's path
        assert inflight(base) == [0]
        assert gen(base).status_code == 200


# -- finding 2: a hung worker was never failed over -----------------------------------------------

def test_a_hung_worker_is_failed_over_and_rejoins_when_it_answers(serve_app, tmp_path, pair):
    (wa, ua), (wb, ub) = pair
    with router(serve_app, tmp_path, pools_yaml(("p", [ua, ub], 1.0)), **FAST_HEALTH) as (base, _):
        wa.hung = True  # connections are accepted, nothing is answered: a SIGSTOPped worker
        started = time.monotonic()
        with httpx.Client(timeout=15) as client, cf.ThreadPoolExecutor(8) as ex:
            replies = list(ex.map(lambda _: client.post(f"{base}/v1/images/generations", json={"prompt": "x"}),
                                  range(8)))
        took = time.monotonic() - started
        assert [r.status_code for r in replies] == [200] * 8
        assert {r.json()["worker"] for r in replies} == {"b"}
        assert wa.count() >= 1  # some were sent to the hung worker first, then retried on b
        assert took < 5.0  # before the fix: the upstream timeout, 300 s
        assert endpoint(base, ua)["unresponsive"]
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
        hung = [s for f in text_string_to_metric_families(metrics) for s in f.samples
                if s.name == "stepfleet_router_worker_unresponsive_total"]
        assert hung and hung[0].value >= 1

        wa.hung = False
        wait_for(lambda: not endpoint(base, ua)["unresponsive"])
        served = {gen(base).json()["worker"] for _ in range(10)}
        assert "a" in served  # back in rotation
        wait_for(lambda: inflight(base) == [0, 0])


def test_deadline_ms_bounds_the_wait_for_a_slow_worker(serve_app, tmp_path, pair):
    (wa, ua), _ = pair
    wa.delay_s = 3.0  # slow, not hung: it answers its load polls
    with router(serve_app, tmp_path, pools_yaml(("p", [ua], 1.0))) as (base, _):
        started = time.monotonic()
        r = gen(base, {"prompt": "x", "deadline_ms": 400})
        took = time.monotonic() - started
        assert r.status_code == 504, r.text  # before: a 200 after 3 s, long past the deadline
        assert r.json()["error"]["code"] == "deadline_exceeded" and r.json()["error"]["param"] == "deadline_ms"
        assert 0.35 < took < 1.5
        assert not endpoint(base, ua)["unresponsive"]  # slow is not hung
        wait_for(lambda: inflight(base) == [0])


def test_deadline_ms_is_carried_into_retries(serve_app, tmp_path, pair):
    (wa, ua), (wb, ub) = pair
    wa.status, wa.delay_s = 500, 0.3
    wb.status, wb.delay_s = 500, 0.3
    with router(serve_app, tmp_path, pools_yaml(("p", [ua], 1.0), ("q", [ub], 1.0)), max_attempts=5) as (base, _):
        started = time.monotonic()
        r = gen(base, {"prompt": "x", "deadline_ms": 450})
        assert r.status_code == 504 and time.monotonic() - started < 1.2
        assert wa.count() + wb.count() == 2  # the third attempt would start past the deadline


# -- finding 5: client-caused errors are 4xx naming the field, never sent to a worker --------------

BAD_BODIES = [
    (b'{"prompt": "a \\ud800 cat"}', "prompt"),  # a lone surrogate: the tokenizer failed (500)
    (b'{"prompt": "x", "n": true}', "n"),
    (b'{"prompt": "x", "n": "2"}', "n"),
    (b'{"prompt": "x", "deadline_ms": NaN}', "deadline_ms"),
    (b'{"prompt": "x", "deadline_ms": Infinity}', "deadline_ms"),
    (b'{"prompt": "x", "guidance_scale": -Infinity}', "guidance_scale"),
    (b'{"prompt": "x", "size": " 64x64"}', "size"),
    (b'{"prompt": "x", "size": "1_024x64"}', "size"),
    (b'{"prompt": "x", "size": "64x64\\n"}', "size"),
    ('{"prompt": "x", "size": "６４x64"}'.encode(), "size"),
    (json.dumps({"prompt": "x", "negative_prompt": "n" * 1_000_000}).encode(), "negative_prompt"),
    (b"[" * 100_000 + b"]" * 100_000, None),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
]


@pytest.mark.parametrize(("body", "param"), BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_client_mistakes_are_400s_naming_the_field_and_reach_no_worker(serve_app, tmp_path, pair, body, param):
    (wa, ua), _ = pair
    with router(serve_app, tmp_path, pools_yaml(("p", [ua], 1.0)), max_json_bytes=2_000_000) as (base, _):
        r = httpx.post(f"{base}/v1/images/generations", content=body, timeout=30,
                       headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["code"] == ("invalid_json" if param is None else "invalid_value")
    assert wa.count() == 0  # never retried, never blamed on a worker


def test_json_bodies_over_the_limit_are_413(serve_app, tmp_path, pair):
    (wa, ua), _ = pair
    with router(serve_app, tmp_path, pools_yaml(("p", [ua], 1.0)), max_json_bytes=4096) as (base, _):
        r = gen(base, {"prompt": "x", "user": "u" * 5000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert wa.count() == 0


@pytest.mark.parametrize(("data", "param"), [
    ({"prompt": "x", "n": "0"}, "n"),  # before: forwarded, and run as one image
    ({"prompt": "x", "deadline_ms": "nan"}, "deadline_ms"),
    ({"prompt": "x", "size": "64x64 "}, "size"),
    ({"prompt": "x", "negative_prompt": "n" * 5000}, "negative_prompt"),
    ({"prompt": "x", "bogus": "1"}, "bogus"),
])
def test_edit_forms_are_checked_before_forwarding(serve_app, tmp_path, pair, data, param):
    (wa, ua), _ = pair
    with router(serve_app, tmp_path, pools_yaml(("p", [ua], 1.0))) as (base, _):
        r = httpx.post(f"{base}/v1/images/edits", data=data, timeout=30,
                       files={"image": ("in.png", _png("RGB"), "image/png")})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert wa.count("/v1/images/edits") == 0
