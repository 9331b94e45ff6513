"""Issue 19, finding 2, for `stepfleet up` with real processes: a worker stopped with SIGSTOP
is found hung by the router's rule (polls unanswered within a timeout), killed, restarted under
its name, counted in fleet.json, and serves again. Before, the supervisor only noticed exits:
a stopped worker kept its place and its traffic for ever.

The pure rule is tested in tests/operator/test_local_liveness.py; this is the slow, whole path.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest

from stepfleet.operator.local.demo import wait_ready
from tests.e2e.test_local_fleet import _alive, _fleet, _wait


@pytest.mark.slow  # ~40 s on two cores: two model loads (the worker and its replacement)
def test_up_restarts_a_stopped_worker_and_counts_it(tmp_path):
    state_dir, log = tmp_path / "fleet", tmp_path / "up.log"
    cmd = [sys.executable, "-m", "stepfleet.cli", "up", "--pools", "cpu:0.10", "--port", "0", "--interval-s", "1",
           "--state-dir", str(state_dir), "--stop-timeout-s", "5", "--max-workers", "1",
           "--liveness-poll-s", "0.3", "--liveness-timeout-s", "0.5", "--hang-polls", "2"]
    seen: set[int] = set()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = wait_ready(state_dir, proc, timeout_s=120)
        state = _fleet(state_dir)
        (worker,) = state["workers"]
        seen |= {worker["pid"], state["router"]["pid"]}
        assert state["hungRestarts"] == 0 and worker["hangs"] == 0
        os.kill(worker["pid"], signal.SIGSTOP)

        def replaced():
            now = _fleet(state_dir)
            (w,) = now["workers"] or [None]
            return w and w["pid"] != worker["pid"] and w["phase"] == "ready" and now

        after = _wait("the stopped worker to be replaced and ready", replaced, 90, log)
        (again,) = after["workers"]
        seen.add(again["pid"])
        assert again["name"] == worker["name"] and again["hangs"] == 1 and after["hungRestarts"] == 1
        assert not _alive(worker["pid"])  # killed, not left stopped
        said = log.read_text()
        assert f"worker {worker['name']} (pid {worker['pid']}) answered none of 2 liveness polls" in said
        assert f"worker {worker['name']} was hung (answered no liveness poll) and was killed; restarting" in said
        wait_ready(state_dir, proc, timeout_s=30)
        reply = httpx.post(f"{url}/v1/images/generations", timeout=60,
                           json={"prompt": "after the hang", "size": "64x64", "num_inference_steps": 2})
        assert reply.status_code == 200, reply.text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in seen:
            if pid and _alive(pid):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
