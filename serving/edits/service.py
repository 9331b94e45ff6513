"""What the HTTP layer may do with templates: read them, and add or drop them on the loop thread,
each on behalf of the tenant that owns it.

The registry, the cache and the masked UNet belong to the step loop: a template dropped
while a step reads its activations, or added while a RECORD run of the same image is being
prepared, would race with it. So additions and deletions run as calls on the engine's loop
thread (`Engine.call_on_loop`) at a step boundary, and the HTTP handlers await them.
Reads (`get`, `all`, `find`) go to the thread-safe registry directly.

Every template belongs to the tenant that registered it (`serving.worker_auth`: the router
names the tenant of each request; "" when there is none). Each call names a tenant and sees
only that tenant's templates: another tenant's template is, to it, a template that does not
exist — the same 404, and no cached path for an identical upload — so no tenant learns what
another registered (issue 19). The owners live here, beside the registry, which stays a
store of templates and knows nothing of tenants.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from stepfleet.serving.edits.extension import EditExtension
from stepfleet.serving.edits.templates import Template, TemplateState
from stepfleet.serving.engine import Engine


class TemplateService:
    def __init__(self, engine: Engine, edits: EditExtension) -> None:
        self.engine = engine
        self.edits = edits
        self._owners: dict[str, str] = {}
        self._lock = threading.Lock()

    @property
    def cache(self):  # -> TemplateCache, for metrics
        return self.edits.cache

    def _owns(self, tenant: str, template: Template | None) -> bool:
        with self._lock:
            return template is not None and self._owners.get(template.id) == tenant

    def get(self, template_id: str, tenant: str = "") -> Template | None:
        template = self.edits.templates.get(template_id)
        return template if self._owns(tenant, template) else None

    def find(self, digest: str, tenant: str = "") -> Template | None:
        """The tenant's newest ready template of this image, if any."""
        for t in reversed(self.edits.templates.all()):
            if t.digest == digest and t.state is TemplateState.READY and self._owns(tenant, t):
                return t
        return None

    def all(self, tenant: str = "") -> list[Template]:
        return [t for t in self.edits.templates.all() if self._owns(tenant, t)]

    def public(self, template: Template) -> dict[str, Any]:
        return template.public(self.edits.template_cached(template))

    async def add(self, template: Template, tenant: str = "") -> bool:
        """Register `template` for `tenant` (at a step boundary); its RECORD request
        (`templates.record_params`) is then submitted like any other, and makes it ready when it
        finishes. False, and nothing registered, when the id is taken (the router chooses ids)."""
        with self._lock:
            if template.id in self._owners or self.edits.templates.get(template.id) is not None:
                return False
            self._owners[template.id] = tenant
            self._forget_evicted()
        await asyncio.wrap_future(self.engine.call_on_loop(lambda: self.edits.add_template(template)))
        return True

    async def delete(self, template_id: str, tenant: str = "") -> bool:
        """Forget the tenant's template and its cached activations (at a step boundary); False if
        it has no template of that id."""
        if self.get(template_id, tenant) is None:
            return False
        dropped = await asyncio.wrap_future(
            self.engine.call_on_loop(lambda: self.edits.drop_template(template_id)))
        with self._lock:
            self._owners.pop(template_id, None)
        return dropped

    def _forget_evicted(self) -> None:
        """Drop owners of templates the registry forgot (it evicts the oldest beyond its bound),
        so this map stays as small as the registry. Called with the lock held."""
        if len(self._owners) > 2 * max(1, self.edits.templates.max_templates):
            live = {t.id for t in self.edits.templates.all()}
            self._owners = {k: v for k, v in self._owners.items() if k in live}
