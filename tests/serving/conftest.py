"""Serving fixtures: the tiny models (SD 1.x, SDXL) loaded through `from_pretrained`, and a loopback server helper."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


@pytest.fixture(scope="session")
def tiny_model():
    from stepfleet.serving.loading import load_model

    return load_model("tiny-sd", device="cpu")


@pytest.fixture(scope="session")
def tiny_sdxl():
    from stepfleet.serving.loading import load_model

    return load_model("tiny-sdxl", device="cpu")


@pytest.fixture(scope="session")
def sdxl_backbone(tiny_sdxl):
    from stepfleet.serving.backbones import load_backbone

    return load_backbone(tiny_sdxl)


@pytest.fixture(scope="session")
def sdxl_runner(sdxl_backbone):
    from stepfleet.serving.runner import ModelRunner

    return ModelRunner(sdxl_backbone)


@pytest.fixture(scope="session")
def tiny_backbone(tiny_model):
    from stepfleet.serving.backbones import load_backbone

    return load_backbone(tiny_model)


@pytest.fixture(scope="session")
def runner(tiny_backbone):
    from stepfleet.serving.runner import ModelRunner

    return ModelRunner(tiny_backbone)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(app, ready_path: str | None = "/readyz", timeout_s: float = 120.0) -> Iterator[str]:
    """Run `app` under a real uvicorn server on a free loopback port; yield its base URL."""
    import httpx
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    if ready_path:
        while httpx.get(base + ready_path).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("server not ready")
            time.sleep(0.05)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=60)


@pytest.fixture(scope="session")
def serve_app():
    """The `serve` context manager, as a fixture so test modules need not import conftest."""
    return serve
