"""OpenAI's JSON edit body (`images: [{"image_url": ...}]`, issue 16) on the worker and through the router.

One real worker (tiny-sd, edits on) behind a real router on loopback. Checks: a JSON edit
of data URLs is the multipart edit of the same images, pixel for pixel; bad references are
400s naming the field from either; remote URLs are refused while off, and when on, a
loopback target is refused after resolution unless its network is allowed, and a fetch is
held to its byte limit and never follows a redirect.
"""

from __future__ import annotations

import base64
import http.server
import io
import ipaddress
import threading
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
from stepfleet.serving.image_refs import ImageRefError, parse_data_url, parse_networks, refusal
from stepfleet.serving.router.app import create_app as create_router
from stepfleet.serving.router.config import RouterSettings, parse_config
from stepfleet.serving.runner import ModelRunner
from stepfleet.serving.settings import WorkerSettings

SIZE = 64
STEPS = 3


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def picture(seed: int = 0, size: int = SIZE) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def mask_png(size: int = SIZE) -> bytes:
    a = np.full((size, size), 255, dtype=np.uint8)
    a[8:40, 8:40] = 0  # the transparent square is the area to edit
    return png(Image.fromarray(np.dstack([np.zeros((size, size, 3), np.uint8), a]), "RGBA"))


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


class _Images(http.server.BaseHTTPRequestHandler):
    """A loopback image host: /a.png an image, /big 64 KiB, /moved a redirect to /a.png, /slow late."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/slow":
            time.sleep(1.5)
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/a.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = png(picture(1)) if self.path == "/a.png" else b"\0" * 65536
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def fleet(tiny_backbone, serve_app):
    cache = TemplateCache(max_bytes=64 << 20)
    edits = EditExtension(tiny_backbone, cache)
    engine = Engine(ModelRunner(tiny_backbone, extensions=[edits]), EngineConfig(max_batch=4))
    settings = WorkerSettings(model="tiny-sd", pool="cpu", max_batch=4, default_steps=STEPS, warmup=False)
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    with ExitStack() as stack:
        worker_app = create_worker(settings, engine=engine, edits=edits)
        worker = stack.enter_context(serve_app(worker_app))
        config = parse_config(f"version: 1\nservice: t\nmodel: tiny-sd\npools:\n- {{name: cpu, endpoints: [{worker}], "
                              "weight: 1}\n")
        router = stack.enter_context(serve_app(create_router(config, RouterSettings(default_steps=STEPS))))
        yield {"worker": worker, "router": router, "state": worker_app.state.worker, "settings": settings,
               "images": f"http://127.0.0.1:{images.server_address[1]}"}
    images.shutdown()
    edits.close()
    cache.close()


def _json_edit(base: str, **body) -> httpx.Response:
    return httpx.post(f"{base}/v1/images/edits", json={"prompt": "a red hat", **body}, timeout=120)


def test_data_urls_and_address_rules_are_pure_checks():
    assert parse_data_url("data:image/png;base64,AAEC") == ("image/png", b"\0\1\2")
    for bad, code in (("data:text/plain;base64,aGk=", "invalid_image_format"), ("data:image/png,rawtext", None),
                      ("data:image/png;base64,@@", None), ("http://x/a.png", None)):
        with pytest.raises(ImageRefError) as err:
            parse_data_url(bad)
        assert code is None or err.value.code == code
    ip = ipaddress.ip_address
    for address in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "::1", "fd00::1", "0.0.0.0",
                    "100.64.0.1", "::ffff:127.0.0.1", "224.0.0.1", "fe80::1"):
        assert refusal(ip(address)) is not None, address
    assert refusal(ip("93.184.216.34")) is None and refusal(ip("2606:4700::1111")) is None
    assert refusal(ip("127.0.0.1"), parse_networks("127.0.0.0/8, 10.0.0.0/8")) is None
    assert refusal(ip("192.168.0.1"), parse_networks("127.0.0.0/8")) is not None
    with pytest.raises(ValueError, match="not-a-net"):
        parse_networks("not-a-net")
    with pytest.raises(ValueError, match="remote_image_networks"):
        WorkerSettings(remote_image_networks="10.0.0.0/8,bogus")


def test_a_json_edit_equals_the_multipart_edit_of_the_same_images(fleet):
    seeded = {"seed": 5, "num_inference_steps": STEPS, "size": f"{SIZE}x{SIZE}"}
    r = _json_edit(fleet["router"], images=[{"image_url": data_url(png(picture(1)))},
                                            {"image_url": data_url(png(picture(2)))}],
                   mask={"image_url": data_url(mask_png())}, **seeded)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["input_tokens_details"]["image_tokens"] == 2 * (SIZE // 8) ** 2
    form = httpx.post(f"{fleet['router']}/v1/images/edits", timeout=120,
                      files=[("image[]", ("a.png", png(picture(1)), "image/png")),
                             ("image[]", ("b.png", png(picture(2)), "image/png")),
                             ("mask", ("m.png", mask_png(), "image/png"))],
                      data={"prompt": "a red hat", **{k: str(v) for k, v in seeded.items()}})
    assert form.status_code == 200, form.text
    out = pixels(body["data"][0]["b64_json"])
    assert np.array_equal(out, pixels(form.json()["data"][0]["b64_json"]))
    assert np.array_equal(out[48:, 48:], np.asarray(picture(1))[48:, 48:])  # outside the mask: the first image


def test_a_json_edit_streams_like_a_form_edit(fleet):
    r = httpx.post(f"{fleet['router']}/v1/images/edits", timeout=120, json={
        "prompt": "x", "images": [{"image_url": data_url(png(picture(3)))}], "stream": True, "partial_images": 1,
        "seed": 1, "num_inference_steps": 3})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    assert "event: image_edit.partial_image" in r.text and "event: image_edit.completed" in r.text
    assert r.headers["x-stepfleet-pool"] == "cpu"  # relayed by the router as a stream


def test_bad_json_edits_are_400s_naming_the_field(fleet):
    good = {"image_url": data_url(png(picture(1)))}
    cases = [
        ({"images": [good] * 17}, "images", None),
        ({"images": [{"image_url": data_url(b"hello", "text/plain")}]}, "images", "invalid_image_format"),
        ({"images": [good, {"image_url": data_url(b"not a png")}]}, "images", "invalid_image"),
        ({"images": [good], "mask": {"image_url": data_url(mask_png(SIZE * 2))}}, "mask", "invalid_mask"),
        ({"images": [{"file_id": "file-123"}]}, "images", None),
        ({"images": [{"image_url": "https://example.com/a.png"}]}, "images", "remote_urls_disabled"),
        ({"images": [{"image_url": "ftp://example.com/a.png"}]}, "images", None),
        ({"images": [good], "n": "2"}, "n", None),
        ({"images": [good], "partial_images": 4, "stream": True}, "partial_images", None),
        ({"images": [good], "output_compression": 101}, "output_compression", None),
        ({"images": [good], "image": "x"}, "image", "unknown_parameter"),
    ]
    for body, param, code in cases:
        for base in (fleet["router"], fleet["worker"]):
            r = _json_edit(base, **body)
            assert r.status_code == 400, (body, r.text)
            error = r.json()["error"]
            assert error["param"] == param, (body, error)
            assert code is None or error["code"] == code, (body, error)


def test_remote_urls_when_enabled_refuse_private_targets_and_keep_their_limits(fleet):
    state, base, host = fleet["state"], fleet["worker"], fleet["images"]
    try:
        state.settings = fleet["settings"].model_copy(update={"remote_image_urls": True})
        r = _json_edit(base, images=[{"image_url": f"{host}/a.png"}])
        assert r.status_code == 400 and r.json()["error"]["code"] == "url_not_allowed", r.text
        assert "loopback" in r.json()["error"]["message"]
        r = _json_edit(base, images=[{"image_url": host.replace("127.0.0.1", "localhost") + "/a.png"}])
        assert r.status_code == 400 and r.json()["error"]["code"] == "url_not_allowed", r.text  # resolved first
        state.settings = fleet["settings"].model_copy(update={
            "remote_image_urls": True, "remote_image_networks": "127.0.0.0/8", "max_upload_bytes": 32768})
        r = _json_edit(base, images=[{"image_url": f"{host}/a.png"}], seed=1, num_inference_steps=2)
        assert r.status_code == 200, r.text
        r = _json_edit(base, images=[{"image_url": f"{host}/big"}])
        assert r.status_code == 413 and r.json()["error"]["param"] == "images", r.text
        r = _json_edit(base, images=[{"image_url": f"{host}/moved"}])
        assert r.status_code == 400 and "redirect" in r.json()["error"]["message"], r.text
        state.settings = state.settings.model_copy(update={"remote_image_timeout_s": 0.3})
        started = time.monotonic()
        r = _json_edit(base, images=[{"image_url": f"{host}/slow"}])
        assert r.status_code == 400 and r.json()["error"]["code"] == "fetch_timeout", r.text
        assert time.monotonic() - started < 1.4  # given up at the limit, not when the host answered
    finally:
        state.settings = fleet["settings"]
