"""The thin process layer of `stepfleet up`: spawn, probe, scrape, signal. No decisions here.

Children run `python -m stepfleet.cli ...` with the same interpreter, in their own session
(so a Ctrl-C in the terminal reaches only `stepfleet up`, which then stops them in order:
router first, then workers, each given time to finish what it holds), with the fleet's state
directory as working directory (never the repository root, whose `operator/` folder could
shadow the standard library's `operator` module), and on Linux with a parent-death signal, so
even a `kill -9` of `stepfleet up` leaves no worker behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

#: prctl option: the signal a child gets when its parent dies (Linux).
_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:  # noqa: BLE001 - best effort (not Linux, no libc): the parent still stops its children
        pass


def spawn(args: Sequence[str], *, cwd: Path, log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `python -m stepfleet.cli ARGS...`, its output appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "stepfleet.cli", *args],
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )


def ask_to_stop(proc: subprocess.Popen) -> None:
    """SIGTERM: the worker and router finish in-flight requests, then exit."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass


def stop_all(procs: Sequence[subprocess.Popen], timeout_s: float) -> None:
    """SIGTERM every process, wait up to `timeout_s` in all, then SIGKILL what is left; reap all."""
    for proc in procs:
        ask_to_stop(proc)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
            pass


def is_ready(http: httpx.Client, base_url: str) -> bool:
    try:
        return http.get(base_url + "/readyz").status_code == 200
    except httpx.HTTPError:
        return False


def poll_alive(http: httpx.Client, base_url: str, timeout_s: float) -> str:
    """One liveness poll (`liveness.PollResult`): any HTTP answer is "answered", a timeout
    "silent" (a stopped process whose kernel still accepts the connection), no connection "refused"."""
    try:
        http.get(base_url + "/readyz", timeout=timeout_s)
    except httpx.TimeoutException:
        return "silent"
    except httpx.HTTPError:
        return "refused"
    return "answered"


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL (a stopped process acts on no other signal) and reap it."""
    if proc.poll() is None:
        try:
            proc.kill()
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def router_workers_ready(http: httpx.Client, base_url: str) -> int:
    """Workers the router itself counts as ready (0 when it does not answer)."""
    try:
        resp = http.get(base_url + "/readyz")
        if resp.status_code != 200:
            return 0
        return int(sum((resp.json().get("pools") or {}).values()))
    except (httpx.HTTPError, ValueError, TypeError, AttributeError):
        return 0


def scrape(http: httpx.Client, base_url: str) -> str | None:
    try:
        resp = http.get(base_url + "/metrics")
        return resp.text if resp.status_code == 200 else None
    except httpx.HTTPError:
        return None


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` in one step, so the router never reads half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
