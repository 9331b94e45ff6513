"""A real Prometheus scraping a real router and worker, with the chart's recording rules loaded.

Debian's Prometheus server (`scripts/fetch-tools.sh` links it into `.tools/bin/prometheus`)
runs on loopback with a generated config: 1 s scrape and evaluation intervals, the worker
and the router as static targets carrying the `namespace` label the operator's
ServiceMonitor would add, and `charts/stepfleet/rules/stepfleet.rules.yaml` with only the
recording group's interval shortened (30 s → 1 s). Traffic goes through the router in two
bursts a few scrapes apart (a counter's first sample has no rate), then the test reads raw
`stepfleet_` series and recording-rule values back through the HTTP API.

Under CI (`CI=true`) a missing Prometheus fails the test, saying how to install it; on a
developer's machine it skips.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from tests.serving.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "charts" / "stepfleet" / "rules" / "stepfleet.rules.yaml"
NAMESPACE = "e2e"
POOL = "scraped"


def _prometheus_binary() -> str:
    local = ROOT / ".tools" / "bin" / "prometheus"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("prometheus")
    if found:
        return found
    message = f"prometheus not found in {local.parent} or PATH: run scripts/fetch-tools.sh (`make test` does)"
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(message)
    pytest.skip(message)


def _spawn(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(args, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _wait(what: str, check: Callable[[], object], timeout_s: float, procs: dict[str, tuple[subprocess.Popen, Path]]):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, (proc, log) in procs.items():
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            value = check()
        except (httpx.HTTPError, ValueError, KeyError, IndexError):
            value = None
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what}")


def _fast_rules(path: Path) -> None:
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))


@pytest.fixture
def stack(tmp_path):
    """Worker, router and Prometheus on loopback; every process is killed at the end."""
    prometheus = _prometheus_binary()
    worker_port, router_port, prom_port = free_port(), free_port(), free_port()
    worker, router = f"127.0.0.1:{worker_port}", f"127.0.0.1:{router_port}"
    (tmp_path / "router.yaml").write_text(yaml.safe_dump(
        {"version": 1, "service": "e2e", "pools": [{"name": POOL, "endpoints": [f"http://{worker}"], "weight": 1}]}))
    _fast_rules(tmp_path / "rules.yaml")
    targets = {"worker": worker, "router": router}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yaml"],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [target], "labels": {"namespace": NAMESPACE}}]}
            for job, target in targets.items()
        ],
    }))
    py = [sys.executable, "-m", "stepfleet.cli"]
    procs: dict[str, tuple[subprocess.Popen, Path]] = {}
    try:
        for name, args in (
            ("worker", [*py, "worker", "--model", "tiny-sd", "--pool", POOL, "--port", str(worker_port),
                        "--max-batch", "2", "--log-level", "warning"]),
            ("router", [*py, "router", "--config", "router.yaml", "--port", str(router_port), "--discovery", "static",
                        "--log-level", "warning", "--load-poll-s", "0.5"]),
            ("prometheus", [prometheus, "--config.file=prometheus.yml", f"--storage.tsdb.path={tmp_path / 'data'}",
                            f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"]),
        ):
            log = tmp_path / f"{name}.log"
            procs[name] = (_spawn(args, tmp_path, log), log)
        yield f"http://{worker}", f"http://{router}", f"http://127.0.0.1:{prom_port}", procs
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc, _ in procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _query(prom: str, expr: str) -> list[dict]:
    answer = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5).json()
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def _value(prom: str, expr: str) -> float | None:
    result = _query(prom, expr)
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_the_fleet_and_evaluates_the_recording_rules(stack):
    worker, router, prom, procs = stack
    _wait("Prometheus to be ready", lambda: httpx.get(f"{prom}/-/ready", timeout=2).status_code == 200, 30, procs)
    _wait("the worker to load its model", lambda: httpx.get(f"{worker}/readyz", timeout=2).status_code == 200,
          120, procs)
    _wait("the router to see a ready worker",
          lambda: sum(httpx.get(f"{router}/readyz", timeout=2).json()["pools"].values()) > 0, 120, procs)

    def burst(n: int) -> None:
        for i in range(n):
            body = {"prompt": f"scrape me {i}", "size": "64x64", "num_inference_steps": 2, "deadline_ms": 60_000}
            resp = httpx.post(f"{router}/v1/images/generations", json=body, timeout=60)
            assert resp.status_code == 200, resp.text

    # First burst creates the labelled series; the second, a few scrapes later, gives them a rate.
    burst(1)
    _wait("the first requests to be scraped",
          lambda: _value(prom, f'sum(stepfleet_requests_total{{pool="{POOL}"}})') == 1.0, 20, procs)
    time.sleep(1.5)
    burst(3)

    rate = _wait("the request-rate recording rule",
                 lambda: _value(prom, f'namespace_pool:stepfleet_requests:rate5m{{namespace="{NAMESPACE}",'
                                      f'pool="{POOL}"}}'), 30, procs)
    assert rate > 0

    # Raw series from the worker and the router, labelled as the ServiceMonitor would label them.
    # A rule can turn positive from a scrape taken mid-burst: wait for a scrape after the last request.
    _wait("a scrape after the last request",
          lambda: _value(prom, f'sum(stepfleet_requests_total{{namespace="{NAMESPACE}",pool="{POOL}"}})') == 4.0,
          20, procs)
    assert _value(prom, f'sum(stepfleet_images_generated_total{{pool="{POOL}"}})') == 4.0
    assert _value(prom, f'stepfleet_worker_ready{{job="worker",pool="{POOL}"}}') == 1.0
    # The router is its own scrape target, on its own 1 s clock: wait for its scrape after the burst too
    # (CI once read it one scrape early: 1.0).
    _wait("a router scrape after the last request",
          lambda: _value(prom, 'sum(stepfleet_router_requests_total{job="router"})') >= 4.0, 20, procs)
    assert _value(prom, 'sum(stepfleet_router_requests_total{job="router"})') >= 4.0
    names = httpx.get(f"{prom}/api/v1/label/__name__/values", timeout=5).json()["data"]
    assert {"stepfleet_step_duration_seconds_bucket", "stepfleet_request_duration_seconds_bucket",
            "stepfleet_router_pool_weight_ratio"} <= set(names)

    # Recording rules, read back as Prometheus evaluated them.
    selector = f'{{namespace="{NAMESPACE}",pool="{POOL}"}}'
    assert _value(prom, f"namespace_pool:stepfleet_worker_ready:sum{selector}") == 1.0
    assert _value(prom, f"namespace_pool:stepfleet_images_generated:rate5m{selector}") > 0
    p95 = _wait("the latency percentile rule",
                lambda: _value(prom, f"namespace_pool:stepfleet_request_duration_seconds:p95_5m{selector}"), 10, procs)
    assert math.isfinite(p95) and 0 < p95 <= 120
    attainment = _wait("the SLO attainment rule",
                       lambda: _value(prom, f"namespace_pool:stepfleet_slo_attainment:ratio_rate5m{selector}"),
                       10, procs)
    assert attainment == 1.0  # every request met its 60 s deadline
    # No request missed, so the worker never created an outcome="missed" series: the miss ratio
    # has an empty numerator and no value at all (burn-rate alerts stay quiet, as they should).
    assert _value(prom, f"namespace_pool:stepfleet_slo_misses:ratio_rate5m{selector}") in (None, 0.0)
    by_kind = _query(prom, f"namespace_pool_kind_status:stepfleet_requests:rate5m{selector}")
    assert {(s["metric"]["kind"], s["metric"]["status"]) for s in by_kind} == {("generation", "ok")}
