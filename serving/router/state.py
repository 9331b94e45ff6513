"""The router's live view of the fleet: pools from the config, workers from discovery.

Config reloads and discovery updates replace *lists*, never the `EndpointLoad` objects of
workers that stay, so learned speeds and in-flight counts survive a weight change, and a
request in flight on a worker that disappears still finishes (it holds its own reference).
Everything here runs on the event loop thread; discovery threads hand updates over with
`loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import logging

from stepfleet.serving.router.balancing import EndpointLoad, PoolView
from stepfleet.serving.router.config import RouterConfig

log = logging.getLogger(__name__)


class FleetState:
    def __init__(self) -> None:
        self.config: RouterConfig | None = None
        self.pools: list[PoolView] = []
        #: Discovered worker URLs per pool; a pool without an entry uses its static endpoints.
        self.discovered: dict[str, list[str]] = {}
        self._loads: dict[tuple[str, str], EndpointLoad] = {}

    def apply_config(self, config: RouterConfig) -> None:
        """Swap in a new config; keeps the loads of workers that remain."""
        self.config = config
        self._rebuild()

    def set_endpoints(self, pool: str, urls: list[str] | None) -> None:
        """Discovery's answer for a pool (None: forget it, fall back to the static list)."""
        if urls is None:
            self.discovered.pop(pool, None)
        else:
            self.discovered[pool] = sorted(dict.fromkeys(urls))
        self._rebuild()

    def _rebuild(self) -> None:
        if self.config is None:
            return
        pools: list[PoolView] = []
        keep: dict[tuple[str, str], EndpointLoad] = {}
        for p in self.config.pools:
            urls = self.discovered.get(p.name) if not p.endpoints else None
            urls = list(p.static_endpoints()) if urls is None else urls
            eps = []
            for url in urls:
                load = self._loads.get((p.name, url)) or EndpointLoad(url=url, pool=p.name)
                keep[(p.name, url)] = load
                eps.append(load)
            pools.append(PoolView(p.name, p.weight, eps))
        self._loads = keep
        self.pools = pools

    def endpoints(self) -> list[EndpointLoad]:
        return [e for p in self.pools for e in p.endpoints]

    def snapshot(self, now: float) -> dict:
        """A JSON-able picture for `/router/state` (debugging, tests)."""
        return {
            "service": self.config.service if self.config else None,
            "pools": [
                {
                    "name": p.name,
                    "weight": p.weight,
                    "endpoints": [
                        {
                            "url": e.url,
                            "ready": e.ready,
                            "down": now < e.down_until,
                            "unresponsive": e.unresponsive,
                            "saturated": now < e.saturated_until,
                            "inflight": e.inflight,
                            "inflight_units": round(e.inflight_units, 3),
                            "wait_s": round(e.wait_s(now), 4),
                            "rate_units_per_s": round(e.rate, 3),
                        }
                        for e in p.endpoints
                    ],
                }
                for p in self.pools
            ],
        }
