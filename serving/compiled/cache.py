"""Persistent compile caches in one directory, so a new replica starts without compiling.

Each backend keeps its compiled artefacts somewhere of its own; pointed at one directory (a
PersistentVolumeClaim in a cluster, `spec.serving.compileCache`), the second replica of a
pool — and every restart — finds its graphs there:

- inductor's FX-graph and AOT-autograd caches and Triton's kernel cache (CPU and CUDA):
  `TORCHINDUCTOR_CACHE_DIR`, `TRITON_CACHE_DIR`, with the FX-graph cache switched on;
- XLA (TPU, and Neuron through torch-xla): `torch_xla.runtime.initialize_cache`;
- Neuron's compiler cache: `--cache_dir` in `NEURON_CC_FLAGS`.

Must run before the first compile (the worker calls it before loading the model).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def configure_compile_cache(directory: str | os.PathLike[str]) -> dict[str, str]:
    """Point every backend's compile cache under `directory`; returns what was set (for the log)."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    paths = {
        "TORCHINDUCTOR_CACHE_DIR": root / "inductor",
        "TRITON_CACHE_DIR": root / "triton",
    }
    done: dict[str, str] = {}
    for var, path in paths.items():
        path.mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(path)
        done[var] = str(path)
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    try:
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = True
    except Exception:  # pragma: no cover - a torch without inductor
        pass
    neuron = root / "neuron"
    flags = os.environ.get("NEURON_CC_FLAGS", "")
    if "--cache_dir" not in flags:
        os.environ["NEURON_CC_FLAGS"] = f"{flags} --cache_dir={neuron}".strip()
        done["NEURON_CC_FLAGS"] = os.environ["NEURON_CC_FLAGS"]
    try:  # only where torch-xla is installed (TPU, Neuron)
        import torch_xla.runtime as xr  # type: ignore[import-not-found]

        xr.initialize_cache(str(root / "xla"), readonly=False)
        done["xla"] = str(root / "xla")
    except ImportError:
        pass
    log.info("compile caches under %s", root)
    return done
