"""Streamed images (issue 16): OpenAI's SSE events from the step engine, through the router.

One real worker (tiny-sd, edits on, previews installed by the app) behind a real router, both
on loopback; the official `openai` client reads the streams. Checks: the events are the SDK's
types and every image decodes; a streamed image equals the non-streamed one of the same seed;
the response fields; bad input is a 400 naming the field; a client that leaves mid-stream
leaves no work running on the worker and no slot taken on the router.
"""

from __future__ import annotations

import base64
import io
import socket
import time
from contextlib import ExitStack

import httpx
import numpy as np
import pytest
from PIL import Image

from stepfleet.serving.app import create_app as create_worker
from stepfleet.serving.edits.cache import TemplateCache
from stepfleet.serving.edits.extension import EditExtension
from stepfleet.serving.engine import Engine, EngineConfig
from stepfleet.serving.previews import partial_steps
from stepfleet.serving.router.app import create_app as create_router
from stepfleet.serving.router.config import RouterSettings, parse_config
from stepfleet.serving.runner import ModelRunner
from stepfleet.serving.settings import WorkerSettings

SIZE = 64
STEPS = 4


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def picture(seed: int = 0, size: int = SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def mask_png(size: int = SIZE) -> bytes:
    a = np.full((size, size), 255, dtype=np.uint8)
    a[8:40, 8:40] = 0  # the transparent square is the area to edit
    return png(Image.fromarray(np.dstack([np.zeros((size, size, 3), np.uint8), a]), "RGBA"))


def decoded(b64: str) -> np.ndarray:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG" and img.size == (SIZE, SIZE)
    return np.asarray(img.convert("RGB"))


@pytest.fixture(scope="module")
def fleet(tiny_backbone, serve_app):
    cache = TemplateCache(max_bytes=64 << 20)
    edits = EditExtension(tiny_backbone, cache)
    engine = Engine(ModelRunner(tiny_backbone, extensions=[edits]), EngineConfig(max_batch=4))
    settings = WorkerSettings(model="tiny-sd", pool="cpu", max_batch=4, default_steps=STEPS, warmup=False)
    with ExitStack() as stack:
        worker = stack.enter_context(serve_app(create_worker(settings, engine=engine, edits=edits)))
        config = parse_config(f"version: 1\nservice: t\nmodel: tiny-sd\npools:\n- {{name: cpu, endpoints: [{worker}], "
                              "weight: 1}\n")
        router_app = create_router(config, RouterSettings(default_steps=STEPS))
        router = stack.enter_context(serve_app(router_app))
        yield {"worker": worker, "router": router, "engine": engine, "router_app": router_app}
    edits.close()
    cache.close()


def client(base: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


def test_partial_steps_are_evenly_spaced_distinct_and_before_the_last():
    assert partial_steps(20, 2) == (7, 13)
    assert partial_steps(20, 3) == (5, 10, 15)
    assert partial_steps(20, 0) == ()
    assert partial_steps(2, 3) == (1,)
    assert partial_steps(1, 3) == ()


def test_openai_client_streams_a_generation_through_the_router(fleet):
    stream = client(fleet["router"]).images.generate(
        model="tiny-sd", prompt="a small red boat", size=f"{SIZE}x{SIZE}", stream=True, partial_images=2,
        extra_body={"seed": 7, "num_inference_steps": 6})
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for e in events:
        decoded(e.b64_json)
        assert (e.size, e.output_format, e.background, e.quality) == (f"{SIZE}x{SIZE}", "png", "opaque", "medium")
        assert e.created_at > 1_700_000_000
    usage = events[-1].usage
    assert usage.output_tokens == (SIZE // 8) ** 2 * 6
    assert usage.input_tokens == usage.input_tokens_details.text_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_a_streamed_image_equals_the_non_streamed_one(fleet):
    body = {"prompt": "a lighthouse", "size": f"{SIZE}x{SIZE}", "seed": 3, "num_inference_steps": 5}
    plain = httpx.post(f"{fleet['router']}/v1/images/generations", json=body, timeout=120)
    assert plain.status_code == 200, plain.text
    events = list(client(fleet["router"]).images.generate(**{k: v for k, v in body.items() if k in ("prompt", "size")},
                                                          stream=True, partial_images=3,
                                                          extra_body={"seed": 3, "num_inference_steps": 5}))
    assert [e.type for e in events][-1] == "image_generation.completed" and len(events) == 4
    assert np.array_equal(decoded(events[-1].b64_json), decoded(plain.json()["data"][0]["b64_json"]))


def test_openai_client_streams_an_edit_through_the_router(fleet):
    stream = client(fleet["router"]).images.edit(
        image=("photo.png", png(picture(1)), "image/png"), mask=("mask.png", mask_png(), "image/png"),
        prompt="a red hat", size=f"{SIZE}x{SIZE}", stream=True, partial_images=1,
        extra_body={"seed": 2, "num_inference_steps": 4})
    events = list(stream)
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    for e in events:
        decoded(e.b64_json)
    assert events[-1].usage.input_tokens_details.image_tokens == (SIZE // 8) ** 2


def test_a_non_streamed_generation_returns_every_response_field(fleet):
    from openai.types import ImagesResponse

    r = client(fleet["router"]).images.generate(
        model="tiny-sd", prompt="a cat", size=f"{SIZE}x{SIZE}", quality="low", background="opaque",
        moderation="low", user="someone", output_format="jpeg", output_compression=50, n=2,
        extra_body={"seed": 1})
    assert isinstance(r, ImagesResponse)
    assert r.created > 1_700_000_000 and len(r.data) == 2
    assert (r.size, r.quality, r.background, r.output_format) == (f"{SIZE}x{SIZE}", "low", "opaque", "jpeg")
    assert Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).format == "JPEG"
    steps = max(1, round(STEPS * 0.5))  # quality low: half the worker's --default-steps
    assert r.model_extra["stepfleet"]["steps"] == steps
    assert r.usage.output_tokens == (SIZE // 8) ** 2 * steps * 2
    high = httpx.post(f"{fleet['router']}/v1/images/generations",
                      json={"prompt": "a cat", "size": f"{SIZE}x{SIZE}", "quality": "high"}, timeout=120).json()
    assert (high["quality"], high["stepfleet"]["steps"]) == ("high", STEPS * 2)
    auto = httpx.post(f"{fleet['router']}/v1/images/generations", json={"prompt": "a cat", "size": "auto"},
                      timeout=120).json()
    assert (auto["quality"], auto["size"], auto["stepfleet"]["steps"]) == ("medium", "256x256", STEPS)  # tiny-sd's own size


@pytest.mark.parametrize("body,param", [
    ({"stream": True, "partial_images": 4}, "partial_images"),
    ({"stream": True, "partial_images": -1}, "partial_images"),
    ({"output_compression": 101}, "output_compression"),
    ({"stream": True, "n": 2}, "n"),
    ({"background": "transparent"}, "background"),
    ({"quality": "ultra"}, "quality"),
    ({"moderation": "strict"}, "moderation"),
])
def test_bad_generation_fields_are_400s_naming_the_field(fleet, body, param):
    for base in (fleet["router"], fleet["worker"]):
        r = httpx.post(f"{base}/v1/images/generations", json={"prompt": "x", **body}, timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param


def _edit(base: str, files: list, **data) -> httpx.Response:
    return httpx.post(f"{base}/v1/images/edits", files=files, data={"prompt": "x", **data}, timeout=120)


def test_bad_edit_inputs_are_400s_naming_the_field(fleet):
    good = ("a.png", png(picture()), "image/png")
    for base in (fleet["router"], fleet["worker"]):
        r = _edit(base, [("image[]", good)] * 17)
        assert r.status_code == 400 and r.json()["error"]["param"] == "image[]", r.text
        r = _edit(base, [("image", good), ("mask", ("m.png", mask_png(SIZE * 2), "image/png"))])
        assert r.status_code == 400 and r.json()["error"]["param"] == "mask", r.text
        r = _edit(base, [("image", ("a.png", b"not an image", "image/png"))])
        assert r.status_code == 400 and r.json()["error"]["param"] == "image", r.text
        r = _edit(base, [("image[]", good), ("image[]", ("b.png", b"nope", "image/png"))])
        assert r.status_code == 400 and r.json()["error"]["param"] == "image[]", r.text
        r = _edit(base, [("image", good)], stream="true", partial_images="5")
        assert r.status_code == 400 and r.json()["error"]["param"] == "partial_images", r.text


def test_several_images_edit_the_first_with_its_mask(fleet):
    files = [("image[]", ("a.png", png(picture(1)), "image/png")), ("image[]", ("b.png", png(picture(2)), "image/png")),
             ("mask", ("m.png", mask_png(), "image/png"))]
    r = _edit(fleet["router"], files, seed="5", input_fidelity="high")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["input_tokens_details"]["image_tokens"] == 2 * (SIZE // 8) ** 2
    out = decoded(body["data"][0]["b64_json"])
    first = np.asarray(picture(1))
    assert np.array_equal(out[48:, 48:], first[48:, 48:])  # outside the mask: the first image's pixels


def _running(engine) -> float:
    load = engine.load()
    return load["running"] + load["waiting"] + load["paused"]


def test_a_client_that_leaves_mid_stream_leaves_no_work_running(fleet):
    """Through the router: read the stream's head and one event, then hang up; the worker cancels
    the request at its next step and the router gives the worker's slot back."""
    engine = fleet["engine"]
    host, port = fleet["router"].removeprefix("http://").split(":")
    body = (b'{"prompt":"a long one","size":"64x64","stream":true,"partial_images":3,"seed":1,'
            b'"num_inference_steps":200}')
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while b"\r\n\r\n" not in got:
        got += sock.recv(65536)
    assert got.startswith(b"HTTP/1.1 200") and b"text/event-stream" in got
    deadline = time.monotonic() + 60
    while _running(engine) == 0:  # it has started stepping
        assert time.monotonic() < deadline
        time.sleep(0.02)
    sock.close()
    deadline = time.monotonic() + 30
    while _running(engine) > 0:
        assert time.monotonic() < deadline, engine.load()
        time.sleep(0.05)
    pools = fleet["router_app"].state.router.fleet.pools
    deadline = time.monotonic() + 10
    while sum(e.inflight for p in pools for e in p.endpoints) > 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_openai_client_makes_variations_through_the_router(fleet):
    r = client(fleet["router"]).images.create_variation(
        image=("photo.png", png(picture(3)), "image/png"), n=2, size=f"{SIZE}x{SIZE}", response_format="b64_json",
        extra_body={"seed": 4, "num_inference_steps": 4})
    assert len(r.data) == 2 and r.size == f"{SIZE}x{SIZE}"
    a, b = (decoded(d.b64_json) for d in r.data)
    assert not np.array_equal(a, np.asarray(picture(3)))  # it changed
    weak = httpx.post(f"{fleet['router']}/v1/images/variations", timeout=120,
                      files={"image": ("p.png", png(picture(3)), "image/png")}, data={"strength": "1.5"})
    assert weak.status_code == 400 and weak.json()["error"]["param"] == "strength"
