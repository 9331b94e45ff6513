"""Issue 19: the router ↔ worker token rotates without a refused request.

Router and worker read *separate* token files here, as pods on different nodes see a Secret's
update at different times; the three-phase rotation (`old⏎new`, `new⏎old`, `new`,
`serving.worker_auth`) is applied to one file and then the other, and a request through the
router succeeds at every point. Unit checks of `TokenFile` cover the re-read rules.
"""

from __future__ import annotations

import os
import time

import httpx
import pytest

from stepfleet.serving.app import create_app as create_worker
from stepfleet.serving.engine import Engine, EngineConfig
from stepfleet.serving.router.app import create_app as create_router
from stepfleet.serving.router.config import RouterSettings, parse_config
from stepfleet.serving.runner import ModelRunner
from stepfleet.serving.settings import WorkerSettings
from stepfleet.serving.worker_auth import TokenError, TokenFile, parse_tokens

OLD, NEW = "token-old-0123456789", "token-new-9876543210"
BODY = {"prompt": "x", "size": "64x64", "num_inference_steps": 1}


def write(path, text: str) -> None:
    """Replace the file as a Secret volume does: a new inode swapped in."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_parse_tokens_takes_one_per_line():
    assert parse_tokens("a\n\n  b  \n") == ("a", "b")
    assert parse_tokens(" \n") == ()


def test_token_file_rereads_on_change_and_keeps_good_tokens_on_a_bad_file(tmp_path):
    path = tmp_path / "token"
    write(path, OLD)
    clock = Clock()
    tokens = TokenFile(str(path), check_s=1.0, clock=clock)
    assert tokens.send == OLD and tokens.accepts(f"Bearer {OLD}".encode())
    write(path, f"{NEW}\n{OLD}\n")
    assert tokens.send == OLD  # not looked at again within check_s
    clock.now = 1.5
    assert tokens.send == NEW
    assert tokens.accepts(f"Bearer {OLD}".encode()) and tokens.accepts(f"Bearer {NEW}".encode())
    assert not tokens.accepts(b"Bearer nope") and not tokens.accepts(b"")
    write(path, "")  # a half-written Secret: keep what worked
    clock.now = 3.0
    assert not tokens.refresh() and tokens.send == NEW
    with pytest.raises(TokenError):
        TokenFile(str(path))


def test_a_rotated_token_is_accepted_before_the_next_periodic_look(tmp_path):
    """The router may see the new file first: a mismatch makes the worker look at once."""
    path = tmp_path / "token"
    write(path, OLD)
    tokens = TokenFile(str(path), check_s=3600.0)
    write(path, NEW)
    assert tokens.accepts(f"Bearer {NEW}".encode()) and not tokens.accepts(f"Bearer {OLD}".encode())


def test_three_phase_rotation_through_the_router_refuses_nothing(tiny_backbone, serve_app, tmp_path):
    router_file, worker_file = tmp_path / "router-token", tmp_path / "worker-token"
    write(router_file, OLD)
    write(worker_file, OLD)
    engine = Engine(ModelRunner(tiny_backbone), EngineConfig(max_batch=2))
    worker = serve_app(create_worker(WorkerSettings(pool="w", default_steps=1, warmup=False,
                                                    worker_token_file=str(worker_file)), engine=engine))
    with worker as wurl:
        config = parse_config(f"version: 1\nservice: t\nmodel: tiny-sd\npools:\n- {{name: p, endpoints: [{wurl}], weight: 1.0}}\n")
        settings = RouterSettings(default_steps=1, load_poll_s=0.1, reload_s=0.1, worker_token_file=str(router_file))
        with serve_app(create_router(config, settings)) as base:

            def through_router() -> None:
                r = httpx.post(f"{base}/v1/images/generations", json=BODY, timeout=60)
                assert r.status_code == 200, r.text

            def direct(token: str) -> int:
                return httpx.post(f"{wurl}/v1/images/generations", json=BODY, timeout=60,
                                  headers={"Authorization": f"Bearer {token}"}).status_code

            through_router()
            # Each phase reaches one pod before the other (the order alternates between phases).
            for phase, files in ((f"{OLD}\n{NEW}\n", (worker_file, router_file)),
                                 (f"{NEW}\n{OLD}\n", (router_file, worker_file)),
                                 (f"{NEW}\n", (worker_file, router_file))):
                for path in files:
                    write(path, phase)
                    time.sleep(0.3)  # past the router's reload period
                    through_router()
            assert direct(NEW) == 200 and direct(OLD) == 401
