"""Schema-driven fuzzing (schemathesis) of a worker and of the router, from their own `/openapi.json`.

Issue 19, finding 6: both schemas document every request body, so the fuzzer sends bodies,
valid (within the documented schema) and invalid (outside it), to every operation. Each
answer must be no server error, a documented status, the documented content type, and
match the documented response schema.

The worker serves the tiny model with edits on, and small limits, so a valid request runs
the real tokenizer and model in a few milliseconds; the router is in front of it. The
default suite runs `STEPFLEET_FUZZ_CASES` (default 60) cases per app; `make fuzz` runs 1,000
and prints the counts (docs/reliability.md records them).
"""

from __future__ import annotations

import os
from collections import Counter
from contextlib import ExitStack

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from stepfleet.serving.app import create_app as create_worker
from stepfleet.serving.edits.cache import TemplateCache
from stepfleet.serving.edits.extension import EditExtension
from stepfleet.serving.engine import Engine, EngineConfig
from stepfleet.serving.router.app import create_app as create_router
from stepfleet.serving.router.config import RouterSettings, parse_config
from stepfleet.serving.runner import ModelRunner
from stepfleet.serving.settings import WorkerSettings

CASES = int(os.environ.get("STEPFLEET_FUZZ_CASES", "60"))
#: Server errors are faults: 500 (a bug) and 502. Documented 5xx answers are not: 501 (a model
#: without edits), 503 (not ready, no worker) and 504 (the client's own `deadline_ms` passed).
FAULTS = (500, 502)


def no_fault(ctx, response, case) -> bool | None:
    """A 500 or 502 is a fault, whatever the request."""
    if response.status_code in FAULTS:
        raise AssertionError(f"server fault {response.status_code}: {response.text[:300]}")
    return None


CHECKS = [no_fault, status_code_conformance, content_type_conformance, response_schema_conformance]
#: Small limits: a valid request is a 64×64 image of one or two steps.
SETTINGS = WorkerSettings(pool="fuzz", default_steps=1, max_steps=2, max_images=1, max_image_size=64,
                          max_upload_bytes=64 * 1024, warmup=False)


@pytest.fixture(scope="module")
def apps(tiny_backbone, serve_app):
    """{"worker": URL, "router": URL}: the router forwards to the worker."""
    with ExitStack() as stack:
        cache = TemplateCache(max_bytes=16 << 20)
        stack.callback(cache.close)
        edits = EditExtension(tiny_backbone, cache)
        stack.callback(edits.close)
        engine = Engine(ModelRunner(tiny_backbone, extensions=[edits]), EngineConfig(max_batch=2, max_queue=256))
        worker = stack.enter_context(serve_app(create_worker(SETTINGS, engine=engine, edits=edits)))
        config = parse_config(f"version: 1\nservice: fuzz\nmodel: tiny-sd\npools:\n"
                              f"- {{name: fuzz, endpoints: [{worker}], weight: 1.0}}\n")
        router = stack.enter_context(serve_app(create_router(config, RouterSettings(default_steps=1,
                                                                                    default_size=64))))
        yield {"worker": worker, "router": router}


@pytest.mark.parametrize("side", ["worker", "router"])
def test_fuzzing_finds_no_server_error_and_no_schema_violation(apps, side):
    base = apps[side]
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))
    statuses: Counter[int] = Counter()
    operations: Counter[str] = Counter()

    @hypothesis.settings(max_examples=CASES, deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
    @given(case=cases)
    def fuzz(case) -> None:
        response = case.call(base_url=base, timeout=60)
        statuses[response.status_code] += 1
        operations[f"{case.method} {case.path}"] += 1
        case.validate_response(response, checks=CHECKS)

    fuzz()
    total = sum(statuses.values())
    server_errors = sum(n for code, n in statuses.items() if code in FAULTS)
    print(f"\nfuzz {side}: {total} cases over {len(operations)} operations, "
          f"{server_errors} server errors, statuses {dict(sorted(statuses.items()))}, "
          f"cases by operation {dict(sorted(operations.items()))}")
    assert server_errors == 0
    assert total >= CASES
    assert any(op.startswith("POST ") for op in operations)  # bodies reached the API
