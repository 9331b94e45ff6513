"""`/openapi.json` of a worker and of the router, over real HTTP: every request body is documented,
with OpenAI's fields, stepfleet's, and the limits each side enforces."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from annotated_types import Le

from stepfleet.serving.app import create_app as create_worker
from stepfleet.serving.engine import Engine, EngineConfig
from stepfleet.serving.router.app import create_app as create_router
from stepfleet.serving.router.config import RouterSettings, parse_config
from stepfleet.serving.schemas import MAX_IMAGES, MAX_STEPS
from stepfleet.serving.settings import WorkerSettings
from tests.serving.fakes import FakeRunner

#: The fields each POST body documents (OpenAI's first, then stepfleet's), by path.
FIELDS = {
    "/v1/adapters": {"name", "file", "source"},
    "/v1/images/generations": {
        "prompt", "model", "n", "size", "response_format", "output_format", "output_compression", "quality",
        "style", "background", "moderation", "user", "safety_identifier", "stream", "partial_images",
        "num_inference_steps", "guidance_scale", "seed",
        "negative_prompt", "scheduler", "priority", "deadline_ms", "original_size", "target_size",
        "crops_coords_top_left", "lora", "lora_wait",
    },
    "/v1/images/edits": {
        "image", "image[]", "mask", "prompt", "model", "n", "size", "response_format", "output_format",
        "output_compression", "quality", "background", "input_fidelity", "user", "safety_identifier", "stream",
        "partial_images", "template_id",
        "num_inference_steps", "guidance_scale", "seed", "scheduler", "strength", "negative_prompt", "priority",
        "deadline_ms", "lora", "lora_wait",
    },
    "/v1/images/variations": {
        "image", "model", "n", "response_format", "size", "user", "output_format", "output_compression", "strength",
        "prompt", "num_inference_steps", "guidance_scale", "seed", "scheduler", "priority", "deadline_ms",
    },
    "/v1/videos": {
        "prompt", "model", "seconds", "size", "input_reference",
        "num_frames", "fps", "num_inference_steps", "seed", "guidance_scale", "negative_prompt", "priority",
        "deadline_ms",
    },
    "/v1/templates": {
        "image", "prompt", "negative_prompt", "size", "num_inference_steps", "guidance_scale", "seed", "scheduler",
        "strength",
    },
}
MEDIA = {"/v1/adapters": "multipart/form-data", "/v1/images/generations": "application/json", "/v1/images/edits": "multipart/form-data",
         "/v1/images/variations": "multipart/form-data",
         "/v1/templates": "multipart/form-data", "/v1/videos": "multipart/form-data"}
REQUIRED = {"/v1/adapters": {"name"}, "/v1/images/generations": {"prompt"}, "/v1/images/edits": {"prompt"},
            "/v1/images/variations": {"image"},
            "/v1/templates": {"image"}, "/v1/videos": {"prompt"}}

WORKER_SETTINGS = WorkerSettings(model="tiny-sd", max_batch=4, max_images=8, max_steps=150, warmup=False)
ENGINE_BATCH = 3  # the engine given to the worker batches 3 images: so `n` is at most 3 there


@pytest.fixture(scope="module")
def worker_spec(serve_app) -> dict[str, Any]:
    app = create_worker(WORKER_SETTINGS, engine=Engine(FakeRunner(), EngineConfig(max_batch=ENGINE_BATCH)))
    with serve_app(app) as base:
        return httpx.get(f"{base}/openapi.json").json()


@pytest.fixture(scope="module")
def router_spec(serve_app) -> dict[str, Any]:
    config = parse_config("version: 1\nservice: t\nmodel: tiny-sd\npools:\n"
                          "- {name: a, endpoints: ['http://127.0.0.1:9'], weight: 1.0}\n")
    with serve_app(create_router(config, RouterSettings())) as base:
        return httpx.get(f"{base}/openapi.json").json()


def resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    assert ref.startswith("#/components/schemas/"), ref
    return spec["components"]["schemas"][ref.rsplit("/", 1)[1]]


def body_schema(spec: dict[str, Any], path: str) -> dict[str, Any]:
    body = spec["paths"][path]["post"].get("requestBody")
    assert body is not None, f"POST {path} documents no request body"
    assert list(body["content"]) == [MEDIA[path]]
    return resolve(spec, body["content"][MEDIA[path]]["schema"])


def bound(prop: dict[str, Any], key: str) -> float | None:
    """`key` (maximum, minimum, ...) of a property, or of its numeric branch when it is nullable."""
    for branch in [prop, *prop.get("anyOf", [])]:
        if key in branch and branch.get("type") in ("integer", "number"):
            return branch[key]
    return None


def post_paths(spec: dict[str, Any]) -> set[str]:
    return {path for path, ops in spec["paths"].items() if "post" in ops}


@pytest.mark.parametrize("side", ["worker", "router"])
def test_every_post_documents_its_body_with_openai_and_stepfleet_fields(side, request):
    spec = request.getfixturevalue(f"{side}_spec")
    assert post_paths(spec) == set(FIELDS)
    for path, fields in FIELDS.items():
        schema = body_schema(spec, path)
        assert fields <= set(schema["properties"]), f"{side} {path}: missing {fields - set(schema['properties'])}"
        assert REQUIRED[path] <= set(schema.get("required", ()))
        assert schema.get("additionalProperties") is False  # unknown fields are refused, and the schema says so


def test_the_worker_documents_its_own_limits(worker_spec):
    gen = body_schema(worker_spec, "/v1/images/generations")["properties"]
    edit = body_schema(worker_spec, "/v1/images/edits")["properties"]
    tmpl = body_schema(worker_spec, "/v1/templates")["properties"]
    for props in (gen, edit):
        assert bound(props["n"], "maximum") == ENGINE_BATCH and bound(props["n"], "minimum") == 1
        assert bound(props["output_compression"], "minimum") == 0
        assert bound(props["output_compression"], "maximum") == 100
        assert set(_enum(props["scheduler"])) == {"ddim", "euler", "euler_a", "dpmpp_2m", "lcm", "flow_euler",
                                              "flow_heun"}
        assert set(_enum(props["output_format"])) == {"png", "jpeg", "webp"}
    for props in (gen, edit, tmpl):
        assert bound(props["num_inference_steps"], "maximum") == WORKER_SETTINGS.max_steps
        assert bound(props["num_inference_steps"], "minimum") == 1
        assert bound(props["guidance_scale"], "maximum") == 50
    for props in (edit, tmpl):
        assert bound(props["strength"], "exclusiveMinimum") == 0 and bound(props["strength"], "maximum") == 1
    assert "pattern" in _branch(gen["original_size"], "string") and "pattern" in _branch(gen["size"], "string")


def test_the_router_documents_the_ceilings_no_worker_exceeds(router_spec):
    gen = body_schema(router_spec, "/v1/images/generations")["properties"]
    assert bound(gen["n"], "maximum") == MAX_IMAGES
    assert bound(gen["num_inference_steps"], "maximum") == MAX_STEPS
    edit = body_schema(router_spec, "/v1/images/edits")["properties"]
    assert bound(edit["strength"], "maximum") == 1 and bound(edit["n"], "maximum") == MAX_IMAGES


def test_the_schema_ceilings_are_the_settings_ceilings():
    """The router checks bodies against the ceilings: a worker allowing more would be cut short."""
    def le(field: str) -> int:
        return next(m.le for m in WorkerSettings.model_fields[field].metadata if isinstance(m, Le))

    assert MAX_STEPS == le("max_steps")
    assert MAX_IMAGES == le("max_batch")  # n is capped by the batch (see http.state.worker_limits)


def test_errors_are_documented_as_400s_in_openai_shape_not_422(worker_spec):
    responses = worker_spec["paths"]["/v1/images/generations"]["post"]["responses"]
    assert "422" not in responses
    error = resolve(worker_spec, responses["4XX"]["content"]["application/json"]["schema"])
    assert "error" in error["properties"]
    assert {"429", "503"} <= set(responses)


def _branch(prop: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(b for b in [prop, *prop.get("anyOf", [])] if b.get("type") == kind)


def _enum(prop: dict[str, Any]) -> list[Any]:
    return next(b["enum"] for b in [prop, *prop.get("anyOf", [])] if "enum" in b)
