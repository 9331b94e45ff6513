"""A runner with no model: deterministic, fast, and able to fail or stall on request.

Used only for tests of the engine's *scheduling* (who runs when, cancellation, failures,
overload); numerical behaviour is tested against the real tiny model.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from PIL import Image

from stepfleet.serving.contracts import Decoded, Prepared


@dataclass
class FakeTensors:
    prompt: str
    steps: int
    n: int
    shape: tuple[int, int, int]
    done: int = 0
    trace: list[int] = field(default_factory=list)


class FakeRunner:
    device_type = "fake"  # not a CPU: auxiliary work runs on its own thread
    default_size = (256, 256)

    def __init__(self, step_s: float = 0.005, fail_prompt: str = "boom", fail_step_prompt: str = "crash") -> None:
        self.step_s = step_s
        self.fail_prompt = fail_prompt
        self.fail_step_prompt = fail_step_prompt
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        return (4, height // 8, width // 8)

    def request_shape(self, params) -> tuple[int, int, int]:
        return self.latent_shape(params.width, params.height)

    def prepare(self, params, seed):
        if params.prompt == self.fail_prompt:
            raise ValueError("cannot encode this prompt")
        shape = self.latent_shape(params.width, params.height)
        state = FakeTensors(params.prompt, params.num_inference_steps, params.n, shape)
        rows = params.n * (2 if params.guidance_scale > 1 else 1)
        return Prepared(state=state, shape=shape, unet_rows=rows, steps=params.num_inference_steps)

    def step(self, batch):
        self.gate.wait()
        if any(t.prompt == self.fail_step_prompt for t in batch):
            raise RuntimeError("bad tensor in batch")
        with self.lock:
            self.batches.append([t.prompt for t in batch])
        time.sleep(self.step_s)
        for t in batch:
            t.done += 1

    def decode(self, tensors, keep_latents=False):
        assert tensors.done == tensors.steps, "decoded before the last step"
        images = []
        for i in range(tensors.n):
            img = Image.new("RGB", (8, 8))
            img.info["label"] = f"{tensors.prompt}#{i}"
            images.append(img)
        return Decoded(images=images)


def labels(result) -> list[str]:
    """Which request and image index each returned image came from."""
    return [im.info["label"] for im in result.images]
