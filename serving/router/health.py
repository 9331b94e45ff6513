"""Which workers answer: the load poll, and what happens to a worker that stops answering.

A worker that crashed refuses connections, and the forwarder ejects it on the spot. A hung
one (stopped by SIGSTOP, deadlocked, swapping) is worse: the kernel still accepts
connections, so requests sent to it wait for an answer that never comes. Before issue 19
they waited for the 300 s upstream timeout, and the load poll ignored its own timeouts, so
the worker stayed "ready" and kept receiving traffic.

Now each worker's `/v1/load` is polled every `load_poll_s` with a `load_poll_timeout_s`
deadline. `hang_polls` unanswered polls in a row mark it *unresponsive*: the balancer skips
it, and every attempt in flight on it is abandoned (`abandoned(url)` resolves) and retried
on another worker, within its request's deadline. Any answer brings it back into rotation.
An attempt that times out (its request's deadline, or the upstream limit) has the worker
polled at once, so a hang is found without waiting for the next round.

A busy worker is not mistaken for a hung one: its event loop answers polls between
denoising steps, in milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from stepfleet.serving.router.balancing import EndpointLoad
from stepfleet.serving.router.config import RouterSettings
from stepfleet.serving.router.metrics import RouterMetrics
from stepfleet.serving.router.state import FleetState
from stepfleet.serving.router.upstream import (
    ConnectFailed,
    UpstreamClient,
    UpstreamError,
    UpstreamTimeout,
)

log = logging.getLogger(__name__)


class Health:
    """Polls workers, marks the silent ones unresponsive, and lets attempts on them go."""

    def __init__(self, settings: RouterSettings, fleet: FleetState, client: UpstreamClient, metrics: RouterMetrics,
                 headers: list[tuple[str, str]], clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.fleet = fleet
        self.client = client
        self.metrics = metrics
        self.headers = headers
        self.clock = clock
        #: Per worker URL: resolves when the worker is marked unresponsive (then replaced).
        self._abandon: dict[str, asyncio.Future[None]] = {}
        self._probing: set[str] = set()

    def abandoned(self, url: str) -> asyncio.Future[None]:
        """A future that resolves when `url` is marked unresponsive (an attempt waits on it)."""
        fut = self._abandon.get(url)
        if fut is None or fut.done():
            fut = self._abandon[url] = asyncio.get_running_loop().create_future()
        return fut

    def suspect(self, ep: EndpointLoad) -> None:
        """An attempt on `ep` got no answer in time: poll it now (once at a time)."""
        if ep.url not in self._probing:
            self._probing.add(ep.url)
            task = asyncio.get_running_loop().create_task(self.poll(ep))
            task.add_done_callback(lambda _: self._probing.discard(ep.url))

    async def poll(self, ep: EndpointLoad) -> None:
        """One poll of `ep`'s /v1/load: readiness, backlog, and whether it answers at all."""
        try:
            resp = await self.client.request("GET", ep.url + "/v1/load", self.headers,
                                             timeout_s=self.settings.load_poll_timeout_s)
        except ConnectFailed:
            ep.down_until = self.clock() + self.settings.eject_s
            return
        except UpstreamTimeout:
            if ep.no_answer(self.settings.hang_polls):
                self._mark_unresponsive(ep)
            return
        except UpstreamError:
            return
        if ep.answered():
            log.warning("worker %s (pool %s) answers again; back in rotation", ep.url, ep.pool)
        if resp.status == 401:
            log.error("worker %s refuses the router's worker token (check --worker-token-file)", ep.url)
            return
        if resp.status != 200:
            return  # an older worker without /v1/load: rely on response headers and failures
        try:
            data = json.loads(resp.content)
            ep.ready = bool(data.get("ready", True))
            ep.report(float(data.get("backlog_s", 0.0)), self.clock())
            ep.down_until = 0.0
        except (ValueError, AttributeError, TypeError):
            pass

    def _mark_unresponsive(self, ep: EndpointLoad) -> None:
        log.warning("worker %s (pool %s) answered no load poll in %d × %.1f s: unresponsive, failing over "
                    "its %d request(s) in flight", ep.url, ep.pool, self.settings.hang_polls,
                    self.settings.load_poll_timeout_s, ep.inflight)
        self.metrics.unresponsive.labels(ep.pool).inc()
        fut = self._abandon.pop(ep.url, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def run(self) -> None:
        """Every `load_poll_s`: poll every worker (each on its own, so one silent worker does not
        delay the others' next poll)."""
        pending: dict[str, asyncio.Task[None]] = {}
        try:
            while True:
                try:
                    for ep in self.fleet.endpoints():
                        task = pending.get(ep.url)
                        if task is None or task.done():
                            pending[ep.url] = asyncio.create_task(self.poll(ep))
                    known = {ep.url for ep in self.fleet.endpoints()}
                    for url in [u for u in pending if u not in known and pending[u].done()]:
                        del pending[url]
                        self._abandon.pop(url, None)
                except Exception:  # the poller must survive anything
                    log.exception("load poll failed")
                await asyncio.sleep(self.settings.load_poll_s)
        finally:
            for task in pending.values():
                task.cancel()
