"""`stepfleet bench router`: the router's added latency, and predicted-latency balancing vs baselines.

(a) **Overhead.** A fast fake worker (raw ASGI under uvicorn, answers at once) and the real
router (`stepfleet router`, default settings: access log on, schema check, predicted policy)
run as separate processes on loopback; an open-loop load generator in this process sends a
seeded Poisson stream of generation requests at 100 and 200 req/s, alternating between the
worker directly and the router in short segments so that machine drift hits both paths alike.
Latency is measured from each request's *scheduled* send time (no coordinated omission) by a
minimal keep-alive HTTP/1.1 client, so the generator adds as little as possible. Added latency
is the router path's percentile minus the direct path's percentile.

(b) **Balancing.** `router_sim`: the router's own `Balancer` in front of simulated workers of
two speeds with step-level batching, requests whose cost differs tenfold, and template edits;
mean and p95 latency of predicted-latency vs round-robin vs least-requests on one trace.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepfleet.serving.bench import router_sim

GEN_BODY = b'{"prompt":"a lighthouse at dusk","size":"512x512","num_inference_steps":20}'
FAKE_BODY = b'{"created":0,"data":[{"b64_json":"AAAA"}]}'
LOAD_BODY = b'{"ready":true,"pool":"bench","waiting":0,"running":0,"paused":0,"step_units":0,"backlog_s":0.0,"max_batch":4}'


# -- the fake worker (runs in its own process) -----------------------------------------------------
async def _fake_worker(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    body = LOAD_BODY if scope["path"] == "/v1/load" else FAKE_BODY
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"x-stepfleet-backlog-seconds", b"0.000")]})
    await send({"type": "http.response.body", "body": body})


def fake_worker_main(port: int) -> None:
    import uvicorn

    uvicorn.run(_fake_worker, host="127.0.0.1", port=port, lifespan="off", access_log=False, log_level="warning")


#: Idle client connections older than this are dropped rather than reused.
IDLE_S = 2.0


# -- a minimal open-loop HTTP/1.1 load generator ------------------------------------------------
class _Pool:
    """Keep-alive connections to one server; a request takes an idle one or opens a new one."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self.host, self.port = host, port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.raw = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(GEN_BODY)}\r\n\r\n").encode() + GEN_BODY

    async def request(self) -> int:
        now = time.monotonic()
        while self.idle and now - self.idle[-1][2] > IDLE_S:  # the server may have closed it (uvicorn: 5 s)
            self.idle.pop()[1].close()
        if self.idle:
            reader, writer, _ = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        writer.write(self.raw)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = None
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length is None:
            raise RuntimeError("the benchmark client reads only Content-Length responses")
        await reader.readexactly(length)
        self.idle.append((reader, writer, time.monotonic()))
        return status

    def close(self) -> None:
        for _, w, _ in self.idle:
            w.close()
        self.idle.clear()


async def _segment(pool: _Pool, rate: float, seconds: float, rng: random.Random, out: list[float],
                   errors: list[int]) -> None:
    """Send a Poisson stream for `seconds`; record latency from each scheduled start."""
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.01
    t = start
    tasks = []

    async def one(at: float) -> None:
        status = await pool.request()
        if status != 200:
            errors.append(status)
        out.append(loop.time() - at)

    while t < start + seconds:
        delay = t - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(t)))
        t += rng.expovariate(rate)
    await asyncio.gather(*tasks)


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q * len(s))) - 1))]


@dataclass
class OverheadConfig:
    rates: tuple[float, ...] = (100.0, 200.0)
    segments: int = 10
    segment_s: float = 3.0
    warmup_s: float = 2.0
    seed: int = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on port {port}")


def measure_overhead(cfg: OverheadConfig) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="stepfleet-router-bench-"))
    wport, rport = _free_port(), _free_port()
    (tmp / "router.yaml").write_text(
        f"version: 1\nservice: bench\nmodel: tiny-sd\npools:\n- name: bench\n  endpoints: [http://127.0.0.1:{wport}]\n"
        "  weight: 1.0\n  accelerator: cpu\n")
    # cwd=tmp: the repository root holds operator/, which would shadow the standard library.
    worker = subprocess.Popen([sys.executable, "-c", f"from stepfleet.serving.bench.router_bench import "
                               f"fake_worker_main; fake_worker_main({wport})"], cwd=tmp)
    log = open(tmp / "router.log", "w")
    router = subprocess.Popen([sys.executable, "-c", "import sys; from stepfleet.cli import main; "
                               "sys.exit(main(sys.argv[1:]))", "router", "--config", str(tmp / "router.yaml"),
                               "--port", str(rport)], cwd=tmp, stdout=log, stderr=log)
    try:
        _wait_up(wport)
        _wait_up(rport)
        return asyncio.run(_overhead(cfg, wport, rport, router.pid))
    finally:
        for p in (router, worker):
            p.terminate()
        for p in (router, worker):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        log.close()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


async def _overhead(cfg: OverheadConfig, wport: int, rport: int, router_pid: int) -> dict[str, Any]:
    direct = _Pool("127.0.0.1", wport, "/v1/images/generations")
    routed = _Pool("127.0.0.1", rport, "/v1/images/generations")
    rng = random.Random(cfg.seed)
    result: dict[str, Any] = {}
    try:
        for rate in cfg.rates:
            lat: dict[str, list[float]] = {"direct": [], "router": []}
            errors: list[int] = []
            router_cpu = 0.0
            for pool in (direct, routed):  # warm connections, the router's client pool and its estimates
                await _segment(pool, rate, cfg.warmup_s, rng, [], errors)
            for i in range(cfg.segments):
                order = (("direct", direct), ("router", routed)) if i % 2 == 0 else (("router", routed), ("direct", direct))
                for name, pool in order:
                    cpu0 = _cpu_s(router_pid)
                    await _segment(pool, rate, cfg.segment_s, rng, lat[name], errors)
                    if name == "router":  # the router's own CPU per request, whatever else runs
                        router_cpu += _cpu_s(router_pid) - cpu0
            d, r = lat["direct"], lat["router"]
            result[f"rps_{int(rate)}"] = {
                "p50_ms": round((_pct(r, 0.50) - _pct(d, 0.50)) * 1000, 3),
                "p99_ms": round((_pct(r, 0.99) - _pct(d, 0.99)) * 1000, 3),
                "direct": {"p50_ms": round(_pct(d, 0.5) * 1000, 3), "p99_ms": round(_pct(d, 0.99) * 1000, 3),
                           "requests": len(d)},
                "router": {"p50_ms": round(_pct(r, 0.5) * 1000, 3), "p99_ms": round(_pct(r, 0.99) * 1000, 3),
                           "requests": len(r)},
                "router_cpu_ms_per_request": round(router_cpu / max(1, len(r)) * 1000, 3),
                "errors": len(errors),
            }
    finally:
        direct.close()
        routed.close()
    return result


def run(quick: bool = False) -> dict[str, Any]:
    cfg = OverheadConfig(segments=4 if quick else 10)
    started = time.monotonic()
    overhead = measure_overhead(cfg)
    balancing = router_sim.compare(n=6000 if quick else 20000, load=0.5, seed=11)
    return {
        "overhead": overhead,
        "balancing": balancing,
        "machine": {"cpus": len(os.sched_getaffinity(0)), "loadavg_1m_at_end": round(os.getloadavg()[0], 2)},
        "config": {"quick": quick, "segments": cfg.segments, "segment_s": cfg.segment_s,
                   "arrivals": "poisson", "request_body_bytes": len(GEN_BODY)},
        "wall_s": round(time.monotonic() - started, 1),
    }


def summary(result: dict[str, Any]) -> str:
    lines = ["router added latency (router path minus direct path, open-loop Poisson):"]
    for key, v in result["overhead"].items():
        lines.append(f"  {key}: p50 +{v['p50_ms']:.2f} ms, p99 +{v['p99_ms']:.2f} ms "
                     f"(direct p99 {v['direct']['p99_ms']:.2f} ms, router p99 {v['router']['p99_ms']:.2f} ms; "
                     f"router CPU {v['router_cpu_ms_per_request']:.2f} ms/request)")
    b = result["balancing"]
    lines.append("balancing (simulated, two worker speeds, mixed costs):")
    for policy in ("predicted", "round_robin", "least_requests"):
        lines.append(f"  {policy:15s} mean {b[policy]['mean_s']:.3f} s  p95 {b[policy]['p95_s']:.3f} s")
    p = b["predicted"]["p95_s"]
    lines.append(f"  p95 ratio vs round-robin {p / b['round_robin']['p95_s']:.3f}, "
                 f"vs least-requests {p / b['least_requests']['p95_s']:.3f}")
    return "\n".join(lines)
