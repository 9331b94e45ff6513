"""`make demo`: start a worker on tiny-sd, ask it for an image with the official `openai` client.

Runs a real worker process on loopback (the same `stepfleet worker` a pod runs), waits
for `/readyz`, generates one image through `openai.OpenAI(...).images.generate`, writes
it to disk and stops the worker gracefully.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f}s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo.png")
    ap.add_argument("--prompt", default="a lighthouse on a cliff at sunset, oil painting")
    ap.add_argument("--model", default="tiny-sd")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)

    from openai import OpenAI

    port = free_port()
    cmd = [sys.executable, "-m", "stepfleet.cli", "worker", "--model", args.model, "--port", str(port)]
    print("starting:", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="not-needed")
        t0 = time.perf_counter()
        result = client.images.generate(
            model=args.model,
            prompt=args.prompt,
            size="256x256",
            response_format="b64_json",
            extra_body={"num_inference_steps": args.steps, "seed": 42},
        )
        with open(args.out, "wb") as fh:
            fh.write(base64.b64decode(result.data[0].b64_json))
        print(f"wrote {args.out} ({time.perf_counter() - t0:.2f}s, prompt {args.prompt!r})")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
