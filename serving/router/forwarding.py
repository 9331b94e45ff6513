"""Sending a request to a worker, and the failover walk when a worker fails.

One pooled `UpstreamClient` per router (keep-alive connections to every worker; see
upstream.py for why it is not httpx). Each attempt asks
the pure `Balancer` for a target, sends the body unchanged (JSON or multipart bytes, the
client's content type and boundary kept), and classifies the outcome:

* connection refused / reset / protocol error, or 5xx → a *failure*: retried on another
  worker of the pool, then another pool, up to `max_attempts` and within the deadline;
  a refused connection also ejects the worker for `eject_s`;
* 429 → the worker is *saturated* until its Retry-After; the next worker is tried without
  spending a failure. If every worker is saturated the client gets 429 with Retry-After;
* anything else (2xx, 4xx) is the answer.

A request's `deadline_ms` bounds each attempt and the walk: past it the client gets 504
`deadline_exceeded`, never a late answer or a hang. An attempt on a worker that the health
poller marks unresponsive (hung) is given up and retried elsewhere (`health`). The in-flight
slot an attempt takes is given back however the attempt ends, the client leaving included.

A streamed request (`stream: true`) walks the same way until a worker answers 2xx: from then
on its body is relayed as it arrives (`UpstreamReply.stream`), and the attempt's in-flight
slot is held until the stream ends or the client leaves (`UpstreamReply.release`, which also
closes the worker's connection, so the worker cancels the request at its next step). Nothing
is retried after the first byte of a stream went to the client.

Workers report their backlog on every response (`X-Stepfleet-Backlog-Seconds`), so the
router's load view is refreshed as a side effect of forwarding.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from stepfleet.serving.errors import APIError
from stepfleet.serving.router.balancing import (
    Attempts,
    Balancer,
    EndpointLoad,
    saturation_retry_after,
)
from stepfleet.serving.router.config import RouterSettings
from stepfleet.serving.router.costing import RequestCost
from stepfleet.serving.router.health import Health
from stepfleet.serving.router.metrics import RouterMetrics
from stepfleet.serving.router.state import FleetState
from stepfleet.serving.router.upstream import (
    ConnectFailed,
    Reply,
    StreamedReply,
    UpstreamClient,
    UpstreamError,
    UpstreamTimeout,
)
from stepfleet.serving.worker_auth import TEMPLATE_ID_HEADER, TENANT_HEADER

log = logging.getLogger(__name__)

BACKLOG_HEADER = "x-stepfleet-backlog-seconds"
#: Never sent upstream: hop-by-hop, recomputed, the client's credentials, or what only the
#: router may say to a worker (the tenant, a new template's id: `serving.worker_auth`).
_DROP_REQUEST = frozenset({
    "host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade",
    "proxy-authorization", "proxy-connection", "authorization", "expect", "accept-encoding",
    TENANT_HEADER, TEMPLATE_ID_HEADER,
})
#: Never copied back: hop-by-hop, recomputed by our server, or describing one worker only.
_DROP_RESPONSE = frozenset({
    "connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "date",
    "server", "x-request-id", "x-stepfleet-backlog-seconds", "x-stepfleet-step-units",
})
_RETRY_STATUSES = frozenset({500, 502, 503, 504})


@dataclass
class UpstreamReply:
    status: int
    headers: list[tuple[str, str]]
    content: bytes
    pool: str
    url: str
    attempts: int
    #: A streamed 2xx: the body as it arrives (content is then empty) ...
    stream: AsyncIterator[bytes] | None = None
    #: ... and what ends it (closes the connection, gives the worker's slot back); idempotent.
    release: Callable[[], None] | None = None


def make_client(settings: RouterSettings) -> UpstreamClient:
    return UpstreamClient(connect_timeout_s=settings.connect_timeout_s, timeout_s=settings.upstream_timeout_s)


def upstream_headers(headers: list[tuple[str, str]], request_id: str) -> list[tuple[str, str]]:
    out = [(k, v) for k, v in headers if k.lower() not in _DROP_REQUEST and k.lower() != "x-request-id"]
    out.append(("x-request-id", request_id))
    out.append(("accept-encoding", "identity"))
    return out


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    for k, v in headers:
        if k == name:
            return v
    return None


def _retry_after(headers: list[tuple[str, str]], default: float) -> float:
    try:
        return max(0.0, float(_header(headers, "retry-after") or default))
    except ValueError:
        return default


class Forwarder:
    def __init__(self, settings: RouterSettings, fleet: FleetState, balancer: Balancer, metrics: RouterMetrics,
                 client: UpstreamClient, clock: Callable[[], float] = time.monotonic,
                 health: Health | None = None) -> None:
        self.health = health
        self.settings = settings
        self.fleet = fleet
        self.balancer = balancer
        self.metrics = metrics
        self.client = client
        self.clock = clock

    async def forward(self, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes,
                      cost: RequestCost, request_id: str, route: str, deadline: float | None = None,
                      extra_headers: Sequence[tuple[str, str]] = (), stream: bool = False) -> UpstreamReply:
        """Forward with failover; raise `APIError` (429/503, 504 past `deadline`) when no worker answered.

        `deadline` (the router's clock) bounds every attempt and the retries; `extra_headers`
        are the router's own (worker token, tenant), sent after the client's.
        """
        attempts = Attempts()
        send_headers = upstream_headers(headers, request_id) + list(extra_headers)
        last_error = "no worker was available"
        target_path = path + (f"?{query}" if query else "")
        while attempts.failures < self.settings.max_attempts:
            now = self.clock()
            timeout_s = self.settings.upstream_timeout_s
            if deadline is not None:
                if now >= deadline:
                    raise APIError(504, f"deadline_ms passed before a worker answered ({last_error})",
                                   param="deadline_ms", code="deadline_exceeded")
                timeout_s = min(timeout_s, deadline - now)
            pools = self.fleet.pools
            target = self.balancer.next_target(pools, cost, now, attempts)
            if target is None:
                break
            ep = target.endpoint
            units = target.units
            predicted = ep.predicted_s(units, now)
            ahead = ep.dispatched(units)
            started = self.clock()
            # The slot taken by `dispatched` is given back on every way out: an answer, a
            # failure, the client leaving (cancellation), a bug (issue 19: leaks locked the router);
            # a stream's, when the stream ends (`release`).
            handed_over = False
            try:
                resp = await self._attempt(ep, method, target_path, send_headers, body, timeout_s, stream)
                handed_over = isinstance(resp, StreamedReply) and resp.chunks is not None
            except UpstreamError as exc:
                attempts.failures += 1
                reason = type(exc).__name__
                if isinstance(exc, ConnectFailed):
                    ep.down_until = self.clock() + self.settings.eject_s
                elif isinstance(exc, UpstreamTimeout) and self.health is not None:
                    self.health.suspect(ep)
                last_error = f"worker {ep.url} (pool {target.pool}) failed: {reason}: {exc}"
                log.warning("%s [%s]", last_error, request_id)
                self.metrics.retries.labels(target.pool, reason).inc()
                continue
            finally:
                if not handed_over:
                    ep.finished(units)
            end = self.clock()
            elapsed = end - started
            ep.answered()
            self.metrics.upstream_seconds.labels(target.pool, route).observe(elapsed)
            backlog = _header(resp.headers, BACKLOG_HEADER)
            if backlog is not None:
                try:
                    ep.report(float(backlog), end)
                except ValueError:
                    pass
            status = resp.status
            if status == 429:
                ep.saturated_until = end + _retry_after(resp.headers, 1.0)
                last_error = f"worker {ep.url} (pool {target.pool}) is saturated"
                self.metrics.retries.labels(target.pool, "saturated").inc()
                continue
            if status in _RETRY_STATUSES:
                attempts.failures += 1
                if status == 503:  # not ready / shutting down: leave it alone for a while
                    ep.down_until = end + min(self.settings.eject_s, _retry_after(resp.headers, 1.0))
                last_error = f"worker {ep.url} (pool {target.pool}) answered {status}: {_message(resp)}"
                log.warning("%s [%s]", last_error, request_id)
                self.metrics.retries.labels(target.pool, str(status)).inc()
                continue
            out = [(k, v) for k, v in resp.headers if k not in _DROP_RESPONSE]
            if isinstance(resp, StreamedReply) and resp.chunks is not None:
                chunks, release = self._relay(resp, ep, units, ahead, started, predicted, target.pool)
                return UpstreamReply(status, out, b"", target.pool, ep.url, len(attempts.tried_pools),
                                     stream=chunks, release=release)
            if 200 <= status < 300 and cost.kind != "other":
                # What actually ran here: cached cost on the template's home, full cost elsewhere.
                ep.learn(ahead, units, elapsed)
                if predicted > 0:
                    self.metrics.prediction_error.labels(target.pool).observe(elapsed / predicted)
            return UpstreamReply(status, out, resp.content, target.pool, ep.url, len(attempts.tried_pools))
        if deadline is not None and self.clock() >= deadline:
            raise APIError(504, f"deadline_ms passed before a worker answered ({last_error})",
                           param="deadline_ms", code="deadline_exceeded")
        self._raise_unavailable(attempts, last_error)
        raise AssertionError("unreachable")

    def _relay(self, resp: StreamedReply, ep: EndpointLoad, units: float, ahead: float, started: float,
               predicted: float, pool: str) -> tuple[AsyncIterator[bytes], Callable[[], None]]:
        """A stream's body, and its release: close the connection and give the slot back, once;
        a stream read to its end teaches the worker's speed like any answer."""
        released = False
        completed = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            resp.close()
            ep.finished(units)
            if completed:
                elapsed = self.clock() - started
                ep.learn(ahead, units, elapsed)
                if predicted > 0:
                    self.metrics.prediction_error.labels(pool).observe(elapsed / predicted)

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal completed
            assert resp.chunks is not None
            try:
                async for chunk in resp.chunks:
                    yield chunk
                completed = True
            finally:
                release()

        return chunks(), release

    async def _attempt(self, ep: EndpointLoad, method: str, target: str, headers: list[tuple[str, str]],
                       body: bytes, timeout_s: float, stream: bool = False) -> Reply | StreamedReply:
        """One exchange with `ep`, given up (`UpstreamTimeout`) if the worker is marked
        unresponsive meanwhile (`health`): its request is then retried elsewhere. A stream's
        exchange ends with the response head (`UpstreamClient.stream`)."""
        if stream:
            work = self.client.stream(method, ep.url + target, headers, body, timeout_s=timeout_s,
                                      idle_s=self.settings.upstream_timeout_s)
        else:
            work = self.client.request(method, ep.url + target, headers, body, timeout_s=timeout_s)
        if self.health is None:
            return await work
        abandoned = self.health.abandoned(ep.url)
        task = asyncio.ensure_future(work)
        try:
            await asyncio.wait((task, abandoned), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled (the client left): the exchange goes too
            task.cancel()
            raise
        if task.done():
            return task.result()
        task.cancel()  # closes the connection to the silent worker
        await asyncio.wait((task,))
        raise UpstreamTimeout(f"{ep.url} stopped answering (unresponsive to load polls)")

    def _raise_unavailable(self, attempts: Attempts, last_error: str) -> None:
        now = self.clock()
        wait = saturation_retry_after(self.fleet.pools, now, self.settings.max_inflight_per_worker)
        if wait is not None:
            raise APIError(429, "every worker is saturated; retry later", code="saturated",
                           headers={"Retry-After": str(math.ceil(wait))})
        if not any(p.endpoints for p in self.fleet.pools):
            raise APIError(503, "no worker pool is configured (or none has workers)", code="no_pool",
                           headers={"Retry-After": "5"})
        if not attempts.tried_pools:
            raise APIError(503, "no pool with a weight above 0 has a usable worker", code="no_pool",
                           headers={"Retry-After": "5"})
        raise APIError(503, f"no worker could serve the request after {len(attempts.tried_pools)} attempt(s): "
                       f"{last_error}", code="upstream_unavailable", headers={"Retry-After": "1"})


def _message(resp: Reply) -> str:
    try:
        return str(json.loads(resp.content)["error"]["message"])[:200]
    except Exception:
        return resp.content[:200].decode("utf-8", "replace")
