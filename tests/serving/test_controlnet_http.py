"""ControlNet over HTTP: a real worker (tiny-sd + tiny-controlnet) behind a real router, on loopback.

`GET /v1/controlnets`; the `controlnet` field on generations (the `openai` client's `extra_body`)
and on edits (multipart JSON text with a `controlnet_image[]` part, and the JSON edit body);
`preprocess: "canny"` equals sending OpenCV's edges yourself; a control image of another size
with the same aspect ratio equals sending it pre-resized (the documented rule); and every bad
input is a 4xx JSON error naming the field, through the router and on the worker.
"""

from __future__ import annotations

import base64
import io
from contextlib import ExitStack

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from stepfleet.serving.app import create_app as create_worker
from stepfleet.serving.edits.cache import TemplateCache
from stepfleet.serving.edits.extension import EditExtension
from stepfleet.serving.engine import Engine, EngineConfig
from stepfleet.serving.router.app import create_app as create_router
from stepfleet.serving.router.config import RouterSettings, parse_config
from stepfleet.serving.runner import ModelRunner
from stepfleet.serving.settings import WorkerSettings

SIZE = 64
STEPS = 2


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def b64(img: Image.Image) -> str:
    return base64.b64encode(png(img)).decode()


def edges(size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    im = Image.new("RGB", size)
    w, h = size
    ImageDraw.Draw(im).rectangle([w // 4, h // 4, 3 * w // 4, 3 * h // 4], outline=(255, 255, 255), width=2)
    return im


def photo() -> Image.Image:
    """A "photo": a bright disc on a gradient, whose edges canny finds."""
    x = np.linspace(0, 80, SIZE, dtype=np.float32)
    arr = np.stack([np.add.outer(x, x)] * 3, axis=2).astype(np.uint8)
    im = Image.fromarray(arr)
    ImageDraw.Draw(im).ellipse([16, 12, 48, 52], fill=(230, 200, 40))
    return im


def decoded(body: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).convert("RGB"))


@pytest.fixture(scope="module")
def fleet(tiny_backbone, serve_app):
    from stepfleet.serving.controlnet.extension import ControlNetExtension
    from stepfleet.serving.controlnet.registry import ControlNetRegistry
    from stepfleet.serving.controlnet.spec import parse_registry

    cache = TemplateCache(max_bytes=64 << 20)
    edits = EditExtension(tiny_backbone, cache)
    registry = ControlNetRegistry.load(parse_registry("edges=tiny-controlnet:canny,lines=tiny-controlnet:scribble"),
                                       tiny_backbone.denoiser)
    control = ControlNetExtension(tiny_backbone, registry)
    engine = Engine(ModelRunner(tiny_backbone, extensions=[edits, control]), EngineConfig(max_batch=4))
    settings = WorkerSettings(model="tiny-sd", pool="cpu", max_batch=4, default_steps=STEPS, warmup=False,
                              max_controlnets=2)
    with ExitStack() as stack:
        worker = stack.enter_context(serve_app(create_worker(settings, engine=engine, edits=edits)))
        config = parse_config(f"version: 1\nservice: t\nmodel: tiny-sd\npools:\n- {{name: cpu, endpoints: [{worker}], "
                              "weight: 1}\n")
        router = stack.enter_context(serve_app(create_router(config, RouterSettings(default_steps=STEPS))))
        yield {"worker": worker, "router": router, "control": control}
    edits.close()
    cache.close()


def generate(base: str, controlnet: list | None = None, **extra) -> httpx.Response:
    body = {"prompt": "a red cat", "size": f"{SIZE}x{SIZE}", "seed": 3, **extra}
    if controlnet is not None:
        body["controlnet"] = controlnet
    return httpx.post(f"{base}/v1/images/generations", json=body, timeout=120)


def test_controlnets_are_listed_by_worker_and_router(fleet):
    for base in (fleet["router"], fleet["worker"]):
        r = httpx.get(f"{base}/v1/controlnets", timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert [(d["id"], d["kind"]) for d in body["data"]] == [("edges", "canny"), ("lines", "scribble")]
        assert body["max_per_request"] == 2 and body["placement"] == "inline"


def test_openai_client_generates_with_a_controlnet_through_the_router(fleet):
    from openai import OpenAI

    client = OpenAI(base_url=f"{fleet['router']}/v1", api_key="unused", max_retries=0, timeout=120)
    runs = fleet["control"].stats["runs"]
    common = dict(model="tiny-sd", prompt="a red cat", size=f"{SIZE}x{SIZE}", response_format="b64_json")
    controlled = client.images.generate(**common, extra_body={"seed": 3, "controlnet": [
        {"name": "edges", "image": b64(edges()), "conditioning_scale": 0.9, "guidance_end": 0.5}]})
    plain = client.images.generate(**common, extra_body={"seed": 3})
    assert fleet["control"].stats["runs"] == runs + 1  # one of two steps inside the window
    a = np.asarray(Image.open(io.BytesIO(base64.b64decode(controlled.data[0].b64_json))), dtype=np.int16)
    b = np.asarray(Image.open(io.BytesIO(base64.b64decode(plain.data[0].b64_json))), dtype=np.int16)
    assert np.abs(a - b).mean() > 1.0  # control changed the image


def test_canny_preprocessing_equals_sending_opencv_edges(fleet):
    import cv2

    base = fleet["worker"]
    ours = generate(base, [{"name": "edges", "image": b64(photo()), "preprocess": "canny", "low": 50, "high": 150}])
    edges_img = Image.fromarray(np.repeat(cv2.Canny(np.asarray(photo()), 50, 150)[:, :, None], 3, axis=2))
    assert edges_img.getextrema()[0][1] == 255  # canny found edges
    theirs = generate(base, [{"name": "edges", "image": b64(edges_img)}])
    assert ours.status_code == theirs.status_code == 200, ours.text
    assert np.array_equal(decoded(ours.json()), decoded(theirs.json()))


def test_a_bigger_control_image_of_the_same_aspect_is_resized(fleet):
    base = fleet["worker"]
    big = edges((2 * SIZE, 2 * SIZE))
    a = generate(base, [{"name": "edges", "image": b64(big)}])
    b = generate(base, [{"name": "edges", "image": b64(big.resize((SIZE, SIZE), Image.Resampling.LANCZOS))}])
    assert a.status_code == b.status_code == 200, a.text
    assert np.array_equal(decoded(a.json()), decoded(b.json()))


def test_edits_take_controls_as_form_parts_and_in_json(fleet):
    import json

    base = fleet["router"]
    files = [("image", ("a.png", png(photo()), "image/png")),
             ("controlnet_image[]", ("c.png", png(edges()), "image/png"))]
    data = {"prompt": "a hat", "seed": "2", "controlnet": json.dumps([{"name": "edges", "conditioning_scale": 1.5}])}
    r = httpx.post(f"{base}/v1/images/edits", files=files, data=data, timeout=120)
    assert r.status_code == 200, r.text
    plain = httpx.post(f"{base}/v1/images/edits", files=files[:1], data={"prompt": "a hat", "seed": "2"}, timeout=120)
    assert plain.status_code == 200, plain.text
    assert np.abs(decoded(r.json()).astype(int) - decoded(plain.json()).astype(int)).mean() > 1.0
    inline = {"prompt": "a hat", "seed": 2, "images": [{"image_url": "data:image/png;base64," + b64(photo())}],
              "controlnet": [{"name": "edges", "image": b64(edges()), "conditioning_scale": 1.5}]}
    j = httpx.post(f"{base}/v1/images/edits", json=inline, timeout=120)
    assert j.status_code == 200, j.text
    assert np.array_equal(decoded(j.json()), decoded(r.json()))  # the same edit, either way


BAD = [
    ([{"name": "depth", "image": "x"}], 404, "controlnet[0].name"),
    ([{"name": "edges", "image": None}], 400, "controlnet[0].image"),
    ([{"name": "edges", "image": "not base64!!"}], 400, "controlnet[0].image"),
    ([{"name": "edges", "image": base64.b64encode(b"not an image").decode()}], 400, "controlnet[0].image"),
    ([{"name": "edges", "image": "WIDE"}], 400, "controlnet[0].image"),
    ([{"name": "edges", "image": "OK", "guidance_start": 0.8, "guidance_end": 0.2}], 400,
     "controlnet[0].guidance_start"),
    ([{"name": "edges", "image": "OK"}] * 3, 400, "controlnet"),
    ([{"name": "edges", "image": "OK", "preprocess": "canny", "low": 200, "high": 100}], 400, "controlnet[0].low"),
    ([{"name": "edges", "image": "OK", "preprocess": "depth"}], 400, "controlnet"),
    ([{"name": "edges", "image": "OK", "conditioning_scale": "high"}], 400, "controlnet"),
    ([{"name": "edges", "image": "OK", "colour": 1}], 400, "controlnet"),
    ({"name": "edges"}, 400, "controlnet"),
]


@pytest.mark.parametrize(("controlnet", "status", "param"), BAD)
def test_bad_controls_are_4xx_naming_the_field(fleet, controlnet, status, param):
    subst = {"OK": b64(edges()), "WIDE": b64(edges((2 * SIZE, SIZE)))}
    if isinstance(controlnet, list):
        controlnet = [{k: subst.get(v, v) if isinstance(v, str) else v for k, v in c.items()} for c in controlnet]
    for base in (fleet["router"], fleet["worker"]):
        r = generate(base, controlnet)
        assert r.status_code == status, r.text
        assert r.json()["error"]["param"] == param, r.text


def test_a_worker_loads_its_controlnets_from_its_settings(serve_app):
    """`--controlnets` and `--controlnet-placement` through the app's own loading path."""
    settings = WorkerSettings(model="tiny-sd", device="cpu", warmup=False, default_steps=STEPS,
                              controlnets="tiny-controlnet", controlnet_placement="overlap")
    with serve_app(create_worker(settings)) as base:
        body = httpx.get(f"{base}/v1/controlnets", timeout=30).json()
        assert [(d["id"], d["kind"]) for d in body["data"]] == [("tiny-controlnet", "canny")]
        assert body["placement"] == "overlap"
        r = generate(base, [{"name": "tiny-controlnet", "image": b64(edges())}])
        assert r.status_code == 200, r.text


def test_a_controlnet_of_another_family_fails_readiness(serve_app):
    settings = WorkerSettings(model="tiny-sd", device="cpu", warmup=False, controlnets="x=tiny-controlnet-sdxl")
    with serve_app(create_worker(settings), ready_path=None) as base:
        import time

        deadline = time.monotonic() + 60
        while (r := httpx.get(f"{base}/readyz", timeout=30)).json().get("status") == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert r.status_code == 503 and "ControlNetMismatch" in r.json()["error"], r.text


def test_the_schemas_document_controlnet(fleet):
    import json

    for base in (fleet["router"], fleet["worker"]):
        spec = httpx.get(f"{base}/openapi.json", timeout=30).json()
        assert "get" in spec["paths"]["/v1/controlnets"]
        schema = spec["paths"]["/v1/images/generations"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        if "$ref" in schema:
            schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
        assert "controlnet" in schema["properties"]
        text = json.dumps(spec)  # the unit's fields, wherever the generator put its definition
        assert all(f'"{f}"' in text for f in ("conditioning_scale", "guidance_start", "guidance_end", "preprocess"))
