"""Take docs/images/playground.png: the playground after a streamed generation on a real local fleet.

Runs `stepfleet up` (router, one mini-sd worker per pool, the real control loop) on loopback,
waits for the loop's first decisions to reach the router, drives Debian's Chromium through
Playwright to stream one generation with partial images, and saves a screenshot. Every
number on the picture is real: the decisions and their reasons are the loop's own.

    .venv/bin/python scripts/playground_screenshot.py [--out docs/images/playground.png]
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/images/playground.png")
    ap.add_argument("--model", default="mini-sd")
    ap.add_argument("--prompt", default="a red ankle boot on a blue background")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    state = Path(tempfile.mkdtemp(prefix="stepfleet-playground-"))
    up = subprocess.Popen([sys.executable, "-m", "stepfleet.cli", "up", "--model", args.model, "--port", str(port),
                           "--pools", "cpu:0.10,spot:0.04", "--interval-s", "3", "--state-dir", str(state)])
    try:
        wait_for("ready workers", lambda: all(
            p["ready"] >= 1 for p in httpx.get(f"{base}/v1/fleet", timeout=5).json()["pools"]) and len(
            httpx.get(f"{base}/v1/fleet", timeout=5).json()["pools"]) == 2, 300)
        wait_for("two control decisions", lambda: len(httpx.get(f"{base}/v1/fleet", timeout=5).json()["decisions"]) >= 2,
                 120)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1440, "height": 860})
            page.goto(f"{base}/")
            page.wait_for_selector("#pools tr[data-pool]")
            page.fill("#prompt", args.prompt)
            page.fill("#steps", str(args.steps))
            page.fill("#seed", str(args.seed))
            page.select_option("#partial_images", "3")
            page.click("#generate")
            page.wait_for_selector("#final img[data-final]", timeout=120_000)
            page.wait_for_timeout(2500)  # one more fleet poll after the generation
            log = page.evaluate("window.playground")
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
        print(json.dumps({"out": args.out, "events": log["events"]}, indent=1))
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
