"""Templates through the router: registered on their id's home, found and listed across workers.

A template lives on the worker that recorded it (its activations are that worker's memory).
Before issue 19 a registration went to the least-loaded worker while lookups went to the
id's rendezvous home, so 6 of 6 lookups of existing templates answered 404, and a listing
showed one worker's templates. Now:

- the router chooses a new template's id (`new_template_id`) and sends it with the
  registration (`X-Stepfleet-Template-Id`), which is balanced as a request *for* that id, so
  it lands on the id's rendezvous home — where edits of it are sent; if the home is not
  usable it lands on the next in rank, and `TemplateHomes` records where it did land;
- a lookup (`GET /v1/templates/{id}`) and a deletion ask every available worker
  (`ask_all`) — a template may sit on a former home after workers come and go — and a listing
  merges every worker's list (`merge_lists`).

Workers answer for the request's tenant only (`serving.worker_auth`), so fan-out shows no
tenant another's templates.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from stepfleet.serving.router.balancing import EndpointLoad
from stepfleet.serving.router.upstream import Reply, UpstreamClient, UpstreamError

#: Templates whose home the router remembers (an id and a URL each: ~200 bytes).
MAX_HOMES = 100_000


def new_template_id() -> str:
    """An id the router gives a template it registers (the worker's own form: `tmpl-` + 16 hex)."""
    return f"tmpl-{secrets.token_hex(8)}"


class TemplateHomes:
    """Where templates were registered: id → worker URL, most recent `limit` kept."""

    def __init__(self, limit: int = MAX_HOMES) -> None:
        self.limit = limit
        self._homes: OrderedDict[str, str] = OrderedDict()

    def record(self, template_id: str, url: str) -> None:
        self._homes[template_id] = url
        self._homes.move_to_end(template_id)
        while len(self._homes) > self.limit:
            self._homes.popitem(last=False)

    def get(self, template_id: str | None) -> str | None:
        return self._homes.get(template_id) if template_id else None

    def forget(self, template_id: str) -> None:
        self._homes.pop(template_id, None)

    def __len__(self) -> int:
        return len(self._homes)


def registered_id(reply: Reply) -> str | None:
    """The id in a worker's answer to a registration (None when it is not a template object)."""
    try:
        value = json.loads(reply.content).get("id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


async def ask_all(client: UpstreamClient, endpoints: Sequence[EndpointLoad], method: str, target: str,
                  headers: list[tuple[str, str]], timeout_s: float) -> list[tuple[EndpointLoad, Reply]]:
    """The same request to every worker at once; the answers of those that answered."""

    async def one(ep: EndpointLoad) -> tuple[EndpointLoad, Reply] | None:
        try:
            return ep, await client.request(method, ep.url + target, headers, timeout_s=timeout_s)
        except UpstreamError:
            return None

    return [r for r in await asyncio.gather(*(one(ep) for ep in endpoints)) if r is not None]


def first_found(replies: Sequence[tuple[EndpointLoad, Reply]]) -> tuple[EndpointLoad | None, Reply] | None:
    """The answer a lookup or deletion gives: a worker's 2xx, else a 404, else any answer."""
    for wanted in (lambda s: 200 <= s < 300, lambda s: s == 404, lambda s: True):
        for ep, reply in replies:
            if wanted(reply.status):
                return ep, reply
    return None


def listed_items(replies: Sequence[tuple[EndpointLoad, Reply]]) -> dict[str, dict[str, Any]] | None:
    """Every item of the workers' 2xx list answers (`{"data": [...]}`), each id once (the first
    seen); None when no worker answered with a list."""
    seen: dict[str, dict[str, Any]] = {}
    listed = False
    for _, reply in replies:
        if reply.status != 200:
            continue
        try:
            data = json.loads(reply.content).get("data")
        except (ValueError, AttributeError):
            continue
        if not isinstance(data, list):
            continue
        listed = True
        for item in data:
            if isinstance(item, dict) and isinstance(item.get("id"), str):
                seen.setdefault(item["id"], item)
    return seen if listed else None


def merge_lists(replies: Sequence[tuple[EndpointLoad, Reply]]) -> dict[str, Any] | None:
    """One `TemplateList` of every worker's 2xx listing (each id once, oldest first); None when
    no worker listed any."""
    seen = listed_items(replies)
    if seen is None:
        return None
    items = sorted(seen.values(), key=lambda t: (t.get("created") or 0, t["id"]))
    return {"object": "list", "data": items}
