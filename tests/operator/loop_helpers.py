"""Helpers for the control-loop tests: a tiny loopback HTTP server, worker metrics, pods, Events."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from stepfleet.operator import names
from stepfleet.serving import metrics as wm

#: (status, content type, body) for a request path and its query parameters.
Responder = Callable[[str, dict[str, list[str]]], tuple[int, str, str]]


class FakeServer:
    """A threaded HTTP server on 127.0.0.1 whose answers the test sets (`responder`)."""

    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self.requests: list[tuple[str, dict[str, list[str]]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                url = urlparse(self.path)
                query = parse_qs(url.query)
                outer.requests.append((url.path, query))
                status, ctype, body = outer.responder(url.path, query)
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def queries(self) -> list[str]:
        return [q["query"][0] for path, q in self.requests if path == "/api/v1/query" and "query" in q]


@contextlib.contextmanager
def serve(responder: Responder) -> Iterator[FakeServer]:
    server = FakeServer(responder)
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        server.thread.join(timeout=2)


class Workers:
    """Per-pool worker metrics whose request counters grow at a set rate (requests/s)."""

    def __init__(self, rates: dict[str, float], queue: float = 0.0) -> None:
        self.rates = dict(rates)
        self.queue = queue
        self.started = time.monotonic()
        self.garbage: str | None = None

    def text(self, pool: str) -> str:
        if self.garbage is not None:
            return self.garbage
        total = self.rates.get(pool, 0.0) * (time.monotonic() - self.started)
        return "\n".join(
            [
                f"# TYPE {wm.REQUESTS} counter",
                f'{wm.REQUESTS}{{pool="{pool}",kind="generation",status="ok"}} {total}',
                f"# TYPE {wm.QUEUE_DEPTH} gauge",
                f'{wm.QUEUE_DEPTH}{{pool="{pool}"}} {self.queue}',
                f"# TYPE {wm.REQUEST_SECONDS} histogram",
                f'{wm.REQUEST_SECONDS}_bucket{{pool="{pool}",kind="generation",le="1.0"}} {total * 0.9}',
                f'{wm.REQUEST_SECONDS}_bucket{{pool="{pool}",kind="generation",le="+Inf"}} {total}',
                f'{wm.REQUEST_SECONDS}_count{{pool="{pool}",kind="generation"}} {total}',
                f'{wm.REQUEST_SECONDS}_sum{{pool="{pool}",kind="generation"}} {total * 0.5}',
                "",
            ]
        )

    def responder(self, pool: str) -> Responder:
        """Answers for one pool's pods (every pod of a pool scrapes one server: one port per pool)."""
        return lambda path, _: (200, "text/plain; version=0.0.4", self.text(pool))


def stamp(seconds_ago: float = 0.0) -> str:
    when = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=seconds_ago)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def pod(service: str, pool: str, index: int, *, port: int = names.WORKER_PORT) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{service}-{pool}-{index}",
            "labels": names.worker_labels(service, pool),
        },
        "spec": {"containers": [{"name": "worker", "ports": [{"name": "http", "containerPort": port}]}]},
    }


def running_status(ready: bool = True) -> dict[str, Any]:
    return {
        "phase": "Running",
        "podIP": "127.0.0.1",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }


def unready_status(ready_false_ago: float, waiting_reason: str | None = None) -> dict[str, Any]:
    """A scheduled pod that has not been Ready for `ready_false_ago` s (its container waiting for `waiting_reason`)."""
    state = {"waiting": {"reason": waiting_reason}} if waiting_reason else {"running": {}}
    return {
        "phase": "Running",
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": stamp(ready_false_ago + 5)},
            {"type": "Ready", "status": "False", "lastTransitionTime": stamp(ready_false_ago)},
        ],
        "containerStatuses": [{"name": "worker", "ready": False, "state": state}],
    }


def unschedulable_status(seconds_ago: float) -> dict[str, Any]:
    return {
        "phase": "Pending",
        "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "lastTransitionTime": stamp(seconds_ago)}
        ],
    }


def ice_event(nodepool: str, *, first_ago: float = 30.0, last_ago: float = 0.0) -> dict[str, Any]:
    """What Karpenter posts when it cannot launch a NodeClaim of `nodepool`."""
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{nodepool}-x7k2p.", "namespace": "default"},
        "involvedObject": {"apiVersion": "karpenter.sh/v1", "kind": "NodeClaim", "name": f"{nodepool}-x7k2p"},
        "reason": "InsufficientCapacityError",
        "message": "NodeClaim launch failed: all requested instance types were unavailable during launch",
        "type": "Warning",
        "firstTimestamp": stamp(first_ago),
        "lastTimestamp": stamp(last_ago),
        "count": 3,
        "source": {"component": "karpenter"},
    }


def vector(values: dict[str, float | str]) -> str:
    return json.dumps(
        {
            "status": "success",
            "data": {
                "resultType": "vector",
                "result": [{"metric": {"pool": p}, "value": [time.time(), str(v)]} for p, v in values.items()],
            },
        }
    )


#: What a worker's `/readyz` says when the checkpoint is of another family than the service asks for.
FAMILY_MISMATCH = (
    "FamilyMismatch: family mismatch: the service asks for family 'sdxl' (StableDiffusionXLPipeline), "
    "but model 'tiny-sd' is a StableDiffusionPipeline (family sd15 or sd2)"
)


def readyz_body(status: str, error: str | None = None) -> str:
    """A worker's `/readyz` body: `{"status": "loading"|"failed"|"ready", "error": ...}`."""
    return json.dumps({"status": status, "error": error})


class Readyz:
    """A worker's `/readyz` whose answer the test changes (`status`, `error`)."""

    def __init__(self, status: str = "loading", error: str | None = None) -> None:
        self.status, self.error = status, error

    def responder(self, path: str, _: dict[str, list[str]]) -> tuple[int, str, str]:
        if path != "/readyz":
            return 404, "text/plain", "not found"
        code = 200 if self.status == "ready" else 503
        return code, "application/json", readyz_body(self.status, self.error)
