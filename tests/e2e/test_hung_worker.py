"""Issue 19, finding 2, with real processes: a worker stopped by SIGSTOP is failed over by the
router, and rejoins once SIGCONT lets it answer again.

Two `stepfleet worker` processes (tiny model) and a `stepfleet router` on loopback, sharing a
worker token through `STEPFLEET_WORKER_TOKEN`. Before the fix, half the requests sent while
a worker was stopped waited for the 300 s upstream timeout.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack

import httpx
import pytest
import yaml

from tests.serving.conftest import free_port

TOKEN = "e2e-worker-token"
BODY = {"prompt": "a red square", "size": "64x64", "num_inference_steps": 2}


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stepfleet.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_ready(url: str, procs: list[subprocess.Popen], timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert all(p.poll() is None for p in procs), "a process exited"
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} never became ready"
        time.sleep(0.2)


@pytest.fixture
def fleet(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "STEPFLEET_WORKER_TOKEN": TOKEN}
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    with ExitStack() as stack:
        procs = []
        for port in ports:
            proc = _start(["worker", "--model", "tiny-sd", "--port", str(port), "--pool", "p", "--max-batch", "2",
                           "--no-warmup", "--default-steps", "2"], env)
            stack.callback(_kill, proc)
            procs.append(proc)
        (tmp_path / "router.yaml").write_text(yaml.safe_dump(
            {"version": 1, "service": "e2e", "pools": [{"name": "p", "endpoints": urls, "weight": 1.0}]}))
        router_port = free_port()
        router = _start(["router", "--config", str(tmp_path / "router.yaml"), "--port", str(router_port),
                         "--discovery", "static", "--load-poll-s", "0.2", "--load-poll-timeout-s", "0.5",
                         "--hang-polls", "2", "--default-steps", "2", "--no-access-log"], env)
        stack.callback(_kill, router)
        base = f"http://127.0.0.1:{router_port}"
        for url in urls:
            _wait_ready(url, procs)
        _wait_ready(base, [router])
        yield base, urls, procs


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()


def _state(base: str, url: str) -> dict:
    pools = httpx.get(f"{base}/router/state", timeout=10).json()["pools"]
    return next(e for p in pools for e in p["endpoints"] if e["url"] == url)


@pytest.mark.slow  # about a minute on two cores (three processes, two model loads); the default
# suite covers the same path in process (tests/serving/test_router_faults.py)
def test_a_stopped_worker_is_failed_over_and_rejoins_after_sigcont(fleet):
    base, urls, procs = fleet
    # both serve (the router holds the token the workers ask for)
    with httpx.Client(timeout=60) as client:
        assert {client.post(f"{base}/v1/images/generations", json=BODY).headers["x-stepfleet-pool"]
                for _ in range(4)} == {"p"}
    assert httpx.post(f"{urls[0]}/v1/images/generations", json=BODY, timeout=30).status_code == 401

    procs[0].send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with httpx.Client(timeout=60) as client, cf.ThreadPoolExecutor(8) as ex:
            replies = list(ex.map(lambda _: client.post(f"{base}/v1/images/generations", json=BODY), range(8)))
        took = time.monotonic() - started
        assert [r.status_code for r in replies] == [200] * 8  # none lost, none hung
        assert took < 30
        assert _state(base, urls[0])["unresponsive"]
        # while it is out, a deadline is kept even so
        r = httpx.post(f"{base}/v1/images/generations", json={**BODY, "deadline_ms": 20_000}, timeout=60)
        assert r.status_code == 200
    finally:
        procs[0].send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 20
    while _state(base, urls[0])["unresponsive"]:
        assert time.monotonic() < deadline, "the worker never came back into rotation"
        time.sleep(0.1)
    deadline = time.monotonic() + 20
    while _state(base, urls[0])["inflight"] or _state(base, urls[1])["inflight"]:
        assert time.monotonic() < deadline, "in-flight slots not given back"
        time.sleep(0.1)
