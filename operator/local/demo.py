"""`make demo`: start `stepfleet up`, ask its router for an image with the official `openai` client.

Runs the local fleet as a user would (`stepfleet up` in the background: router, one worker of
the trained built-in `mini-sd`, control loop), waits until the router has a ready worker, generates one image
through `openai.OpenAI(base_url=ROUTER/v1).images.generate`, writes it to disk, and stops the
fleet with SIGINT, as Ctrl-C would.
"""

from __future__ import annotations

import argparse
import base64
import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def fleet_url(state_dir: Path) -> str | None:
    """The router URL from `fleet.json`, once `stepfleet up` has written it."""
    try:
        return json.loads((state_dir / "fleet.json").read_text())["url"]
    except (OSError, ValueError, KeyError):
        return None


def wait_ready(state_dir: Path, proc: subprocess.Popen, timeout_s: float = 300.0) -> str:
    """Wait until the fleet's router counts a ready worker; return the router URL."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"stepfleet up exited with code {proc.returncode}")
        url = fleet_url(state_dir)
        if url:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
                    if sum(json.loads(resp.read()).get("pools", {}).values()) > 0:
                        return url
            except (OSError, ValueError):
                pass
        time.sleep(0.3)
    raise TimeoutError(f"the fleet was not ready after {timeout_s:.0f}s (logs in {state_dir / 'logs'})")


def stop(proc: subprocess.Popen, timeout_s: float = 60.0) -> int:
    """SIGINT (Ctrl-C) and wait; SIGKILL if it does not stop in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo.png")
    ap.add_argument("--prompt", default="a red ankle boot on a blue background")
    ap.add_argument("--model", default="mini-sd")
    ap.add_argument("--size", default=None, help="WxH (default: the model's native size, 64x64 for mini-sd)")
    ap.add_argument("--guidance-scale", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--port", type=int, default=0, help="router port (0: any free port)")
    args = ap.parse_args(argv)

    from openai import OpenAI

    out = Path(args.out).resolve()
    with tempfile.TemporaryDirectory(prefix="stepfleet-demo-") as tmp:
        state_dir = Path(tmp)
        cmd = [sys.executable, "-m", "stepfleet.cli", "up", "--model", args.model, "--port", str(args.port),
               "--state-dir", str(state_dir)]
        print("starting:", " ".join(cmd), flush=True)
        # cwd outside the repository: its `operator/` folder must not shadow the stdlib module.
        proc = subprocess.Popen(cmd, cwd=state_dir)
        try:
            url = wait_ready(state_dir, proc)
            client = OpenAI(base_url=f"{url}/v1", api_key="not-needed")
            t0 = time.perf_counter()
            result = client.images.generate(
                model=args.model,
                prompt=args.prompt,
                response_format="b64_json",
                extra_body={"num_inference_steps": args.steps, "seed": 42, "guidance_scale": args.guidance_scale},
                **({"size": args.size} if args.size else {}),
            )
            out.write_bytes(base64.b64decode(result.data[0].b64_json))
            print(f"wrote {out} via {url} ({time.perf_counter() - t0:.2f}s, prompt {args.prompt!r})", flush=True)
        finally:
            code = stop(proc)
        if code != 0:
            print(f"stepfleet up exited with code {code}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
