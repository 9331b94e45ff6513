"""`stepfleet operator` as a real process: kubeconfig login, liveness and metrics endpoints, reconcile, clean exit."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys

import aiohttp
import pytest
from emulator import eventually
from k8s_helpers import example
from operator_harness import DFS, NS, condition, create, emulator, url
from test_kubectl import _kubeconfig

from stepfleet.operator.loop import metrics as loop_metrics

pytestmark = pytest.mark.timeout(90)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_operator_command_reconciles_and_serves_liveness_and_metrics(tmp_path):
    async with emulator() as em:
        port, metrics_port = _free_port(), _free_port()
        env = {**os.environ, "KUBECONFIG": str(_kubeconfig(tmp_path, url(em)))}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "stepfleet.cli", "operator", "--namespace", NS,
            "--liveness", f"http://127.0.0.1:{port}/healthz", "--retry-backoff", "0.5",
            "--metrics", f"http://127.0.0.1:{metrics_port}/metrics",
            env=env, cwd=tmp_path,  # cwd outside the repo: its operator/ must not shadow the stdlib
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with aiohttp.ClientSession() as session:

                async def alive() -> bool:
                    try:
                        async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                            return resp.status == 200
                    except aiohttp.ClientError:
                        return False

                for _ in range(200):  # the process imports kopf and logs in first
                    if await alive():
                        break
                    assert proc.returncode is None, "operator exited early"
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError("liveness endpoint never answered")

                # the control loop's gauges, on their own port (the chart's `metrics`)
                async def scraped() -> str | None:
                    try:
                        async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
                            return await resp.text() if resp.status == 200 else None
                    except aiohttp.ClientError:
                        return None

                for _ in range(100):  # the server starts with kopf's startup handlers
                    if text := await scraped():
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError("metrics endpoint never answered")
                for name in (loop_metrics.MODE, loop_metrics.COST, loop_metrics.POOL_REPLICAS,
                             loop_metrics.POOL_CAPACITY_SHORT):
                    assert f"# TYPE {name} gauge" in text

            await create(em, example("cpu-fleet.yaml"))
            obj = await eventually(
                lambda: (lambda o: o if condition(o, "Ready") else None)(em.fetch(DFS, NS, "tiny")), timeout=20
            )
            assert obj["status"]["observedGeneration"] == 1
            assert em.fetch("apps/v1/deployments", NS, "tiny-ondemand") is not None
        except BaseException:
            proc.send_signal(signal.SIGTERM)
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
            print(out.decode()[-6000:])
            raise
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, out.decode()[-3000:]
