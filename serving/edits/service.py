"""What the HTTP layer may do with templates: read them, and add or drop them on the loop thread.

The registry, the cache and the masked UNet belong to the step loop: a template dropped
while a step reads its activations, or added while a RECORD run of the same image is being
prepared, would race with it. So additions and deletions run as calls on the engine's loop
thread (`Engine.call_on_loop`) at a step boundary, and the HTTP handlers await them.
Reads (`get`, `all`, `find`) go to the thread-safe registry directly.
"""

from __future__ import annotations

import asyncio
from typing import Any

from stepfleet.serving.edits.extension import EditExtension
from stepfleet.serving.edits.templates import Template
from stepfleet.serving.engine import Engine


class TemplateService:
    def __init__(self, engine: Engine, edits: EditExtension) -> None:
        self.engine = engine
        self.edits = edits

    @property
    def cache(self):  # -> TemplateCache, for metrics
        return self.edits.cache

    def get(self, template_id: str) -> Template | None:
        return self.edits.templates.get(template_id)

    def find(self, digest: str) -> Template | None:
        """The newest ready template of this image, if any."""
        return self.edits.templates.find(digest)

    def all(self) -> list[Template]:
        return self.edits.templates.all()

    def public(self, template: Template) -> dict[str, Any]:
        return template.public(self.edits.template_cached(template))

    async def add(self, template: Template) -> None:
        """Register `template` (at a step boundary); its RECORD request (`templates.record_params`)
        is then submitted like any other, and makes it ready when it finishes."""
        await asyncio.wrap_future(self.engine.call_on_loop(lambda: self.edits.add_template(template)))

    async def delete(self, template_id: str) -> bool:
        """Forget a template and its cached activations (at a step boundary); False if unknown."""
        return await asyncio.wrap_future(self.engine.call_on_loop(lambda: self.edits.drop_template(template_id)))
