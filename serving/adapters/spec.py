"""The adapters a worker registers at start (`--adapters`), as the operator renders them from
`spec.adapters[]`: pure text ⇄ entries, no torch.

Format: comma-separated `name=source` entries; a name prefixed with `*` is preloaded onto the
device before the worker reports ready. Sources are `hf://owner/repo[/file]` or a local path
(a `pvc://CLAIM/PATH` of the spec is rendered as the path where the claim is mounted), so a
source holds no comma.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class AdapterSpecEntry:
    name: str
    source: str
    preload: bool = False


def render_adapters(entries: Sequence[AdapterSpecEntry]) -> str | None:
    """The `--adapters` value for `entries` (None when there are none)."""
    if not entries:
        return None
    for e in entries:
        if not _NAME.fullmatch(e.name) or "," in e.source or not e.source:
            raise ValueError(f"adapter {e.name!r}: a name of letters, digits, '.', '_', '-' and a source without commas")
    return ",".join(f"{'*' if e.preload else ''}{e.name}={e.source}" for e in entries)


def parse_adapters(text: str | None) -> list[AdapterSpecEntry]:
    """Entries of an `--adapters` value; ValueError names the malformed entry."""
    out: list[AdapterSpecEntry] = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, source = part.partition("=")
        preload = name.startswith("*")
        name = name.removeprefix("*")
        if not sep or not _NAME.fullmatch(name) or not source:
            raise ValueError(f"adapter entry {part!r}: use [*]name=source")
        if name in {e.name for e in out}:
            raise ValueError(f"adapter {name!r} is listed twice")
        out.append(AdapterSpecEntry(name, source, preload))
    return out
