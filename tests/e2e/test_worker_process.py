"""`stepfleet worker` as a real process: start, serve, and shut down gracefully on SIGTERM."""

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.serving.conftest import free_port


@pytest.fixture
def worker_process():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "stepfleet.cli", "worker", "--model", "tiny-sd", "--port", str(port),
         "--pool", "e2e", "--max-batch", "2"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "worker never became ready"
        time.sleep(0.2)
    yield base, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_sigterm_finishes_running_requests_then_exits(worker_process):
    base, proc = worker_process
    body = {"prompt": "finish me", "size": "128x128", "num_inference_steps": 30}
    with cf.ThreadPoolExecutor(2) as pool:
        inflight = [pool.submit(httpx.post, f"{base}/v1/images/generations", json=body, timeout=120) for _ in range(2)]
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/v1/load").json()["running"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        responses = [f.result() for f in inflight]
    assert [r.status_code for r in responses] == [200, 200]
    assert all(len(r.json()["data"]) == 1 for r in responses)
    # uvicorn re-raises the captured SIGTERM after its clean shutdown, so the exit status says so.
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in proc.stdout.read()


def test_model_command_writes_a_loadable_pipeline(tmp_path):
    out = tmp_path / "tiny"
    subprocess.run([sys.executable, "-m", "stepfleet.cli", "model", "tiny-sd", "--out", str(out)], check=True,
                   capture_output=True)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.in_channels == 4
