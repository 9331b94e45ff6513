"""`stepfleet soak`: a local fleet at 0.9 of its capacity for minutes, a worker killed and one hung.

Issue 19's soak, as a command: it starts `stepfleet up` (a subprocess, as a user would), measures
what the fleet serves, drives open-loop Poisson load at `--load` of it through the router's
OpenAI images endpoint, every request with a `deadline_ms`, kills a worker (SIGKILL) at
`--kill-at` of the run and stops one (SIGSTOP) at `--stop-at`, samples the RSS of the router and
of every worker process, and once the load ends and the fleet has drained reads the counters
that show a leak. The verdict (`soak_verdict`) is printed per criterion; the exit code is 1 when
one fails.

Choices, and why:

- *One pool of `--workers` (2) workers, min = max.* A killed worker's traffic has somewhere to
  go, and the capacity measured at the start stays the fleet's capacity: with autoscaling the
  control loop would add workers under load and "0.9 of capacity" would mean nothing.
- *Liveness found in seconds.* `--liveness-poll-s 0.5`, `--liveness-timeout-s 2`, `--hang-polls 2`:
  a stopped worker is found in about 5 s; the timeout is the router's default, long enough that
  a busy worker on a shared CPU (it answers `/readyz` between denoising steps) is not taken for hung.
- *Capacity from a closed-loop burst through the router*: `--capacity-concurrency` clients
  (default 2 x max batch per worker, enough to fill every batch) send back to back for
  `--capacity-s`; the first quarter is warm-up (and warms the workers' cost curves), the rest
  counts. It measures the whole path the soak then loads, router included, on this machine now.
- *The stopped worker is the restarted one* (the one killed earlier, once it is ready again):
  a restarted worker must be supervised like the first, and the other worker then lives through
  the whole run, so at least one worker's RSS series spans it.
- *Only pids this command started are signalled*: those `stepfleet up` writes in its fleet.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from . import soak_load, soak_verdict
from .demo import stop as stop_fleet

PROMPTS = ("a red ankle boot on a blue background", "a grey sneaker on a white background",
           "a black bag on a green background", "a white shirt on a red background")
#: Worker gauges that must be back to zero once the fleet is idle (sums over their label sets).
WORKER_LEAK_GAUGES = ("stepfleet_queue_depth", "stepfleet_backlog_seconds", "stepfleet_paused_videos",
                      "stepfleet_kind_queue_depth", "stepfleet_template_cache_memory_bytes",
                      "stepfleet_template_cache_disk_bytes")
#: Fields of a worker's `GET /v1/load` that count requests it holds (the engine's own view).
WORKER_LOAD_FIELDS = ("waiting", "running", "paused", "step_units")
#: Hung requests described in the report (the rest are counted only).
HUNG_NOTES = 20
#: The router's slots in flight on workers (a leaked slot shows here).
ROUTER_LEAK_GAUGES = ("stepfleet_router_inflight_requests",)


def _say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} stepfleet soak: {message}", file=sys.stderr, flush=True)


class SoakError(RuntimeError):
    """The soak could not run (the fleet did not start, capacity could not be measured)."""


# --- the fleet ---------------------------------------------------------------------------------

def read_fleet(state_dir: Path) -> dict | None:
    try:
        return json.loads((state_dir / "fleet.json").read_text())
    except (OSError, ValueError):
        return None


def rss_mb(pid: int) -> float | None:
    """Resident memory of `pid` in MiB (`VmRSS` of /proc/PID/status); None when gone or a zombie."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def _alive(pid: int) -> bool:
    return rss_mb(pid) is not None


def start_fleet(args: argparse.Namespace, state_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "stepfleet.cli", "up", "--model", args.model, "--pools", f"{args.pool}:0.10",
           "--port", "0", "--state-dir", str(state_dir), "--min-workers", str(args.workers),
           "--max-workers", str(args.workers), "--interval-s", "2", "--stop-timeout-s", "10",
           "--liveness-poll-s", str(args.liveness_poll_s), "--liveness-timeout-s", str(args.liveness_timeout_s),
           "--hang-polls", str(args.hang_polls), f"--worker-arg=--max-batch={args.max_batch}"]
    _say("starting: " + " ".join(cmd[2:]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Workers share the cores: torch's default (a thread per core in every worker) oversubscribes
    # them, slows every step and can starve the liveness polls. The caller's setting wins.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.workers)))
    with open(state_dir / "up.log", "ab") as log:
        # cwd outside the repository: its `operator/` folder must not shadow the stdlib module.
        return subprocess.Popen(cmd, cwd=state_dir, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_all_ready(state_dir: Path, proc: subprocess.Popen, workers: int, timeout_s: float) -> str:
    """Wait until the router counts `workers` ready workers; the router URL."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"stepfleet up exited with code {proc.returncode} (see {state_dir / 'up.log'})")
            state = read_fleet(state_dir)
            if state and state.get("url"):
                with contextlib.suppress(httpx.HTTPError, ValueError, AttributeError, TypeError):
                    resp = http.get(state["url"] + "/readyz")
                    if resp.status_code == 200 and sum((resp.json().get("pools") or {}).values()) >= workers:
                        return state["url"]
            time.sleep(0.5)
    raise TimeoutError(f"{workers} workers were not ready after {timeout_s:.0f}s (logs in {state_dir / 'logs'})")


# --- requests ----------------------------------------------------------------------------------

@dataclass
class Requester:
    """Sends one image request through the router, retrying 429/503 as their Retry-After says."""

    client: httpx.AsyncClient
    url: str
    model: str
    size: str
    steps: int
    deadline_s: float
    grace_s: float
    #: How long a hung request is still followed, to tell "answered late" from "never answered".
    follow_s: float = 30.0
    #: What became of hung requests (the first `HUNG_NOTES`): when sent, on which try, and the
    #: answer that came after all (status, seconds after the first send) or none.
    hung: list[dict] = field(default_factory=list)
    t0: float = 0.0

    def body(self, i: int, remaining_s: float) -> dict:
        return {"model": self.model, "prompt": PROMPTS[i % len(PROMPTS)], "size": self.size,
                "num_inference_steps": self.steps, "seed": i, "response_format": "b64_json",
                "deadline_ms": max(1, int(remaining_s * 1000))}

    async def one(self, i: int) -> tuple[soak_load.Outcome, float, int]:
        """(outcome, seconds from first send to the final answer, retries)."""
        start = time.monotonic()
        retries = 0
        while True:
            elapsed = time.monotonic() - start
            remaining = self.deadline_s - elapsed
            call = asyncio.ensure_future(
                self.client.post(self.url + "/v1/images/generations", json=self.body(i, remaining)))
            try:
                resp = await asyncio.wait_for(asyncio.shield(call), timeout=remaining + self.grace_s)
            except asyncio.TimeoutError:
                hung_at = time.monotonic() - start
                await self._follow(call, start, retries, remaining)
                return "hung", hung_at, retries
            except httpx.TimeoutException:
                return "hung", time.monotonic() - start, retries
            except httpx.HTTPError:
                return "connection_error", time.monotonic() - start, retries
            elapsed = time.monotonic() - start
            body: object = None
            if resp.status_code != 200:
                with contextlib.suppress(ValueError):
                    body = resp.json()
            found = soak_load.classify(resp.status_code, resp.headers, body, elapsed, self.deadline_s, self.grace_s)
            if isinstance(found, soak_load.Retry):
                retries += 1
                await asyncio.sleep(found.wait_s)
                continue
            return found, elapsed, retries


    async def _follow(self, call: asyncio.Future, start: float, retries: int, remaining_s: float) -> None:
        """Wait a while longer for a hung request's answer, for the report; then give up on it."""
        note: dict = {"sent_at_s": round(start - self.t0, 2), "try": retries + 1,
                      "deadline_ms_sent": int(remaining_s * 1000), "status": None, "answered_after_s": None}
        try:
            resp = await asyncio.wait_for(call, timeout=self.follow_s)
            note.update(status=resp.status_code, answered_after_s=round(time.monotonic() - start, 2))
        except (asyncio.TimeoutError, httpx.HTTPError) as exc:
            note["status"] = type(exc).__name__
        if len(self.hung) < HUNG_NOTES:
            self.hung.append(note)


async def measure_capacity(req: Requester, concurrency: int, window_s: float) -> dict:
    """Closed loop: `concurrency` clients back to back for `window_s` (longer, up to 4 x, until
    `concurrency` answers are counted); served per second after the warm-up (`soak_load.capacity`)."""
    start = time.monotonic()
    finishes: list[float] = []
    latencies: list[float] = []
    stop_at: list[float] = []
    counter = iter(range(10**9))

    def keep_going(now: float) -> bool:
        if stop_at:
            return False
        if not soak_load.capacity_done(finishes, start, now, window_s, concurrency):
            return True
        stop_at.append(now)
        return False

    async def client() -> None:
        while keep_going(time.monotonic()):
            outcome, latency, _ = await req.one(next(counter))
            if outcome == "ok":
                finishes.append(time.monotonic())
                latencies.append(latency)
            elif outcome not in ("deadline_exceeded", "refused"):
                await asyncio.sleep(0.2)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    measured = soak_load.capacity(finishes, start, stop_at[0] if stop_at else time.monotonic(), window_s)
    return {**measured, "concurrency": concurrency, "window_s": window_s,
            "p50_s": soak_load.rounded(soak_load.quantile(latencies, 0.5))}


# --- sampling, faults, leaks ------------------------------------------------------------------

@dataclass
class LoopLag:
    """How late this process's event loop wakes up: when it lags, the client itself (not the fleet)
    may be what made an answer late or a request look hung, and the report says so."""

    lags_s: list[float] = field(default_factory=list)

    async def run(self, stop: asyncio.Event, every_s: float = 0.1) -> None:
        while not stop.is_set():
            before = time.monotonic()
            await asyncio.sleep(every_s)
            self.lags_s.append(time.monotonic() - before - every_s)

    def summary(self) -> dict:
        return {"p99": soak_load.rounded(soak_load.quantile(self.lags_s, 0.99)),
                "max": soak_load.rounded(max(self.lags_s) if self.lags_s else None)}


@dataclass
class Sampler:
    """RSS of the router and every worker process named in fleet.json, every `every_s`."""

    state_dir: Path
    t0: float
    series: dict[tuple[str, int], list[tuple[float, float]]] = field(default_factory=dict)
    seen_pids: set[int] = field(default_factory=set)

    def sample(self) -> None:
        state = read_fleet(self.state_dir)
        if not state:
            return
        t = time.monotonic() - self.t0
        procs = [("router", (state.get("router") or {}).get("pid"), True)]
        # Workers from the moment they serve: RSS while a model loads is not the steady state.
        procs += [(w["name"], w.get("pid"), w.get("phase") == "ready" and not w.get("hung"))
                  for w in state.get("workers", [])]
        for name, pid, serving in procs:
            if not pid:
                continue
            self.seen_pids.add(pid)
            mb = rss_mb(pid) if serving else None
            if mb is not None:
                self.series.setdefault((name, pid), []).append((round(t, 2), round(mb, 2)))

    async def run(self, every_s: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sample()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)

    def reports(self, final: dict | None, rule: soak_verdict.FlatRule) -> list[dict]:
        alive: set[tuple[str, int]] = set()
        if final:
            alive.add(("router", (final.get("router") or {}).get("pid") or 0))
            alive |= {(w["name"], w["pid"]) for w in final.get("workers", []) if w.get("phase") == "ready"}
        return [soak_verdict.rss_report(soak_verdict.RssSeries(name, pid, tuple(s), (name, pid) in alive
                                                               and _alive(pid)), rule)
                for (name, pid), s in sorted(self.series.items(), key=lambda kv: (kv[0][0] != "router", kv[1][0][0]))]


def _ready_workers(state: dict | None) -> list[dict]:
    return [w for w in (state or {}).get("workers", []) if w.get("phase") == "ready" and not w.get("hung")]


@dataclass
class Fault:
    kind: str  # "kill" (SIGKILL) or "stop" (SIGSTOP: the fleet must find it hung)
    at_s: float
    injected: bool = False
    worker: str | None = None
    pid: int | None = None
    new_pid: int | None = None
    found_hung_after_s: float | None = None
    recovered: bool = False
    recovered_after_s: float | None = None
    why: str | None = None


async def inject(fault: Fault, state_dir: Path, t0: float, watch_until: float, prefer: str | None,
                 stopped: set[int]) -> Fault:
    """At `fault.at_s`: signal one ready worker, then watch fleet.json until it is back (new pid, ready)."""
    await asyncio.sleep(max(0.0, t0 + fault.at_s - time.monotonic()))
    state = read_fleet(state_dir)
    hung_before = (state or {}).get("hungRestarts", 0)
    ready = _ready_workers(state)
    ready.sort(key=lambda w: (w["name"] != prefer, w["name"]))
    if not ready:
        fault.why = "no ready worker when the fault was due"
        return fault
    victim = ready[0]
    fault.worker, fault.pid = victim["name"], victim["pid"]
    signum = signal.SIGKILL if fault.kind == "kill" else signal.SIGSTOP
    os.kill(victim["pid"], signum)
    if fault.kind == "stop":
        stopped.add(victim["pid"])
    fault.injected = True
    hit = time.monotonic()
    fault.at_s = round(hit - t0, 2)  # when it happened (a wait for a restart may have put it off)
    _say(f"{'SIGKILL' if fault.kind == 'kill' else 'SIGSTOP'} worker {fault.worker} pid {fault.pid} "
         f"at {hit - t0:.0f}s")
    while time.monotonic() < watch_until:
        await asyncio.sleep(0.25)
        state = read_fleet(state_dir) or {}
        me = next((w for w in state.get("workers", []) if w["name"] == fault.worker), None)
        if fault.kind == "stop" and fault.found_hung_after_s is None and (
                state.get("hungRestarts", 0) > hung_before or (me and (me.get("hung") or me["pid"] != fault.pid))):
            fault.found_hung_after_s = round(time.monotonic() - hit, 2)
            _say(f"the fleet found worker {fault.worker} hung after {fault.found_hung_after_s:.1f}s")
        if me and me["pid"] != fault.pid and me.get("phase") == "ready":
            if fault.kind == "stop" and state.get("hungRestarts", 0) <= hung_before:
                fault.why = "replaced, but not counted as a hung restart"
                return fault
            fault.new_pid, fault.recovered = me["pid"], True
            fault.recovered_after_s = round(time.monotonic() - hit, 2)
            _say(f"worker {fault.worker} is back (pid {fault.new_pid}) after {fault.recovered_after_s:.1f}s")
            return fault
    fault.why = "not found hung and restarted in time" if fault.kind == "stop" else "not restarted in time"
    return fault


def parse_gauges(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Each named gauge's sum over its label sets (absent ones left out)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in names:
            out[family.name] = sum(s.value for s in family.samples if s.name == family.name)
    return out


async def read_leaks(client: httpx.AsyncClient, state: dict) -> dict[str, dict[str, float]]:
    """Leak counters now: the router's in-flight slots; each ready worker's queue, paused, backlog
    and cache gauges (`/metrics`) and the requests its engine holds (`/v1/load`)."""
    out: dict[str, dict[str, float]] = {}
    resp = await client.get(state["url"] + "/metrics", timeout=5)
    out["router"] = parse_gauges(resp.text, ROUTER_LEAK_GAUGES)
    for w in _ready_workers(state):
        metrics = await client.get(w["url"] + "/metrics", timeout=5)
        load = (await client.get(w["url"] + "/v1/load", timeout=5)).json()
        counters = parse_gauges(metrics.text, WORKER_LEAK_GAUGES)
        counters.update({f"load.{k}": float(load.get(k, 0)) for k in WORKER_LOAD_FIELDS})
        out[w["name"]] = counters
    return out


async def drain(client: httpx.AsyncClient, state_dir: Path, timeout_s: float) -> tuple[dict | None, float]:
    """Wait until every leak counter reads zero (or the timeout); the last reading and the wait."""
    start = time.monotonic()
    leaks = None
    while True:
        state = read_fleet(state_dir)
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
            if state:
                leaks = await read_leaks(client, state)
                if not soak_verdict.nonzero_counters(leaks):
                    break
        if time.monotonic() - start > timeout_s:
            break
        await asyncio.sleep(1.0)
    return leaks, round(time.monotonic() - start, 2)


# --- the soak ----------------------------------------------------------------------------------

async def soak(args: argparse.Namespace, url: str, state_dir: Path, rule: soak_verdict.FlatRule) -> dict:
    """Capacity, then the load with its faults and samples, then the drain; the raw results."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits, timeout=None) as client:
        req = Requester(client, url, args.model, args.size, args.steps, args.deadline_s, args.grace_s,
                        t0=time.monotonic())
        concurrency = args.capacity_concurrency or 2 * args.max_batch * args.workers
        _say(f"measuring capacity: {concurrency} clients back to back for {args.capacity_s:g}s")
        capacity = await measure_capacity(req, concurrency, args.capacity_s)
        if capacity["rps"] <= 0:
            raise SoakError(f"capacity could not be measured: no request was served within "
                            f"{capacity['measured_s']:.0f}s (deadline {args.deadline_s:g}s); see {state_dir / 'logs'}")
        target = args.load * capacity["rps"]
        arrivals = soak_load.poisson_arrivals(target, args.duration_s, args.seed)
        _say(f"capacity {capacity['rps']:.2f} req/s; {len(arrivals)} requests at {target:.2f} req/s for "
             f"{args.duration_s:g}s")

        t0 = time.monotonic()
        req.t0 = t0
        sampler = Sampler(state_dir, t0)
        sampling_done = asyncio.Event()
        sampling = asyncio.create_task(sampler.run(args.sample_s, sampling_done))
        watch_until = t0 + args.duration_s + args.deadline_s + args.grace_s + args.drain_timeout_s
        stopped: set[int] = set()
        faults = [Fault(kind, at) for kind, at in
                  sorted(soak_load.fault_times(args.duration_s, args.kill_at, args.stop_at).items(),
                         key=lambda kv: kv[1])]
        fault_tasks: list[asyncio.Task] = []
        killed: Fault | None = None
        for f in faults:
            if f.kind == "stop" and killed is not None:
                # The stopped worker is the restarted one: wait for the kill's outcome first.
                fault_tasks.append(asyncio.create_task(_after(fault_tasks[-1], f, state_dir, t0, watch_until,
                                                              stopped, 0.15 * args.duration_s)))
            else:
                fault_tasks.append(asyncio.create_task(inject(f, state_dir, t0, watch_until, None, stopped)))
            if f.kind == "kill":
                killed = f

        tally = soak_load.Tally.empty(bucket_s=max(1.0, args.duration_s / 60))
        lag = LoopLag()
        lagging = asyncio.create_task(lag.run(sampling_done))
        pending: set[asyncio.Task] = set()

        async def run_one(i: int) -> None:
            outcome, latency, retries = await req.one(i)
            tally.add(outcome, latency, retries, arrivals[i])

        for i, at in enumerate(arrivals):
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            task = asyncio.create_task(run_one(i))
            pending.add(task)
            task.add_done_callback(pending.discard)
        _say(f"load sent; waiting for {len(pending)} requests in flight")
        await asyncio.gather(*list(pending))
        load_end = time.monotonic() - t0
        _say("load answered; waiting for the fleet to drain and the faults to be recovered")
        found = await asyncio.gather(*fault_tasks)
        leaks, drained_s = await drain(client, state_dir, args.drain_timeout_s)
        sampler.sample()
        sampling_done.set()
        await sampling
        await lagging
        final = read_fleet(state_dir)
    return {"capacity": capacity, "target_rps": round(target, 3), "load_s": round(load_end, 2),
            "client_loop_lag_s": lag.summary(), "hung_requests": req.hung,
            "load": tally.summary(), "faults": [asdict(f) for f in found], "leaks": leaks, "drain_s": drained_s,
            "rss_reports": sampler.reports(final, rule), "pids": sampler.seen_pids | stopped}


async def _after(previous: asyncio.Task, fault: Fault, state_dir: Path, t0: float, watch_until: float,
                 stopped: set[int], extra_wait_s: float) -> Fault:
    """`fault` on the worker the previous fault restarted, once that one is back (else any ready one)."""
    # The restart may take longer than planned under load: wait for it a while past the planned time.
    latest = t0 + fault.at_s + extra_wait_s
    await asyncio.sleep(max(0.0, t0 + fault.at_s - time.monotonic()))
    while not (previous.done() or time.monotonic() >= latest):
        await asyncio.sleep(0.25)
    prefer = previous.result().worker if previous.done() and previous.result().recovered else None
    return await inject(fault, state_dir, t0, watch_until, prefer, stopped)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="stepfleet soak",
        description="Soak a local fleet (`stepfleet up`): open-loop Poisson load at a share of its measured "
                    "capacity, a worker killed and one hung along the way; checks that no request is lost, "
                    "RSS stays flat and every leak counter is back to zero. Exit code 1 when a criterion fails.")
    ap.add_argument("--model", default="mini-sd", help="what the workers serve (default: the trained built-in)")
    ap.add_argument("--pool", default="cpu", help="the one pool's name")
    ap.add_argument("--workers", type=int, default=2, help="workers in the pool (min = max: a fixed capacity)")
    ap.add_argument("--max-batch", type=int, default=4, help="images per denoising step on each worker")
    ap.add_argument("--load", type=float, default=0.9, help="offered load as a share of the measured capacity")
    ap.add_argument("--duration-s", type=float, default=600.0, help="seconds of open-loop load")
    ap.add_argument("--deadline-s", type=float, default=30.0, help="every request's deadline (deadline_ms)")
    ap.add_argument("--grace-s", type=float, default=2.0,
                    help="after its deadline a request still unanswered this long is hung")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps per request")
    ap.add_argument("--size", default="64x64", help="image size WxH")
    ap.add_argument("--capacity-s", type=float, default=30.0, help="seconds of the closed-loop capacity burst")
    ap.add_argument("--capacity-concurrency", type=int, default=0,
                    help="clients in the capacity burst (default 2 x max batch x workers)")
    ap.add_argument("--kill-at", type=float, default=0.3, help="SIGKILL a worker at this share of the run (<0: no)")
    ap.add_argument("--stop-at", type=float, default=0.6,
                    help="SIGSTOP the restarted worker at this share of the run (<0: no)")
    ap.add_argument("--sample-s", type=float, default=5.0, help="seconds between RSS samples")
    ap.add_argument("--drain-timeout-s", type=float, default=60.0,
                    help="after the load, how long the leak counters may take to reach zero")
    ap.add_argument("--warmup-s", type=float, default=None,
                    help="RSS samples skipped at the start of each process (default min(60, 10%% of the run))")
    ap.add_argument("--min-span-s", type=float, default=None,
                    help="judge a process's RSS only over at least this long (default min(60, 20%% of the run))")
    ap.add_argument("--max-slope-mb-min", type=float, default=1.0, help="RSS growth rate that counts as a leak")
    ap.add_argument("--noise-mb", type=float, default=8.0, help="RSS growth below this is noise")
    ap.add_argument("--min-served", type=float, default=0.5,
                    help="share of requests that must be served within their deadline")
    ap.add_argument("--liveness-poll-s", type=float, default=0.5)
    ap.add_argument("--liveness-timeout-s", type=float, default=2.0)
    ap.add_argument("--hang-polls", type=int, default=2)
    ap.add_argument("--ready-timeout-s", type=float, default=300.0, help="how long the fleet may take to start")
    ap.add_argument("--seed", type=int, default=0, help="seed of the arrival schedule")
    ap.add_argument("--state-dir", default=None, help="the fleet's state directory (default: a temporary one)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON on stdout (summary on stderr)")
    ap.add_argument("--out", default=None, help="also write the JSON report to this file")
    return ap


def _config(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("json", "out", "state_dir")}


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.workers < 2:
        print("stepfleet soak: --workers must be at least 2 (a killed worker's traffic needs somewhere to go)",
              file=sys.stderr)
        return 2
    if not 0 < args.load <= 2 or args.duration_s <= 0 or args.deadline_s <= 0 or args.capacity_s <= 0:
        print("stepfleet soak: need 0 < --load <= 2 and positive --duration-s, --deadline-s, --capacity-s",
              file=sys.stderr)
        return 2
    args.kill_at = args.kill_at if args.kill_at >= 0 else None
    args.stop_at = args.stop_at if args.stop_at >= 0 else None
    rule = soak_verdict.FlatRule(
        warmup_s=args.warmup_s if args.warmup_s is not None else min(60.0, 0.1 * args.duration_s),
        min_span_s=args.min_span_s if args.min_span_s is not None else min(60.0, 0.2 * args.duration_s),
        max_slope_mb_per_min=args.max_slope_mb_min, noise_mb=args.noise_mb)
    state_dir = Path(args.state_dir or tempfile.mkdtemp(prefix="stepfleet-soak-")).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    proc = start_fleet(args, state_dir)
    result: dict | None = None
    code: int | None = None
    seen: set[int] = set()
    try:
        url = wait_all_ready(state_dir, proc, args.workers, args.ready_timeout_s)
        _say(f"fleet ready on {url} (state in {state_dir})")
        result = asyncio.run(soak(args, url, state_dir, rule))
        seen = result.pop("pids")
    except (SoakError, RuntimeError, TimeoutError) as exc:
        print(f"stepfleet soak: {exc}", file=sys.stderr)
    finally:
        code = stop_fleet(proc)
        for pid in seen:  # only processes this soak's fleet started
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)
    if result is None:
        return 1
    report = _report(args, rule, result, code, state_dir)
    text = soak_verdict.summary_text(report)
    print(text, file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json:
        print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if report["pass"] else 1


def _report(args: argparse.Namespace, rule: soak_verdict.FlatRule, result: dict, fleet_code: int,
            state_dir: Path) -> dict:
    rss = result["rss_reports"]
    found = soak_verdict.criteria(result["load"], rss, result["leaks"], result["faults"],
                                  min_served_share=args.min_served, fleet_exit_code=fleet_code)
    return {
        "config": _config(args),
        "flat_rule": asdict(rule),
        "state_dir": str(state_dir),
        **{k: v for k, v in result.items() if k != "rss_reports"},
        "rss": rss,
        "criteria": {k: {"pass": c.passed, "detail": c.detail} for k, c in found.items()},
        "pass": soak_verdict.verdict(found),
    }
