"""Adapters through the router: affinity (rendezvous home, least-loaded fallback) and `/v1/adapters` fan-out.

The end-to-end test runs a real router in front of two real tiny-sd workers on loopback.
"""

from __future__ import annotations

from contextlib import ExitStack

import httpx
import pytest

from stepfleet.serving.router.adapters import LORA_MISS_FACTOR, lora_affinity, with_lora_affinity
from stepfleet.serving.router.balancing import EndpointLoad, choose_endpoint, rendezvous_rank
from stepfleet.serving.router.costing import RequestCost
from tests.serving.lora_files import lora_bytes


def test_affinity_key_is_the_sorted_adapter_names():
    assert lora_affinity([{"name": "b", "scale": 1}, {"name": "a"}]) == "lora:a,b"
    assert lora_affinity('[{"name": "b"}, {"name": "a", "scale": 0.5}]') == "lora:a,b"  # a form's JSON text
    assert lora_affinity(None) is None and lora_affinity([]) is None and lora_affinity("not json") is None
    cost = with_lora_affinity(RequestCost("generation", 10.0, 10.0), [{"name": "a"}])
    assert cost.affinity == "lora:a" and cost.uncached_units == 10.0 * LORA_MISS_FACTOR
    templated = RequestCost("edit", 2.0, 10.0, template_id="tmpl-1")
    assert with_lora_affinity(templated, [{"name": "a"}]) is templated  # the template's home wins


def test_requests_go_to_their_adapters_home_unless_it_is_much_busier():
    eps = [EndpointLoad(url=f"http://w{i}", pool="p") for i in range(4)]
    cost = with_lora_affinity(RequestCost("generation", 10.0, 10.0), [{"name": "style"}])
    home = rendezvous_rank("lora:style", [e.url for e in eps])[0]
    assert choose_endpoint(eps, cost, now=0.0)[0].url == home
    busy = next(e for e in eps if e.url == home)
    for _ in range(20):
        busy.dispatched(100.0)  # far more work queued at the home than an adapter load costs
    chosen, units = choose_endpoint(eps, cost, now=0.0)
    assert chosen.url != home and units == cost.uncached_units


@pytest.fixture(scope="module")
def two_workers(serve_app, tmp_path_factory):
    from stepfleet.serving.app import create_app
    from stepfleet.serving.settings import WorkerSettings

    with ExitStack() as stack:
        urls = []
        for i in range(2):
            s = WorkerSettings(model="tiny-sd", device="cpu", pool="p", default_steps=2, warmup=False,
                               adapter_dir=str(tmp_path_factory.mktemp(f"w{i}")))
            urls.append(stack.enter_context(serve_app(create_app(s))))
        yield urls


def test_router_fans_out_registrations_and_keeps_an_adapter_on_its_home(serve_app, tmp_path, two_workers):
    from stepfleet.serving.loading import load_model
    from stepfleet.serving.router.app import create_app
    from stepfleet.serving.router.config import RouterSettings, parse_config

    text = "\n".join(["version: 1", "service: test", "model: tiny-sd", "pools:", "- name: p",
                      f"  endpoints: [{', '.join(two_workers)}]", "  weight: 1", "  accelerator: cpu",
                      "  pricePerHour: 0.1"]) + "\n"
    (tmp_path / "router.yaml").write_text(text)
    app = create_app(parse_config(text), RouterSettings(reload_s=0.05, load_poll_s=0.2),
                     config_path=str(tmp_path / "router.yaml"))
    unet = load_model("tiny-sd", device="cpu").pipeline.unet
    with serve_app(app) as base:
        r = httpx.post(f"{base}/v1/adapters", data={"name": "style"},
                       files={"file": ("s.safetensors", lora_bytes(unet, rank=2, seed=1), "application/octet-stream")},
                       timeout=60)
        assert r.status_code == 200, r.text
        for url in two_workers:  # every worker holds it
            assert httpx.get(f"{url}/v1/adapters/style").json()["tiers"] == ["host", "disk"]
        bad = httpx.post(f"{base}/v1/adapters", data={"name": "bad"},
                         files={"file": ("b.safetensors", b"garbage", "application/octet-stream")}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "file"
        assert [a["id"] for a in httpx.get(f"{base}/v1/adapters").json()["data"]] == ["style"]

        for seed in range(3):
            r = httpx.post(f"{base}/v1/images/generations", timeout=120, json={
                "prompt": "a lighthouse", "size": "64x64", "seed": seed, "lora": [{"name": "style"}]})
            assert r.status_code == 200, r.text
        home = rendezvous_rank("lora:style", two_workers)[0]
        on_device = [url for url in two_workers if "device" in httpx.get(f"{url}/v1/adapters/style").json()["tiers"]]
        assert on_device == [home]

        missing = httpx.post(f"{base}/v1/images/generations", timeout=60,
                             json={"prompt": "x", "size": "64x64", "lora": [{"name": "nope"}]})
        assert missing.status_code == 404 and "'nope'" in missing.json()["error"]["message"]
        assert httpx.delete(f"{base}/v1/adapters/style").json()["deleted"] is True
        for url in two_workers:
            assert httpx.get(f"{url}/v1/adapters/style").status_code == 404
        assert httpx.get(f"{base}/v1/adapters/style").status_code == 404
