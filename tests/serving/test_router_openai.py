"""The official `openai` client against the router in front of two real workers (tiny model, loopback)."""

import base64
import io
from contextlib import ExitStack

import pytest
from PIL import Image

from stepfleet.serving.app import create_app as create_worker
from stepfleet.serving.engine import Engine, EngineConfig
from stepfleet.serving.router.app import create_app as create_router
from stepfleet.serving.router.config import RouterSettings, parse_config
from stepfleet.serving.settings import WorkerSettings


@pytest.fixture(scope="module")
def routed(runner, serve_app):
    with ExitStack() as stack:
        urls = []
        for pool in ("cpu-a", "cpu-b"):
            settings = WorkerSettings(model="tiny-sd", pool=pool, max_batch=4, default_steps=3, warmup=False)
            urls.append(stack.enter_context(serve_app(create_worker(settings, engine=Engine(runner, EngineConfig(max_batch=4))))))
        config = parse_config(
            "version: 1\nservice: test\nmodel: tiny-sd\npools:\n"
            f"- {{name: cpu-a, endpoints: [{urls[0]}], weight: 0.5}}\n"
            f"- {{name: cpu-b, endpoints: [{urls[1]}], weight: 0.5}}\n")
        base = stack.enter_context(serve_app(create_router(config, RouterSettings(default_steps=3))))
        yield base


def test_openai_client_through_the_router(routed):
    from openai import OpenAI

    client = OpenAI(base_url=f"{routed}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-sd"]
    pools = set()
    for seed in (1, 2):
        raw = client.images.with_raw_response.generate(
            model="tiny-sd", prompt="a small red boat", size="64x64", n=1, response_format="b64_json",
            extra_body={"num_inference_steps": 2, "seed": seed},
        )
        pools.add(raw.headers["x-stepfleet-pool"])
        result = raw.parse()
        img = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
        assert img.format == "PNG" and img.size == (64, 64)
    assert pools == {"cpu-a", "cpu-b"}  # equal weights alternate


def test_openai_client_sees_the_router_errors(routed):
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=f"{routed}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="x", extra_body={"num_inference_steps": 201})
    assert info.value.body["param"] == "num_inference_steps"  # the worker's limit (200): its verdict, passed through
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="x", extra_body={"bogus_field": 1})
    assert info.value.body["param"] == "bogus_field"  # the router's own check
