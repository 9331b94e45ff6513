"""The router's playground page in a real browser (issue 16): Debian's Chromium, driven by Playwright.

A real router and a real worker (tiny-sd) on loopback; the router's config carries a
`control` section as `stepfleet up` writes it. The test types a prompt, watches at least one
partial image appear before the final image, and checks the fleet panel (pool, ready
workers, weight, mode, a decision's reason). Skipped only where Chromium is not installed
(`scripts/fetch-tools.sh` installs it).
"""

from __future__ import annotations

import os
import textwrap
import time
from contextlib import ExitStack

import httpx
import pytest

from stepfleet.serving.app import create_app as create_worker
from stepfleet.serving.engine import Engine, EngineConfig
from stepfleet.serving.router.app import create_app as create_router
from stepfleet.serving.router.config import RouterSettings, parse_config
from stepfleet.serving.runner import ModelRunner
from stepfleet.serving.settings import WorkerSettings

CHROMIUM = "/usr/bin/chromium"
#: Without the networking flags Chromium keeps trying hosts outside this machine (TOOLING.md).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
REASON = "cost mode: 0.40 rps planned (+20% headroom), cheapest per image first"

pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason="Debian's chromium is not installed")


@pytest.fixture(scope="module")
def fleet(tiny_backbone, serve_app):
    engine = Engine(ModelRunner(tiny_backbone), EngineConfig(max_batch=4))
    settings = WorkerSettings(model="tiny-sd", pool="cpu", max_batch=4, default_steps=12, warmup=False)
    with ExitStack() as stack:
        worker = stack.enter_context(serve_app(create_worker(settings, engine=engine)))
        config = parse_config(textwrap.dedent(f"""\
            version: 1
            service: demo
            model: tiny-sd
            pools:
            - {{name: cpu, endpoints: [{worker}], weight: 1, accelerator: cpu, pricePerHour: 0.2}}
            control:
              mode: cost
              decisions:
              - {{at: 1764500000, mode: cost, replicas: {{cpu: 1}}, weights: {{cpu: 1.0}}, reasons: ["{REASON}"]}}
            """))
        yield stack.enter_context(serve_app(create_router(config, RouterSettings(default_steps=12))))


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def test_the_fleet_endpoint_shows_pools_and_the_loops_decisions(fleet):
    body = httpx.get(f"{fleet}/v1/fleet", timeout=10).json()
    assert body["mode"] == "cost" and body["service"] == "demo" and body["model"] == "tiny-sd"
    (pool,) = body["pools"]
    assert (pool["name"], pool["ready"], pool["workers"], pool["share"], pool["accelerator"]) == ("cpu", 1, 1, 1.0, "cpu")
    assert body["decisions"][0]["reasons"] == [REASON]
    page = httpx.get(f"{fleet}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert httpx.get(f"{fleet}/playground/playground.js", timeout=10).status_code == 200


def test_a_streamed_generation_in_the_browser_shows_partials_before_the_image(fleet, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(f"{fleet}/")
        # The fleet panel: the pool, its ready worker and weight, the mode, the loop's reason.
        page.wait_for_selector("#pools tr[data-pool=cpu]", timeout=20_000)
        row = page.inner_text("#pools tr[data-pool=cpu]")
        assert "1/1" in row and "100 %" in row, row
        assert page.inner_text("#mode") == "mode cost"
        assert REASON in page.inner_text("#decisions")

        page.fill("#prompt", "a red boot on a blue background")
        page.select_option("#size", "64x64")
        page.fill("#steps", "12")
        page.fill("#seed", "3")
        page.select_option("#partial_images", "2")
        started = time.monotonic()
        page.click("#generate")
        page.wait_for_selector("#final img[data-final]", timeout=120_000)
        log = page.evaluate("window.playground")
        types = [e["type"] for e in log["events"]]
        assert types == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], types
        assert log["partialsShownAtFinal"] == 2  # both partials were on the page before the image came
        assert log["events"][0]["t"] < log["events"][-1]["t"]
        assert page.locator("#partials img").count() == 2
        assert page.inner_text("#status") == "done"
        assert "final image" in page.inner_text("#timing")
        natural = page.evaluate("document.querySelector('#final img[data-final]').naturalWidth")
        assert natural == 64, natural  # a decoded 64x64 PNG
        assert time.monotonic() - started < 120
        assert not errors, errors
    finally:
        page.close()
