"""Edits and templates over real HTTP: the `openai` client's images.edit, bad input, a small cache that spills."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from stepfleet.serving.app import create_app
from stepfleet.serving.backbones import load_backbone
from stepfleet.serving.edits.cache import TemplateCache
from stepfleet.serving.edits.extension import EditExtension
from stepfleet.serving.edits.templates import Template, TemplateKey, image_digest, record_params
from stepfleet.serving.engine import Engine, EngineConfig
from stepfleet.serving.loading import load_model
from stepfleet.serving.runner import ModelRunner
from stepfleet.serving.settings import WorkerSettings

SIZE = 128
STEPS = 3


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def picture(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def mask_png(box=(16, 16, 64, 64), size=SIZE, mode="RGBA") -> tuple[bytes, np.ndarray]:
    """Opaque everywhere but `box` (x0, y0, x1, y1), which is fully transparent (the edit area)."""
    a = np.full((size, size), 255, dtype=np.uint8)
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = 0
    rgba = np.dstack([np.zeros((size, size, 3), np.uint8), a])
    img = Image.fromarray(rgba, "RGBA").convert(mode)
    return png(img), a == 0


@pytest.fixture(scope="module")
def edits(tiny_backbone):
    cache = TemplateCache(max_bytes=256 << 20)
    extension = EditExtension(tiny_backbone, cache)
    yield extension
    extension.close()
    cache.close()


@pytest.fixture(scope="module")
def edit_worker(edits, tiny_backbone, serve_app):
    settings = WorkerSettings(model="tiny-sd", pool="edit-pool", default_steps=STEPS, max_image_size=256,
                              max_upload_bytes=300_000, warmup=False)
    engine = Engine(ModelRunner(tiny_backbone, extensions=[edits]), EngineConfig(max_batch=4))
    with serve_app(create_app(settings, engine=engine, edits=edits)) as base:
        yield base


def register(base, image: Image.Image, **settings) -> dict:
    data = {"prompt": "a template", "num_inference_steps": str(STEPS), "scheduler": "ddim", "seed": "4",
            **{k: str(v) for k, v in settings.items()}}
    r = httpx.post(f"{base}/v1/templates", files={"image": ("t.png", png(image), "image/png")}, data=data, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_openai_client_edits_a_registered_template_on_the_cached_path(edit_worker):
    from openai import OpenAI

    image = picture(1)
    tmpl = register(edit_worker, image)
    assert tmpl["status"] == "ready" and tmpl["cached"] is True
    assert httpx.get(f"{edit_worker}/v1/templates/{tmpl['id']}").json()["id"] == tmpl["id"]
    assert tmpl["id"] in [t["id"] for t in httpx.get(f"{edit_worker}/v1/templates").json()["data"]]
    mask, edit_area = mask_png()
    client = OpenAI(base_url=f"{edit_worker}/v1", api_key="unused")
    raw = client.images.with_raw_response.edit(
        image=("t.png", png(image), "image/png"), mask=("m.png", mask, "image/png"), prompt="a red square",
        n=2, size=f"{SIZE}x{SIZE}", response_format="b64_json",
    )
    assert raw.headers["x-stepfleet-edit-path"] == "cached"
    result = raw.parse()
    assert len(result.data) == 2
    base = np.asarray(image)
    for item in result.data:
        out = np.asarray(Image.open(io.BytesIO(base64.b64decode(item.b64_json))).convert("RGB"))
        assert out.shape == (SIZE, SIZE, 3)
        assert np.array_equal(out[~edit_area], base[~edit_area])  # the template's pixels, exactly
    # By id, with settings that differ from the template's: full compute, and the header says so.
    r = httpx.post(f"{edit_worker}/v1/images/edits", files={"mask": ("m.png", mask, "image/png")},
                   data={"template_id": tmpl["id"], "prompt": "x", "guidance_scale": "2.0"}, timeout=120)
    assert r.status_code == 200 and r.headers["x-stepfleet-edit-path"] == "full"
    assert r.json()["stepfleet"]["edit_path"] == "full"
    assert httpx.delete(f"{edit_worker}/v1/templates/{tmpl['id']}").json()["deleted"] is True
    assert httpx.get(f"{edit_worker}/v1/templates/{tmpl['id']}").status_code == 404


def _jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("files", "data", "status", "param"),
    [
        ({"mask": ("m.jpg", _jpeg(Image.new("RGB", (SIZE, SIZE))), "image/jpeg")}, {}, 400, "mask"),
        ({"mask": ("m.png", mask_png(mode="RGB")[0], "image/png")}, {}, 400, "mask"),
        ({"mask": ("m.png", mask_png(size=64)[0], "image/png")}, {}, 400, "mask"),
        ({"mask": ("m.png", b"not an image", "image/png")}, {}, 400, "mask"),
        ({"image": ("big.png", png(Image.new("RGB", (512, 512))), "image/png")}, {}, 413, "image"),
        ({"image": ("bomb.png", png(Image.new("L", (4096, 4096))), "image/png")}, {}, 413, "image"),
        ({"image": ("huge.png", b"\x89PNG" + b"0" * 400_000, "image/png")}, {}, 413, "image"),
        ({}, {"template_id": "tmpl-nope"}, 404, "template_id"),
        ({}, {"n": "lots"}, 400, "n"),
        ({}, {"strength": "1.5"}, 400, "strength"),
        ({}, {"size": "256x256"}, 400, "size"),
        ({}, {"bogus": "1"}, 400, "bogus"),
    ],
)
def test_bad_edit_input_is_refused_naming_the_field(edit_worker, files, data, status, param):
    body = {"image": ("t.png", png(picture(2)), "image/png"), **files}
    if "template_id" in data:
        body.pop("image")
    r = httpx.post(f"{edit_worker}/v1/images/edits", files=body, data={"prompt": "x", **data}, timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def entry_bytes(backbone) -> int:
    """Bytes one template step's activations take (recorded into a throwaway cache)."""
    with TemplateCache(max_bytes=256 << 20) as probe:
        extension = EditExtension(backbone, probe)
        try:
            runner = ModelRunner(backbone, extensions=[extension])
            t = Template("probe", TemplateKey(SIZE, SIZE, STEPS, "ddim", 7.5, 4), "p", picture(3),
                         image_digest(picture(3)))
            extension.add_template(t)
            state = runner.prepare(record_params(t), 4).state
            for _ in range(STEPS):
                runner.step([state])
            return probe.bytes_memory // STEPS
        finally:
            extension.close()


def test_small_cache_spills_to_disk_and_evicts_through_the_api(serve_app, tmp_path):
    # Its own copy of the model: one UNet takes one edits extension at a time, and the module's
    # worker holds one on the shared model. Bound memory to ~1 entry and disk to ~one template,
    # so a second registration pushes the first out of both tiers.
    backbone = load_backbone(load_model("tiny-sd", device="cpu"))
    entry = entry_bytes(backbone)
    cache = TemplateCache(max_bytes=int(entry * 1.5), disk_bytes=int(entry * (STEPS + 0.5)), disk_dir=tmp_path)
    edits = EditExtension(backbone, cache)
    settings = WorkerSettings(pool="small", default_steps=STEPS, warmup=False)
    app = create_app(settings, engine=Engine(ModelRunner(backbone, extensions=[edits]), EngineConfig(max_batch=4)),
                     edits=edits)
    try:
        with serve_app(app) as base:
            first = register(base, picture(4))
            second = register(base, picture(5))
            listed = {t["id"]: t for t in httpx.get(f"{base}/v1/templates").json()["data"]}
            assert listed[first["id"]]["cached"] is False and listed[second["id"]]["cached"] is True
            assert cache.bytes_memory <= cache.max_bytes and 0 < cache.bytes_disk <= cache.disk_bytes
            assert any(tmp_path.iterdir())
            mask, _ = mask_png()
            for tmpl, path in ((first, "full"), (second, "cached")):
                r = httpx.post(f"{base}/v1/images/edits", files={"mask": ("m.png", mask, "image/png")},
                               data={"template_id": tmpl["id"], "prompt": "edit"}, timeout=120)
                assert r.status_code == 200 and r.headers["x-stepfleet-edit-path"] == path
            text = httpx.get(f"{base}/metrics").text
    finally:
        edits.close()
        cache.close()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.labels.get("pool") == "small"}
    assert samples["stepfleet_template_cache_misses_total"] >= 1  # read back from disk
    assert samples["stepfleet_template_cache_hits_total"] >= 1
    assert samples["stepfleet_template_cache_disk_bytes"] > 0
    assert samples["stepfleet_template_cache_memory_bytes"] <= cache.max_bytes
    assert samples["stepfleet_template_cache_load_seconds_total"] > 0


@pytest.mark.parametrize(
    ("files", "data", "param"),
    [
        ({}, {"mask": "not a file"}, "mask"),  # a text field where a file belongs
        ({"prompt": ("p.txt", b"a prompt", "text/plain")}, {}, "prompt"),  # and the other way round
        ({"image[]": [("a.png", png(Image.new("RGB", (8, 8))), "image/png")] * 17}, {}, "image[]"),  # at most 16
        ({"bogus": ("b.png", b"x", "image/png")}, {}, "bogus"),
        ({}, {"output_compression": "101"}, "output_compression"),
        ({}, {"scheduler": "plms"}, "scheduler"),
        ({}, {"response_format": "url"}, "response_format"),
        ({}, {"model": "dall-e-2"}, "model"),
    ],
)
def test_form_fields_are_typed_and_named_in_errors(edit_worker, files, data, param):
    body = [("image", ("t.png", png(picture(2)), "image/png"))] if "image[]" not in files else []
    for name, value in files.items():
        body += [(name, v) for v in value] if isinstance(value, list) else [(name, value)]
    if "prompt" not in files:
        data = {"prompt": "x", **data}
    r = httpx.post(f"{edit_worker}/v1/images/edits", files=body, data=data, timeout=60)
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == param


def test_uploads_are_checked_by_their_headers_first(edit_worker):
    url = f"{edit_worker}/v1/images/edits"
    chunked = httpx.post(url, content=iter([b"--x\r\n"]), headers={"content-type": "multipart/form-data; boundary=x"})
    assert chunked.status_code == 411 and chunked.json()["error"]["code"] == "length_required"
    r = httpx.post(url, content=b"prompt=x", headers={"content-type": "text/plain"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_content_type"
    r = httpx.post(url, json={"prompt": "x"})  # OpenAI's JSON edit (test_json_edits.py), without images
    assert r.status_code == 400 and r.json()["error"]["param"] == "images"
    r = httpx.post(url, content=b"--x\r\nContent-Disposition: form-data\r\n\r\nx\r\n--x--\r\n",  # no name
                   headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_multipart"
    r = httpx.post(f"{edit_worker}/v1/templates", data={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"


def test_refused_edits_are_counted_as_invalid_edits(edit_worker):
    def invalid() -> float:
        text = httpx.get(f"{edit_worker}/metrics").text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "stepfleet_requests_total" and s.labels.get("kind") == "edit"
                   and s.labels.get("status") == "invalid")

    before = invalid()
    for data in ({"prompt": "x", "n": "lots"}, {"prompt": "x", "num_inference_steps": "201"}):  # schema, limit
        r = httpx.post(f"{edit_worker}/v1/images/edits", files={"image": ("t.png", png(picture(2)), "image/png")},
                       data=data, timeout=60)
        assert r.status_code == 400
    assert invalid() == before + 2


def test_a_worker_built_from_its_settings_alone_serves_edits(serve_app):
    # The production wiring: the lifespan loads the model, its backbone, the edits extension
    # (its own UNet: a fresh load), the runner, the engine and the template service.
    settings = WorkerSettings(model="tiny-sd", device="cpu", pool="own", default_steps=STEPS, warmup=False,
                              template_cache_bytes=64 << 20)
    with serve_app(create_app(settings)) as base:
        tmpl = register(base, picture(6))
        assert tmpl["status"] == "ready" and tmpl["cached"] is True
        mask, _ = mask_png()
        r = httpx.post(f"{base}/v1/images/edits", files={"mask": ("m.png", mask, "image/png")},
                       data={"template_id": tmpl["id"], "prompt": "edit"}, timeout=120)
        assert r.status_code == 200 and r.headers["x-stepfleet-edit-path"] == "cached"
        text = httpx.get(f"{base}/metrics").text
    memory = [s.value for f in text_string_to_metric_families(text) for s in f.samples
              if s.name == "stepfleet_template_cache_memory_bytes" and s.labels.get("pool") == "own"]
    assert memory and memory[0] > 0
