"""Adapters over real HTTP: `/v1/adapters`, `lora` on generations and edits (the `openai` client), bad input.

The worker is built from its settings alone (the production wiring: the lifespan loads the
model and builds the adapter registry and the runner's LoRA extension).
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save

from stepfleet.serving.app import create_app
from stepfleet.serving.settings import WorkerSettings
from tests.serving.lora_files import lora_bytes, lora_tensors

SIZE = 64
STEPS = 2
MAX_ADAPTER_BYTES = 1_000_000


@pytest.fixture(scope="module")
def sd_unet():
    from stepfleet.serving.loading import load_model

    return load_model("tiny-sd", device="cpu").pipeline.unet


@pytest.fixture(scope="module")
def worker(serve_app, tmp_path_factory):
    settings = WorkerSettings(model="tiny-sd", device="cpu", pool="lora", default_steps=STEPS, warmup=False,
                              max_adapter_bytes=MAX_ADAPTER_BYTES, max_adapters_per_request=2,
                              adapter_dir=str(tmp_path_factory.mktemp("adapters")))
    with serve_app(create_app(settings)) as base:
        yield base


def upload(base, name: str, data: bytes, filename: str = "a.safetensors") -> httpx.Response:
    return httpx.post(f"{base}/v1/adapters", data={"name": name},
                      files={"file": (filename, data, "application/octet-stream")}, timeout=60)


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.float32)


def generate(base, **extra) -> httpx.Response:
    body = {"prompt": "a lighthouse", "size": f"{SIZE}x{SIZE}", "seed": 3, "num_inference_steps": STEPS, **extra}
    return httpx.post(f"{base}/v1/images/generations", json=body, timeout=120)


def test_upload_list_generate_with_and_without_an_adapter_and_delete(worker, sd_unet):
    import openai

    r = upload(worker, "style", lora_bytes(sd_unet, rank=4, seed=1))
    assert r.status_code == 200, r.text
    made = r.json()
    assert made["id"] == "style" and made["object"] == "adapter" and made["rank"] == 4 and made["modules"] > 0
    assert "disk" in made["tiers"] and made["source"] == "upload"
    assert [a["id"] for a in httpx.get(f"{worker}/v1/adapters").json()["data"]] == ["style"]

    client = openai.OpenAI(base_url=f"{worker}/v1", api_key="unused", max_retries=0)
    common = {"seed": 3, "num_inference_steps": STEPS}
    plain = client.images.generate(prompt="a lighthouse", size=f"{SIZE}x{SIZE}", extra_body=common)
    styled = client.images.generate(prompt="a lighthouse", size=f"{SIZE}x{SIZE}",
                                    extra_body=common | {"lora": [{"name": "style", "scale": 0.9}],
                                                         "lora_wait": "full"})
    again = client.images.generate(prompt="a lighthouse", size=f"{SIZE}x{SIZE}", extra_body=common)
    a, b, c = (decode(x.data[0].b64_json) for x in (plain, styled, again))
    assert np.array_equal(a, c)  # the adapter left nothing behind
    assert np.abs(a - b).mean() > 2.0  # and visibly changed its own request's image (0-255 scale)
    info = styled.model_extra["stepfleet"]["lora"]
    assert info["adapters"] == [{"name": "style", "scale": 0.9}] and info["wait"] == "full"
    assert info["steps_without_adapter"] == 0

    shown = httpx.get(f"{worker}/v1/adapters/style").json()
    assert "device" in shown["tiers"] and shown["in_use"] == 0
    assert httpx.delete(f"{worker}/v1/adapters/style").json() == {"id": "style", "object": "adapter.deleted",
                                                                  "deleted": True}
    gone = httpx.get(f"{worker}/v1/adapters/style")
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "name"
    r = generate(worker, lora=[{"name": "style"}])
    assert r.status_code == 404 and "'style'" in r.json()["error"]["message"]

    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{worker}/metrics").text)}
    hits = [s for s in families["stepfleet_adapter_cache_hits"].samples if s.labels["pool"] == "lora"]
    loads = [s for s in families["stepfleet_adapter_loads"].samples
             if s.name.endswith("_total") and s.labels.get("outcome") == "ok"]
    assert hits and loads and loads[0].value >= 1


def test_edits_take_adapters_in_a_form_field(worker, sd_unet):
    assert upload(worker, "edit-style", lora_bytes(sd_unet, rank=2, seed=5)).status_code == 200
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (120, 30, 200)).save(buf, "PNG")
    r = httpx.post(f"{worker}/v1/images/edits", files={"image": ("i.png", buf.getvalue(), "image/png")},
                   data={"prompt": "paint", "num_inference_steps": str(STEPS),
                         "lora": json.dumps([{"name": "edit-style", "scale": 0.5}])}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["stepfleet"]["lora"]["adapters"] == [{"name": "edit-style", "scale": 0.5}]
    assert r.headers["x-stepfleet-edit-path"] == "full"


def text_encoder_file() -> bytes:
    return save({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32),
                 "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 2)})


def sdxl_file() -> bytes:
    from stepfleet.serving.loading import load_model

    return lora_bytes(load_model("tiny-sdxl", device="cpu").pipeline.unet, rank=2)


def wrong_shape_file(unet) -> bytes:
    t = lora_tensors(unet, rank=2, targets=("attn1.to_q",))
    first = sorted(k for k in t if k.endswith("lora_A.weight"))[0]
    t[first] = torch.zeros(2, 7)
    return save(t)


@pytest.mark.parametrize("make, status, param, needle", [
    (lambda unet: b"not safetensors at all", 400, "file", "safetensors"),
    (lambda unet: lora_bytes(unet, rank=2)[:-100], 400, "file", "safetensors"),
    (lambda unet: text_encoder_file(), 422, "file", "text_encoder.text_model.encoder.layers.0"),
    (lambda unet: sdxl_file(), 422, "file", "key "),
    (wrong_shape_file, 422, "file", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"),
    (lambda unet: b"x" * (MAX_ADAPTER_BYTES + 70_000), 413, "file", "max-adapter-bytes"),
])
def test_bad_adapter_files_are_refused_naming_the_problem(worker, sd_unet, make, status, param, needle):
    r = upload(worker, "bad", make(sd_unet))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"]
    assert httpx.get(f"{worker}/v1/adapters/bad").status_code == 404


def test_bad_lora_fields_are_refused(worker, sd_unet):
    assert upload(worker, "one", lora_bytes(sd_unet, rank=2, seed=7)).status_code == 200
    cases = [
        ({"lora": [{"name": "nope"}]}, 404, "lora", "'nope'"),
        ({"lora": [{"name": "one"}] * 3}, 400, "lora", "at most 2"),
        ({"lora": [{"name": "one", "scale": "big"}]}, 400, "lora", ""),
        ({"lora": [{"name": "one", "weight": 1}]}, 400, "lora", ""),
        ({"lora": [{"name": "one"}], "lora_wait": "sometimes"}, 400, "lora_wait", ""),
    ]
    for extra, status, param, needle in cases:
        r = generate(worker, **extra)
        assert r.status_code == status, (extra, r.text)
        assert r.json()["error"]["param"] == param and needle in r.json()["error"]["message"]
    r = httpx.post(f"{worker}/v1/adapters", data={"name": "src", "source": "/no/such/file.safetensors"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["param"] == "source"
    r = httpx.post(f"{worker}/v1/adapters", data={"name": "bad name!"},
                   files={"file": ("a.safetensors", lora_bytes(sd_unet, rank=2), "application/octet-stream")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"
    assert generate(worker, lora=[{"name": "one", "scale": 0.5}]).status_code == 200  # the worker is fine


def test_an_adapter_from_a_local_source(worker, sd_unet, tmp_path):
    path = tmp_path / "pytorch_lora_weights.safetensors"
    path.write_bytes(lora_bytes(sd_unet, rank=2, seed=9, layout="kohya"))
    r = httpx.post(f"{worker}/v1/adapters", data={"name": "local", "source": f"pvc://{tmp_path}"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["source"] == f"pvc://{tmp_path}"
    assert generate(worker, lora=[{"name": "local"}]).status_code == 200


def test_adapters_from_settings_register_at_start_and_a_bad_one_is_skipped(serve_app, sd_unet, tmp_path):
    """`--adapters` (what the operator renders from `spec.adapters[]`): `*` preloads onto the device;
    an adapter that does not fit the model (here the trained mini-sd's) is logged and skipped."""
    from pathlib import Path

    import stepfleet.serving

    good = tmp_path / "good.safetensors"
    good.write_bytes(lora_bytes(sd_unet, rank=2, seed=11))
    other = Path(stepfleet.serving.__file__).parent / "builtin" / "loras" / "mini-sd-negative.safetensors"
    settings = WorkerSettings(model="tiny-sd", device="cpu", pool="spec", default_steps=STEPS, warmup=False,
                              adapters=f"*good={good},other={other}", adapter_dir=str(tmp_path / "dir"))
    with serve_app(create_app(settings)) as base:
        listed = httpx.get(f"{base}/v1/adapters").json()["data"]
        assert [a["id"] for a in listed] == ["good"]
        assert listed[0]["tiers"] == ["device", "host", "disk"] and listed[0]["source"] == str(good)
        assert generate(base, lora=[{"name": "good"}]).status_code == 200
