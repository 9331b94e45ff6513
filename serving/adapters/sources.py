"""Where an adapter's file comes from: `hf://repo[/file]`, `pvc://path`, or a local path.

The same rules as model sources (`serving.loading`): a hub file is fetched with
`huggingface_hub` (honouring `HF_HUB_OFFLINE`), `pvc://` names a path on a mounted volume, and
anything else is a local path. The size bound is checked before the file is read whole.
"""

from __future__ import annotations

import os
from pathlib import Path

from stepfleet.serving.adapters.lora import AdapterError

#: The file a hub repository's LoRA is usually saved as (diffusers' `save_lora_weights`).
DEFAULT_HUB_FILE = "pytorch_lora_weights.safetensors"


def resolve_source(source: str, local_files_only: bool | None = None) -> Path:
    """The local file of `source` (a hub file is downloaded, or found in the hub cache offline)."""
    if source.startswith("hf://"):
        rest = source.removeprefix("hf://").strip("/")
        parts = rest.split("/")
        if len(parts) < 2:
            raise AdapterError(400, f"source {source!r}: use hf://owner/repo[/file.safetensors]", code="invalid_source")
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or DEFAULT_HUB_FILE
        from huggingface_hub import hf_hub_download

        offline = local_files_only if local_files_only is not None else os.environ.get("HF_HUB_OFFLINE") == "1"
        try:
            return Path(hf_hub_download(repo, filename, local_files_only=offline))
        except Exception as exc:
            raise AdapterError(404, f"source {source!r}: {type(exc).__name__}: {exc}", code="adapter_source_not_found"
                               ) from None
    path = Path(source.removeprefix("pvc://") if source.startswith("pvc://") else source)
    if path.is_dir():
        path = path / DEFAULT_HUB_FILE
    if not path.is_file():
        raise AdapterError(404, f"source {source!r}: no such file", code="adapter_source_not_found")
    return path


def read_source(source: str, max_bytes: int, local_files_only: bool | None = None) -> bytes:
    """The bytes of `source`; larger than `max_bytes` is an `AdapterError` 413."""
    path = resolve_source(source, local_files_only)
    size = path.stat().st_size
    if size > max_bytes:
        raise AdapterError(413, f"source {source!r} is {size} bytes, over this worker's --max-adapter-bytes "
                           f"({max_bytes})", code="adapter_too_large")
    return path.read_bytes()
