"""`stepfleet up` as a user runs it: a real fleet on loopback, the `openai` client, a killed worker, Ctrl-C.

One test, in order (each step needs the previous one's fleet, and a fleet costs ~20 s of
model loading on two cores): the fleet comes up and announces its URL; the official
`openai` client generates and edits an image through the router; a worker killed with
SIGKILL is reported, restarted, and serves again; SIGINT stops everything with exit code 0
and no child process left.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from PIL import Image

from stepfleet.operator.local.demo import wait_ready


def _fleet(state_dir: Path) -> dict:
    return json.loads((state_dir / "fleet.json").read_text())


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait(what: str, predicate, timeout_s: float, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}; stepfleet up said:\n{log.read_text()[-3000:]}")


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def fleet_up(tmp_path):
    state_dir = tmp_path / "fleet"
    log = tmp_path / "up.log"
    cmd = [sys.executable, "-m", "stepfleet.cli", "up", "--pools", "cpu:0.10", "--port", "0", "--interval-s", "1",
           "--state-dir", str(state_dir), "--stop-timeout-s", "10", "--max-workers", "1", "--worker-arg=--max-batch=2"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen: set[int] = set()
    try:
        yield proc, state_dir, log, seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        try:
            seen |= {w["pid"] for w in _fleet(state_dir)["workers"]} | {_fleet(state_dir)["router"]["pid"]}
        except (OSError, ValueError, KeyError):
            pass
        for pid in seen:
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_up_serves_survives_a_killed_worker_and_stops_cleanly(fleet_up):
    from openai import OpenAI

    proc, state_dir, log, seen = fleet_up
    url = wait_ready(state_dir, proc, timeout_s=120)
    assert f"ready: {url}/v1" in _wait("the ready line", lambda: "ready: " in log.read_text() and log.read_text(), 10, log)
    client = OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=60)

    gen = client.images.generate(model="mini-sd", prompt="a red bag on a white background", size="64x64", response_format="b64_json",
                                 extra_body={"num_inference_steps": 3, "seed": 1})
    assert Image.open(io.BytesIO(base64.b64decode(gen.data[0].b64_json))).size == (64, 64)

    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # fully transparent: the area to edit
    edit = client.images.edit(image=("base.png", _png(Image.new("RGB", (64, 64), "gray")), "image/png"),
                              mask=("mask.png", _png(mask), "image/png"), prompt="a blue ball", size="64x64",
                              response_format="b64_json", extra_body={"num_inference_steps": 3, "seed": 1})
    assert Image.open(io.BytesIO(base64.b64decode(edit.data[0].b64_json))).size == (64, 64)

    state = _fleet(state_dir)
    (worker,) = state["workers"]
    seen |= {worker["pid"], state["router"]["pid"]}
    os.kill(worker["pid"], signal.SIGKILL)

    def restarted():
        now = _fleet(state_dir)["workers"]
        return len(now) == 1 and now[0]["name"] == worker["name"] and now[0]["pid"] != worker["pid"] \
            and now[0]["phase"] == "ready" and now[0]

    again = _wait("the killed worker to be restarted and ready", restarted, 90, log)
    seen.add(again["pid"])
    said = log.read_text()
    assert f"worker {worker['name']} (pid {worker['pid']}) died: killed by signal 9" in said
    assert f"worker {worker['name']} was killed by signal 9; restarting (restart 1)" in said
    wait_ready(state_dir, proc, timeout_s=30)  # the router sees the new worker
    gen = client.images.generate(model="mini-sd", prompt="after the restart", size="64x64",
                                 response_format="b64_json", extra_body={"num_inference_steps": 3})
    assert gen.data[0].b64_json

    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=40) == 0
    assert "stopped" in log.read_text().splitlines()[-1]
    left = sorted(pid for pid in seen if _alive(pid))
    assert left == [], f"processes left after SIGINT: {left}"
