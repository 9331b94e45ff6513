"""`stepfleet up`: run a router, worker processes per pool and the control loop on loopback.

The loop ticks every `TICK_S`: it notices exited processes and workers that became ready,
polls ready workers for signs of life (every `--liveness-poll-s`: one that answers
`--hang-polls` polls in a row within `--liveness-timeout-s` is hung, the router's rule, and is
killed and restarted), asks `supervise.reconcile` what to do and does it, and rewrites the router's config when the
ready workers or the weights changed. Every `--interval-s` it scrapes the ready workers and
runs `fleet.control_step` (the operator's `decide`); the plan's replicas become the workers
wanted per pool and its weights the router's. SIGINT/SIGTERM stop the loop; then the
router and the workers get SIGTERM and `--stop-timeout-s` to finish before SIGKILL.

`STATE_DIR/fleet.json` describes the running fleet (URL, pids, phases) for scripts and
tests; `STATE_DIR/logs/` holds each process's output; `STATE_DIR/router.yaml` is the config.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

from stepfleet.operator.loop import observe
from stepfleet.operator.policy import records
from stepfleet.serving.builtin_models import BUILTIN_MODELS
from stepfleet.serving.settings import WorkerSettings

from . import fleet, liveness, processes, supervise

#: Seconds between two supervision passes (exits, readiness, actions).
TICK_S = 0.25
#: Control decisions the router is told of (its fleet panel shows them).
DECISIONS_SHOWN = records.DECISIONS_KEPT


def _say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} stepfleet up: {message}", flush=True)


@dataclass
class _Worker:
    view: supervise.WorkerView
    proc: subprocess.Popen | None


class LocalFleet:
    """Processes plus the pure loop's memory; `run(stop)` until `stop` is set, then `shutdown()`."""

    def __init__(self, pools: tuple[fleet.LocalPool, ...], settings: fleet.LocalSettings, *, model: str,
                 host: str, port: int, state_dir: Path, worker_args: list[str], stop_timeout_s: float,
                 hang_rule: liveness.HangRule = liveness.HangRule()) -> None:
        import httpx

        self.pools = pools
        self.settings = settings
        self.spec = fleet.local_policy_spec(pools, settings)
        self.model = model
        self.host = host
        self.port = port
        self.state_dir = state_dir
        self.worker_args = worker_args
        self.stop_timeout_s = stop_timeout_s
        self.http = httpx.Client(timeout=1.0)
        #: Liveness polls run side by side (a hung worker holds its poll for the whole timeout).
        self.polls = httpx.Client(timeout=hang_rule.timeout_s)
        self.hang_rule = hang_rule
        self.next_poll = 0.0
        #: Workers found hung and killed to be restarted, since the start (fleet.json `hungRestarts`).
        self.hung_restarts = 0
        self.workers: dict[str, _Worker] = {}
        self.router: subprocess.Popen | None = None
        self.router_ready = False
        self.router_restarts = 0
        self.desired = fleet.initial_desired(pools, settings)
        self.weights: dict[str, float] | None = None
        self.memory = fleet.LoopMemory()
        #: The last decisions, oldest first: the router shows them (`GET /v1/fleet`, the playground).
        self.decisions: deque[dict] = deque(maxlen=DECISIONS_SHOWN)
        self.config_path = state_dir / "router.yaml"
        self.config_text = ""
        self.announced = False
        self.next_decision = 0.0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # --- acting ------------------------------------------------------------------------------

    def _write_config(self) -> None:
        views = [w.view for w in self.workers.values()]
        control = records.control_section(self.memory.state.mode, self.decisions) if self.decisions else None
        text = fleet.render_router_config(fleet.router_config(self.pools, views, self.weights, self.model, control))
        if text != self.config_text:
            processes.write_atomically(self.config_path, text)
            self.config_text = text

    def _start_router(self) -> None:
        args = ["router", "--config", str(self.config_path), "--host", self.host, "--port", str(self.port),
                "--discovery", "static", "--log-level", "warning"]
        self.router = processes.spawn(args, cwd=self.state_dir, log_path=self.state_dir / "logs" / "router.log")
        self.router_ready = False
        _say(f"router pid {self.router.pid} on {self.url} (config {self.config_path})")

    def _start_worker(self, action: supervise.Start, now: float) -> None:
        port = processes.free_port(self.host)
        url = f"http://{self.host}:{port}"
        settings = WorkerSettings(model=self.model, pool=action.pool, host=self.host, port=port,
                                  graceful_shutdown_s=max(1, int(self.stop_timeout_s) - 1))
        args = ["worker", *settings.to_argv(), "--log-level", "warning", *self.worker_args]
        env = {"HF_HUB_OFFLINE": "1"} if self.model in BUILTIN_MODELS else None
        proc = processes.spawn(args, cwd=self.state_dir, log_path=self.state_dir / "logs" / f"{action.name}.log",
                               env=env)
        view = supervise.WorkerView(name=action.name, pool=action.pool, phase="starting", started_s=now, url=url,
                                    pid=proc.pid, restarts=action.restarts, hangs=action.hangs,
                                    unready_since_s=action.unready_since_s if action.unready_since_s is not None
                                    else now)
        self.workers[action.name] = _Worker(view, proc)
        _say(f"{action.reason}: worker {action.name} pid {proc.pid} pool {action.pool} on {url}")

    def _apply(self, actions: tuple[supervise.Action, ...], now: float) -> None:
        for action in actions:
            if isinstance(action, supervise.Start):
                self._start_worker(action, now)
            elif isinstance(action, supervise.Stop):
                worker = self.workers[action.name]
                worker.view = replace(worker.view, phase="stopping")
                self._write_config()  # out of the router first, then drain
                if worker.proc is not None:
                    processes.ask_to_stop(worker.proc)
                _say(action.reason)
            elif isinstance(action, supervise.Kill):
                worker = self.workers[action.name]
                self._write_config()  # out of the router first (a hung worker is not routed to)
                if worker.proc is not None and worker.proc.poll() is None:
                    self.hung_restarts += 1
                    _say(action.reason)
                    processes.kill(worker.proc)
            elif isinstance(action, supervise.Forget):
                self.workers.pop(action.name, None)
                if "not restarting" in action.reason:
                    _say(action.reason)

    # --- observing ---------------------------------------------------------------------------

    def _observe_processes(self, now: float) -> None:
        for worker in self.workers.values():
            proc = worker.proc
            if proc is not None and worker.view.phase in ("starting", "ready", "stopping"):
                code = proc.poll()
                if code is not None:
                    was = worker.view.phase
                    worker.view = supervise.on_exit(worker.view, code, now)
                    if was != "stopping":
                        _say(f"worker {worker.view.name} (pid {proc.pid}) died: "
                             f"{'killed by signal ' + str(-code) if code < 0 else 'exit code ' + str(code)}; "
                             f"log {self.state_dir / 'logs' / (worker.view.name + '.log')}")
            if worker.view.phase == "starting" and worker.view.url and processes.is_ready(self.http, worker.view.url):
                worker.view = supervise.on_ready(worker.view)
                _say(f"worker {worker.view.name} ready on {worker.view.url}")

    def _poll_liveness(self) -> None:
        """Poll every ready worker at once; record silences, say when one is found hung."""
        ready = [w for w in self.workers.values()
                 if w.view.phase == "ready" and not w.view.hung and w.view.url and w.proc is not None]
        if not ready:
            return
        with cf.ThreadPoolExecutor(max_workers=len(ready)) as pool:
            results = list(pool.map(
                lambda w: processes.poll_alive(self.polls, w.view.url or "", self.hang_rule.timeout_s), ready))
        for worker, result in zip(ready, results, strict=True):
            if worker.proc is not None and worker.proc.poll() is not None:
                continue  # exited meanwhile: a crash, not a hang
            worker.view = supervise.on_poll(worker.view, result, self.hang_rule)  # type: ignore[arg-type]
            if worker.view.hung:
                _say(f"worker {worker.view.name} (pid {worker.view.pid}) answered none of {worker.view.silent_polls} "
                     f"liveness polls within {self.hang_rule.timeout_s:g}s: hung")

    def _check_router(self) -> bool:
        """False when the router failed before it was ever ready (e.g. its port is taken)."""
        assert self.router is not None
        code = self.router.poll()
        if code is not None:
            log = self.state_dir / "logs" / "router.log"
            if not self.router_ready and self.router_restarts == 0:
                _say(f"router exited with code {code} before it was ready:\n{processes.tail(log)}")
                return False
            self.router_restarts += 1
            _say(f"router (pid {self.router.pid}) died with code {code}; restarting (restart {self.router_restarts})")
            self._start_router()
            return True
        if not self.router_ready:
            self.router_ready = processes.is_ready(self.http, self.url)
        return True

    def _decide(self, now: float) -> None:
        views = [w.view for w in self.workers.values()]
        scrapes = {}
        for view in views:
            if view.phase == "ready" and view.url:
                text = processes.scrape(self.http, view.url)
                if text is not None:
                    try:
                        scrapes[view.name] = observe.parse_worker_metrics(text)
                    except observe.ObservationError:
                        pass
        plan = fleet.control_step(self.memory, self.spec, self.pools, self.desired, views, scrapes, now,
                                  self.settings.ready_grace_s)
        if plan is None:
            return
        changed = plan.replicas != self.desired or plan.mode_changed or self.weights is None or any(
            abs(plan.weights.get(k, 0.0) - v) > 1e-3 for k, v in self.weights.items())
        self.desired = dict(plan.replicas)
        self.weights = dict(plan.weights)
        self.decisions.append(records.decision_record(plan, now))
        if changed:
            weights = ", ".join(f"{k}={v:.2f}" for k, v in plan.weights.items())
            _say(f"plan: mode {plan.mode}, workers {plan.replicas}, weights {weights}; "
                 + "; ".join(plan.reasons[:2]))

    def _write_state(self) -> None:
        state = {
            "url": self.url,
            "router": {"pid": self.router.pid if self.router else None, "ready": self.router_ready},
            "workers": [
                {"name": w.view.name, "pool": w.view.pool, "phase": w.view.phase, "pid": w.view.pid,
                 "url": w.view.url, "restarts": w.view.restarts, "hangs": w.view.hangs, "hung": w.view.hung}
                for w in sorted(self.workers.values(), key=lambda w: w.view.name)
            ],
            "desired": self.desired,
            "weights": self.weights,
            "mode": self.memory.state.mode,
            "hungRestarts": self.hung_restarts,
        }
        processes.write_atomically(self.state_dir / "fleet.json", json.dumps(state, indent=1) + "\n")

    # --- the loop ----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> int:
        self._write_config()
        self._start_router()
        self.next_decision = time.monotonic() + self.settings.interval_s
        while not stop.is_set():
            now = time.time()
            if not self._check_router():
                return 1
            self._observe_processes(now)
            if time.monotonic() >= self.next_poll:
                self.next_poll = time.monotonic() + self.hang_rule.poll_every_s
                self._poll_liveness()
            if stop.is_set():
                break
            self._apply(supervise.reconcile(self.desired, [w.view for w in self.workers.values()], now), now)
            if time.monotonic() >= self.next_decision:
                self.next_decision = time.monotonic() + self.settings.interval_s
                self._decide(now)
            self._write_config()
            self._write_state()
            if not self.announced and self.router_ready and processes.router_workers_ready(self.http, self.url):
                self.announced = True
                _say(f"ready: {self.url}/v1 (OpenAI-compatible; Ctrl-C stops the fleet)")
            stop.wait(TICK_S)
        return 0

    def shutdown(self) -> None:
        procs = [w.proc for w in self.workers.values() if w.proc is not None and w.proc.poll() is None]
        if self.router is not None and self.router.poll() is None:
            procs.insert(0, self.router)
        if procs:
            _say(f"stopping {len(procs)} processes (up to {self.stop_timeout_s:.0f}s for requests in flight)")
        processes.stop_all(procs, self.stop_timeout_s)
        self.http.close()
        self.polls.close()
        _say("stopped")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="stepfleet up",
        description="Run a local fleet on loopback: the router, worker processes per pool, and the control loop "
                    "(the operator's decide) starting and stopping workers and setting the router's weights.")
    ap.add_argument("--pools", default="cpu:0.10",
                    help="NAME:PRICE[,NAME:PRICE...]: pools and their (pretend) price per hour (default cpu:0.10)")
    ap.add_argument("--model", default="mini-sd", help="what every worker serves: built-in name, directory or hub id")
    ap.add_argument("--host", default="127.0.0.1", help="address of the router and the workers (loopback)")
    ap.add_argument("--port", type=int, default=8000, help="router port (0: any free port)")
    ap.add_argument("--min-workers", type=int, default=1, help="workers per pool at least")
    ap.add_argument("--max-workers", type=int, default=2, help="workers per pool at most")
    ap.add_argument("--throughput-rps", type=float, default=1.0, help="requests per second one worker serves")
    ap.add_argument("--slo-latency-s", type=float, default=10.0)
    ap.add_argument("--mode", default="auto", choices=["auto", "cost", "capacity"])
    ap.add_argument("--interval-s", type=float, default=5.0, help="seconds between control-loop decisions")
    ap.add_argument("--ready-grace-s", type=float, default=120.0,
                    help="a worker not ready for this long marks its pool capacity-short")
    ap.add_argument("--liveness-poll-s", type=float, default=1.0, help="seconds between liveness polls of a worker")
    ap.add_argument("--liveness-timeout-s", type=float, default=2.0,
                    help="a liveness poll (/readyz) unanswered this long is silent (the router's --load-poll-timeout-s)")
    ap.add_argument("--hang-polls", type=int, default=2,
                    help="silent polls in a row that make a ready worker hung: it is killed and restarted "
                         "(the router's --hang-polls)")
    ap.add_argument("--stop-timeout-s", type=float, default=15.0, help="time to finish in-flight work on stop")
    ap.add_argument("--state-dir", default=None,
                    help="where router.yaml, fleet.json and logs/ go (default: a new temporary directory)")
    ap.add_argument("--worker-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for every `stepfleet worker` (repeat; e.g. --worker-arg=--max-batch=2)")
    return ap


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        pools = fleet.parse_pools(args.pools)
    except ValueError as exc:
        print(f"stepfleet up: --pools: {exc}", file=sys.stderr)
        return 2
    if not 0 <= args.min_workers <= args.max_workers or args.max_workers < 1:
        print("stepfleet up: need 0 <= --min-workers <= --max-workers and --max-workers >= 1", file=sys.stderr)
        return 2
    if args.interval_s <= 0 or args.throughput_rps <= 0 or args.slo_latency_s <= 0:
        print("stepfleet up: --interval-s, --throughput-rps and --slo-latency-s must be positive", file=sys.stderr)
        return 2
    settings = fleet.LocalSettings(
        interval_s=args.interval_s, min_workers=args.min_workers, max_workers=args.max_workers,
        throughput_rps_per_worker=args.throughput_rps, slo_latency_s=args.slo_latency_s,
        ready_grace_s=args.ready_grace_s, mode=args.mode,
    )
    try:
        hang_rule = liveness.HangRule(poll_every_s=args.liveness_poll_s, timeout_s=args.liveness_timeout_s,
                                      polls=args.hang_polls)
    except ValueError as exc:
        print(f"stepfleet up: {exc}", file=sys.stderr)
        return 2
    state_dir = Path(args.state_dir) if args.state_dir else Path(tempfile.mkdtemp(prefix="stepfleet-up-"))
    state_dir = state_dir.resolve()
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    port = args.port or processes.free_port(args.host)

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set():  # a second Ctrl-C: do not wait for requests in flight
            fleet_.stop_timeout_s = 0.0
        stop.set()

    fleet_ = LocalFleet(pools, settings, model=args.model, host=args.host, port=port, state_dir=state_dir,
                        worker_args=list(args.worker_arg), stop_timeout_s=args.stop_timeout_s, hang_rule=hang_rule)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    _say(f"pools {', '.join(f'{p.name} (${p.price_per_hour:g}/h)' for p in pools)}; model {args.model}; "
         f"state in {state_dir}")
    try:
        code = fleet_.run(stop)
    finally:
        fleet_.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code
