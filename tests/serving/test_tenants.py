"""Issue 19, findings 3 and 4, over real HTTP: two real workers (tiny model, edits on) behind the
router, with API keys of two tenants and a worker token.

- Templates belong to the tenant of the key that registered them; another tenant's keys get
  404 for them everywhere (lookup, listing, edit, delete); keys of the same tenant share them.
- Workers take requests only with the router's token (probes and scrapes excepted).
- A template registered through the router is found, listed and edited through it.
"""

from __future__ import annotations

import io
from contextlib import ExitStack

import httpx
import numpy as np
import pytest
from PIL import Image

from stepfleet.serving.app import create_app as create_worker
from stepfleet.serving.backbones import load_backbone
from stepfleet.serving.edits.cache import TemplateCache
from stepfleet.serving.edits.extension import EditExtension
from stepfleet.serving.engine import Engine, EngineConfig
from stepfleet.serving.loading import load_model
from stepfleet.serving.router.app import create_app as create_router
from stepfleet.serving.router.balancing import rendezvous_rank
from stepfleet.serving.router.config import RouterSettings, parse_config
from stepfleet.serving.runner import ModelRunner
from stepfleet.serving.settings import WorkerSettings

SIZE = 64
STEPS = 2
TOKEN = "worker-token-0123456789"
KEYS = {"acme": "sk-acme-1", "acme2": "sk-acme-2", "other": "sk-other"}


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


@pytest.fixture(scope="module")
def fleet(tiny_backbone, serve_app, tmp_path_factory):
    """(router URL, worker URLs): two workers, each with its own backbone (an edits extension
    hooks its backbone's attention), sharing a token file with the router."""
    tmp = tmp_path_factory.mktemp("tenants")
    (tmp / "token").write_text(TOKEN + "\n")
    (tmp / "keys").write_text(f"{KEYS['acme']} tenant=acme\n{KEYS['acme2']} tenant=acme\n{KEYS['other']}\n")
    backbones = [tiny_backbone, load_backbone(load_model("tiny-sd", device="cpu"))]
    with ExitStack() as stack:
        urls = []
        for i, backbone in enumerate(backbones):
            cache = TemplateCache(max_bytes=64 << 20)
            stack.callback(cache.close)
            edits = EditExtension(backbone, cache)
            stack.callback(edits.close)
            settings = WorkerSettings(pool=f"w{i}", default_steps=STEPS, warmup=False,
                                      worker_token_file=str(tmp / "token"))
            engine = Engine(ModelRunner(backbone, extensions=[edits]), EngineConfig(max_batch=4))
            urls.append(stack.enter_context(serve_app(create_worker(settings, engine=engine, edits=edits))))
        config = parse_config("version: 1\nservice: t\nmodel: tiny-sd\npools:\n"
                              f"- {{name: p, endpoints: [{urls[0]}, {urls[1]}], weight: 1.0}}\n")
        settings = RouterSettings(default_steps=STEPS, load_poll_s=0.1, api_keys_file=str(tmp / "keys"),
                                  worker_token_file=str(tmp / "token"))
        base = stack.enter_context(serve_app(create_router(config, settings)))
        yield base, urls


def register(base: str, who: str, seed: int) -> dict:
    r = httpx.post(f"{base}/v1/templates", headers=auth(who), timeout=120,
                   data={"prompt": f"template {seed}", "num_inference_steps": str(STEPS), "seed": "1"},
                   files={"image": ("t.png", png(seed), "image/png")})
    assert r.status_code == 200, r.text
    return r.json()


def edit(base: str, who: str, template_id: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/images/edits", headers=auth(who), timeout=120,
                      data={"prompt": "a hat", "template_id": template_id})


# -- finding 4: templates registered through the router can be read back through it ----------------

def test_templates_registered_through_the_router_are_found_listed_edited_and_deleted(fleet):
    base, urls = fleet
    ids: list[str] = []
    for seed in range(24):  # ids are random: register until their homes cover both workers
        ids.append(register(base, "acme", seed)["id"])
        if len(ids) >= 6 and {rendezvous_rank(t, urls)[0] for t in ids} == set(urls):
            break
    for template_id in ids:
        r = httpx.get(f"{base}/v1/templates/{template_id}", headers=auth("acme"), timeout=30)
        assert r.status_code == 200 and r.json()["id"] == template_id  # before: 404 for the half not at home
    listed = httpx.get(f"{base}/v1/templates", headers=auth("acme"), timeout=30).json()
    assert set(ids) <= {t["id"] for t in listed["data"]}  # before: one worker's list
    holders = {t: [url for url in urls
                   if httpx.get(f"{url}/v1/templates/{t}", timeout=30,
                                headers={"Authorization": f"Bearer {TOKEN}", "X-Stepfleet-Tenant": "acme"}
                                ).status_code == 200] for t in ids}
    assert holders == {t: [rendezvous_rank(t, urls)[0]] for t in ids}  # each on its id's home only
    assert {home for (home,) in holders.values()} == set(urls)  # so spread over both workers
    r = edit(base, "acme", ids[0])
    assert r.status_code == 200, r.text
    assert r.headers["x-stepfleet-edit-path"] == "cached"  # sent where the activations are
    assert httpx.delete(f"{base}/v1/templates/{ids[0]}", headers=auth("acme"), timeout=30).status_code == 200
    assert httpx.get(f"{base}/v1/templates/{ids[0]}", headers=auth("acme"), timeout=30).status_code == 404


# -- finding 3: no tenant isolation ------------------------------------------------------------------

def test_another_tenant_cannot_see_use_or_delete_a_template(fleet):
    base, _ = fleet
    template = register(base, "acme", seed=42)
    tid = template["id"]
    r = httpx.get(f"{base}/v1/templates/{tid}", headers=auth("other"), timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "template_not_found"
    listed = httpx.get(f"{base}/v1/templates", headers=auth("other"), timeout=30).json()["data"]
    assert tid not in {t["id"] for t in listed} and all("template 42" != t["prompt"] for t in listed)
    r = edit(base, "other", tid)
    assert r.status_code == 404 and r.json()["error"]["param"] == "template_id"
    assert httpx.delete(f"{base}/v1/templates/{tid}", headers=auth("other"), timeout=30).status_code == 404
    # an identical upload by another tenant is not taken for the template (no cached path)
    r = httpx.post(f"{base}/v1/images/edits", headers=auth("other"), timeout=120,
                   data={"prompt": "a hat", "num_inference_steps": str(STEPS), "seed": "1"},
                   files={"image": ("t.png", png(42), "image/png")})
    assert r.status_code == 200 and r.json()["stepfleet"]["template_id"] is None
    # the owner's tenant, through either of its keys, still has it
    for who in ("acme", "acme2"):
        r = httpx.get(f"{base}/v1/templates/{tid}", headers=auth(who), timeout=30)
        assert r.status_code == 200 and r.json()["prompt"] == "template 42"
    assert edit(base, "acme2", tid).status_code == 200


def test_workers_take_requests_only_with_the_router_token(fleet):
    base, urls = fleet
    worker = urls[0]
    body = {"prompt": "x", "size": f"{SIZE}x{SIZE}", "num_inference_steps": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEYS['acme']}"}):
        r = httpx.post(f"{worker}/v1/images/generations", json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_worker_token"
        assert httpx.get(f"{worker}/v1/templates", headers=headers, timeout=30).status_code == 401
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):  # probes, scrapes, the schema
        assert httpx.get(f"{worker}{path}", timeout=30).status_code == 200
    r = httpx.post(f"{worker}/v1/images/generations", json=body, timeout=60,
                   headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    # the router holds the token: its polls and forwards go through
    assert httpx.get(f"{base}/readyz", timeout=30).json()["pools"] == {"p": 2}
    assert httpx.post(f"{base}/v1/images/generations", json=body, headers=auth("other"), timeout=60).status_code == 200
    # and the router's API keys are checked before anything is forwarded
    assert httpx.post(f"{base}/v1/images/generations", json=body, timeout=30).status_code == 401


def test_a_client_cannot_claim_a_tenant_or_a_template_id(fleet):
    base, _ = fleet
    tid = register(base, "acme", seed=7)["id"]
    spoof = {**auth("other"), "X-Stepfleet-Tenant": "acme"}
    assert httpx.get(f"{base}/v1/templates/{tid}", headers=spoof, timeout=30).status_code == 404
    r = httpx.post(f"{base}/v1/templates", headers={**auth("other"), "X-Stepfleet-Template-Id": tid}, timeout=120,
                   data={"prompt": "mine now", "num_inference_steps": str(STEPS)},
                   files={"image": ("t.png", png(8), "image/png")})
    assert r.status_code == 200 and r.json()["id"] != tid  # the router chose the id
    assert httpx.get(f"{base}/v1/templates/{tid}", headers=auth("acme"), timeout=30).json()["prompt"] == "template 7"


def test_a_worker_refuses_a_template_id_that_is_taken(fleet):
    _, urls = fleet
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Stepfleet-Tenant": "acme", "X-Stepfleet-Template-Id": "tmpl-x1"}
    data = {"prompt": "p", "num_inference_steps": str(STEPS)}
    first = httpx.post(f"{urls[0]}/v1/templates", headers=headers, data=data, timeout=120,
                       files={"image": ("t.png", png(9), "image/png")})
    assert first.status_code == 200 and first.json()["id"] == "tmpl-x1"
    again = httpx.post(f"{urls[0]}/v1/templates", headers={**headers, "X-Stepfleet-Tenant": "evil"}, data=data,
                       timeout=120, files={"image": ("t.png", png(10), "image/png")})
    assert again.status_code == 409 and again.json()["error"]["code"] == "template_exists"
