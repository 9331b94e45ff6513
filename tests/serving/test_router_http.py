"""The router over real HTTP: uvicorn on loopback in front of fake workers."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
from PIL import Image

from stepfleet.serving.router.app import create_app
from stepfleet.serving.router.balancing import rendezvous_rank
from stepfleet.serving.router.config import RouterSettings, parse_config
from tests.serving.conftest import free_port
from tests.serving.router_fakes import FakeWorker

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fleet(serve_app):
    workers = [FakeWorker(f"w{i}") for i in range(4)]
    with ExitStack() as stack:
        urls = [stack.enter_context(serve_app(w.app())) for w in workers]
        yield list(zip(workers, urls, strict=True))


@pytest.fixture(autouse=True)
def _reset(request):
    if "fleet" in request.fixturenames:
        for w, _ in request.getfixturevalue("fleet"):
            w.seen.clear()
            w.status, w.delay_s, w.backlog_s, w.retry_after, w.hung = 200, 0.0, 0.0, "2", False


def pools_yaml(*pools: tuple[str, list[str], float]) -> str:
    lines = ["version: 1", "service: test", "model: tiny-sd", "pools:"]
    for name, urls, weight in pools:
        lines += [f"- name: {name}", f"  endpoints: [{', '.join(urls)}]" if urls else f"  url: {dead_url()}",
                  f"  weight: {weight}", "  accelerator: cpu", "  pricePerHour: 0.1"]
    return "\n".join(lines) + "\n"


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


@contextmanager
def router(serve_app, tmp_path: Path, text: str, **settings):
    path = tmp_path / "router.yaml"
    path.write_text(text)
    opts = {"reload_s": 0.05, "load_poll_s": 0.2, **settings}
    app = create_app(parse_config(text), RouterSettings(**opts), config_path=str(path))
    with serve_app(app) as base:
        yield base, path


def gen(base: str, body: dict | None = None, **kw) -> httpx.Response:
    return httpx.post(f"{base}/v1/images/generations", json=body or {"prompt": "x"}, **{"timeout": 30, **kw})


def test_forwards_json_and_propagates_request_id(serve_app, tmp_path, fleet):
    (w0, u0), _ = fleet[0], fleet[1]
    with router(serve_app, tmp_path, pools_yaml(("a", [u0], 1.0))) as (base, _):
        r = gen(base, {"prompt": "a boat", "num_inference_steps": 3},
                headers={"X-Request-Id": "rid-123", "Authorization": "Bearer secret"})
        assert r.status_code == 200, r.text
        assert r.json()["worker"] == "w0"
        assert r.headers["x-request-id"] == "rid-123" and r.headers["x-stepfleet-pool"] == "a"
        assert "x-stepfleet-backlog-seconds" not in r.headers
        seen = w0.seen[-1]
        assert seen.headers["x-request-id"] == "rid-123"
        assert "authorization" not in seen.headers  # the router's credential stays at the router
        assert seen.body == b'{"prompt":"a boat","num_inference_steps":3}'
        models = httpx.get(f"{base}/v1/models", timeout=10)
        assert models.status_code == 200 and models.json()["path"] == "/v1/models"


def test_weighted_split_and_weight_zero(serve_app, tmp_path, fleet):
    (w0, u0), (w1, u1), (w2, u2), (w3, u3) = fleet
    text = pools_yaml(("a", [u0, u1], 0.75), ("b", [u2], 0.25), ("z", [u3], 0.0))
    with router(serve_app, tmp_path, text) as (base, _), httpx.Client(timeout=30) as client:
        pools = Counter(client.post(f"{base}/v1/images/generations", json={"prompt": "x"}).headers["x-stepfleet-pool"]
                        for _ in range(200))
    assert abs(pools["a"] / 200 - 0.75) <= 0.05 * 0.75 and abs(pools["b"] / 200 - 0.25) <= 0.05 * 0.25
    assert pools["z"] == 0 and w3.count() == 0
    assert w0.count() > 0 and w1.count() > 0  # both workers of pool a serve


def _png(mode: str = "RGBA", transparent_share: float = 0.25) -> bytes:
    img = Image.new(mode, (64, 64), (0, 0, 0, 255) if mode == "RGBA" else (9, 9, 9))
    if mode == "RGBA":
        img.paste((0, 0, 0, 0), (0, 0, int(64 * transparent_share), 64))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_multipart_edits_are_forwarded_intact_and_follow_their_template(serve_app, tmp_path, fleet):
    urls = [u for _, u in fleet]
    by_url = {u: w for w, u in fleet}
    image, mask = _png("RGB"), _png()
    with router(serve_app, tmp_path, pools_yaml(("a", urls, 1.0))) as (base, _), httpx.Client(timeout=30) as client:
        homes = {}
        for tpl in ("tpl-1", "tpl-2", "tpl-3", "tpl-4", "tpl-5", "tpl-6"):
            workers = set()
            for _ in range(3):
                r = client.post(f"{base}/v1/images/edits", data={"prompt": "a hat", "template_id": tpl, "size": "64x64"},
                                files={"mask": ("mask.png", mask, "image/png")})
                assert r.status_code == 200, r.text
                workers.add(r.json()["worker"])
            assert len(workers) == 1  # always the template's home
            homes[tpl] = workers.pop()
            assert homes[tpl] == by_url[rendezvous_rank(tpl, urls)[0]].name
        assert len(set(homes.values())) >= 2
        # a plain edit (image + mask) arrives byte for byte, boundary and all
        r = client.post(f"{base}/v1/images/edits", data={"prompt": "red", "n": "2"},
                        files={"image": ("in.png", image, "image/png"), "mask": ("mask.png", mask, "image/png")})
        assert r.status_code == 200
        form = r.json()["form"]
        assert form["prompt"] == "red" and form["n"] == "2"
        assert form["image"] == {"filename": "in.png", "size": len(image)}
        assert form["mask"] == {"filename": "mask.png", "size": len(mask)}
        seen = by_url[[u for u in urls if by_url[u].name == r.json()["worker"]][0]].seen[-1]
        assert seen.headers["content-type"].startswith("multipart/form-data; boundary=")
        assert image in seen.body and mask in seen.body


def test_template_registration_goes_to_the_home_of_the_id_the_router_chose(serve_app, tmp_path, fleet):
    urls = [u for _, u in fleet]
    by_url = {u: w for w, u in fleet}
    with router(serve_app, tmp_path, pools_yaml(("a", urls, 1.0))) as (base, _), httpx.Client(timeout=30) as client:
        for _ in range(6):
            r = client.post(f"{base}/v1/templates", data={"prompt": "logo"},
                            files={"image": ("t.png", _png("RGB"), "image/png")})
            assert r.status_code == 200, r.text
            worker = next(w for w, _ in fleet if w.name == r.json()["worker"])
            chosen = worker.seen[-1].headers["x-stepfleet-template-id"]
            assert by_url[rendezvous_rank(chosen, urls)[0]] is worker  # where its edits will be sent
        assert client.delete(f"{base}/v1/templates/logo").status_code == 200
    assert all(any(s.method == "DELETE" and s.path == "/v1/templates/logo" for s in w.seen) for w, _ in fleet)


def test_failover_to_another_worker_then_another_pool(serve_app, tmp_path, fleet):
    (w0, u0), (_, u1) = fleet[0], fleet[1]
    w0.status = 500
    text = pools_yaml(("a", [dead_url(), u0], 10.0), ("b", [u1], 1.0))
    with router(serve_app, tmp_path, text, load_poll_s=60) as (base, _):
        r = gen(base)
        assert r.status_code == 200 and r.json()["worker"] == "w1"
        assert r.headers["x-stepfleet-pool"] == "b"
        metrics = httpx.get(f"{base}/metrics").text
        assert 'stepfleet_router_retries_total{pool="a",reason="500"} 1.0' in metrics
        # The dead worker was either tried (a refused connection) or already ejected by the
        # load poller's first round; either way the client never saw it.
        refused = 'stepfleet_router_retries_total{pool="a",reason="ConnectError"} 1.0' in metrics
        assert r.headers["x-stepfleet-attempts"] == ("3" if refused else "2")
        dead = httpx.get(f"{base}/router/state").json()["pools"][0]["endpoints"]
        assert sum(e["down"] for e in dead) == 1


def test_every_worker_failing_is_a_clear_503(serve_app, tmp_path, fleet):
    (w0, u0), (w1, u1) = fleet[0], fleet[1]
    w0.status = w1.status = 503
    with router(serve_app, tmp_path, pools_yaml(("a", [u0], 1.0), ("b", [u1], 1.0))) as (base, _):
        r = gen(base)
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == "upstream_unavailable" and "w" in err["message"] and r.headers["retry-after"]


def test_saturation_is_429_with_retry_after(serve_app, tmp_path, fleet):
    (w0, u0), (w1, u1) = fleet[0], fleet[1]
    w0.status = w1.status = 429
    w0.retry_after, w1.retry_after = "3", "7"
    with router(serve_app, tmp_path, pools_yaml(("a", [u0, u1], 1.0))) as (base, _):
        r = gen(base)
        assert r.status_code == 429 and r.json()["error"]["code"] == "saturated"
        assert r.headers["retry-after"] == "3"
        assert gen(base).status_code == 429  # no worker is asked again before its Retry-After
        assert w0.count() == 1 and w1.count() == 1


def test_no_pool_is_a_503_json(serve_app, tmp_path):
    with router(serve_app, tmp_path, "version: 1\npools: []\n") as (base, _):
        r = gen(base)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_pool"
        assert httpx.get(f"{base}/readyz").status_code == 200


@pytest.mark.parametrize(("kwargs", "status", "param"), [
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, None),
    ({"json": {"prompt": "x", "bogus": 1}}, 400, "bogus"),
    ({"json": {"size": "64x64"}}, 400, "prompt"),
    ({"json": {"prompt": "x", "n": "many"}}, 400, "n"),
    ({"json": ["prompt"]}, 400, None),
    ({"json": {"prompt": "x" * 5000}}, 413, None),
])
def test_bad_generation_input_never_reaches_a_worker(serve_app, tmp_path, fleet, kwargs, status, param):
    w0, u0 = fleet[0]
    with router(serve_app, tmp_path, pools_yaml(("a", [u0], 1.0)), max_body_bytes=4096) as (base, _):
        r = httpx.post(f"{base}/v1/images/generations", timeout=10, **kwargs)
    assert r.status_code == status
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]
    assert w0.count() == 0


def test_bad_edit_input_names_the_field(serve_app, tmp_path, fleet):
    w0, u0 = fleet[0]
    with router(serve_app, tmp_path, pools_yaml(("a", [u0], 1.0))) as (base, _):
        r = httpx.post(f"{base}/v1/images/edits", content=b"prompt=x", headers={"content-type": "text/plain"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "content-type"
        r = httpx.post(f"{base}/v1/images/edits", json={"prompt": "x"})  # OpenAI's JSON edit, without images
        assert r.status_code == 400 and r.json()["error"]["param"] == "images"
        r = httpx.post(f"{base}/v1/images/edits", files={"image": ("a.png", _png("RGB"), "image/png")})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = httpx.post(f"{base}/v1/images/edits", data={"prompt": "x"}, files={"mask": ("m.png", _png(), "image/png")})
        assert r.status_code == 400 and r.json()["error"]["param"] == "image"
        assert httpx.get(f"{base}/nope").status_code == 404
    assert w0.count("/v1/images/edits") == 0


def test_config_change_is_applied_live_without_dropping_requests(serve_app, tmp_path, fleet):
    (w0, u0), (w1, u1) = fleet[0], fleet[1]
    w0.delay_s = w1.delay_s = 0.05
    with router(serve_app, tmp_path, pools_yaml(("a", [u0], 1.0), ("b", [u1], 0.0))) as (base, path):
        statuses: list[int] = []
        stop = threading.Event()

        def traffic() -> None:
            with httpx.Client(timeout=30) as c:
                while not stop.is_set():
                    statuses.append(c.post(f"{base}/v1/images/generations", json={"prompt": "x"}).status_code)

        threads = [threading.Thread(target=traffic) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        path.write_text(pools_yaml(("a", [u0], 0.0), ("b", [u1], 1.0)))
        deadline = time.monotonic() + 5
        while httpx.get(f"{base}/router/state").json()["pools"][1]["weight"] != 1.0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.2)  # requests routed before the change finish
        before = w0.count()
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join()
        assert statuses and set(statuses) == {200}
        assert w0.count() == before and w1.count() > 0  # pool a gets nothing new
        # a broken file is refused; the last good config stays
        path.write_text("version: 1\npools: [{name: a}]\n")

        def reload_errors() -> float:
            for line in httpx.get(f"{base}/metrics").text.splitlines():
                if line.startswith('stepfleet_router_config_reloads_total{result="error"}'):
                    return float(line.split()[-1])
            return 0.0

        deadline = time.monotonic() + 10
        while reload_errors() < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        # >= 1: a reload may also catch the file half-written (write_text is not atomic).
        assert reload_errors() >= 1
        assert httpx.get(f"{base}/router/state").json()["pools"][1]["weight"] == 1.0
        assert gen(base).json()["worker"] == "w1"
        metrics = httpx.get(f"{base}/metrics").text
        assert 'stepfleet_router_pool_weight_ratio{pool="b"} 1.0' in metrics


def test_api_keys_and_rate_limits(serve_app, tmp_path, fleet):
    w0, u0 = fleet[0]
    keys = tmp_path / "keys"
    keys.write_text("sk-open rps=0\nsk-slow rps=0.5 burst=2\n")
    with router(serve_app, tmp_path, pools_yaml(("a", [u0], 1.0)), api_keys_file=str(keys),
                rate_limit_rps=100) as (base, _):
        assert httpx.get(f"{base}/healthz").status_code == 200  # probes need no key
        r = gen(base)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert gen(base, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert gen(base, headers={"Authorization": "Bearer sk-open"}).status_code == 200
        slow = {"Authorization": "Bearer sk-slow"}
        assert [gen(base, headers=slow).status_code for _ in range(2)] == [200, 200]
        r = gen(base, headers=slow)
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(r.headers["retry-after"]) >= 1
        keys.write_text("sk-open rps=0\nsk-new\n")  # keys reload with the config
        time.sleep(0.3)
        assert gen(base, headers={"Authorization": "Bearer sk-new"}).status_code == 200
        assert gen(base, headers={"Authorization": "Bearer sk-slow"}).status_code == 401
    assert w0.count() == 4


def test_loads_from_headers_and_polling_steer_traffic(serve_app, tmp_path, fleet):
    (w0, u0), (_, u1) = fleet[0], fleet[1]
    w0.backlog_s = 30.0  # another router has filled w0
    with router(serve_app, tmp_path, pools_yaml(("a", [u0, u1], 1.0)), load_poll_s=0.05) as (base, _):
        time.sleep(0.3)
        state = httpx.get(f"{base}/router/state").json()
        assert state["pools"][0]["endpoints"][0]["wait_s"] > 20
        workers = Counter(gen(base).json()["worker"] for _ in range(10))
    assert workers == {"w1": 10}


FAKE_WORKER_MAIN = """
import operator, sys  # the standard library's operator, before the repo root (which has operator/) is on the path
sys.path.insert(0, sys.argv[2])
import uvicorn
from tests.serving.router_fakes import FakeWorker
w = FakeWorker("doomed", delay_s=30.0)
uvicorn.run(w.app(), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def test_worker_killed_mid_request_fails_over(serve_app, tmp_path, fleet):
    w1, u1 = fleet[1]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", FAKE_WORKER_MAIN, str(port), str(ROOT)], cwd=tmp_path)
    try:
        doomed = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{doomed}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "fake worker did not start"
            time.sleep(0.05)
        # all weight on the doomed worker's pool; the healthy one is the other pool
        text = pools_yaml(("a", [doomed], 1.0), ("b", [u1], 0.01))
        with router(serve_app, tmp_path, text, load_poll_s=60) as (base, _):
            result: dict = {}
            t = threading.Thread(target=lambda: result.update(r=gen(base, headers={"X-Request-Id": "killed-1"})))
            t.start()
            time.sleep(0.5)  # the request is now waiting inside the doomed worker
            proc.kill()
            t.join(timeout=20)
            r = result["r"]
            assert r.status_code == 200 and r.json()["worker"] == "w1"
            assert r.headers["x-stepfleet-attempts"] == "2"
            assert w1.seen[-1].headers["x-request-id"] == "killed-1"
    finally:
        proc.kill()
        proc.wait(timeout=10)
