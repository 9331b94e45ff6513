"""Compiled pools (issue 20) on the operator side: the spec, the worker Deployment, the loop's timing.

Pure: validation, rendering and the control loop's per-pool numbers, from the example
manifest `docs/examples/compiled-neuron.yaml` and mutations of it.
"""

from __future__ import annotations

import time

import jsonschema
import kubernetes_validate
import pytest
from k8s_helpers import crd_schema, example, openapi_to_jsonschema
from loop_helpers import pod, unready_status

from stepfleet.operator import compilation
from stepfleet.operator.children import Observed, Owner, build_all, workers
from stepfleet.operator.loop import observe
from stepfleet.operator.loop.specmap import policy_spec
from stepfleet.operator.validation import validate
from stepfleet.serving.settings import WorkerSettings

OWNER = Owner(name="sd15-neuron", namespace="ml", uid="0b5a2f8e-1111-2222-3333-444455556666")
EXAMPLE = "compiled-neuron.yaml"


def _validator() -> jsonschema.Draft202012Validator:
    """The CRD's schema as JSON Schema (as `test_crd` reads it; metadata is the API server's)."""
    schema = openapi_to_jsonschema(crd_schema())
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft202012Validator(schema)


def _obj(**serving):
    obj = example(EXAMPLE)
    obj["spec"]["serving"].update(serving)
    return obj


def _spec(obj):
    spec, problems = validate(obj["metadata"]["name"], obj["spec"])
    assert not problems, [str(p) for p in problems]
    return spec


def _problems(obj) -> dict[str, str]:
    spec, problems = validate(obj["metadata"]["name"], obj["spec"])
    assert spec is None
    return {p.field: p.message for p in problems}


def _container(spec, pool_index=0):
    dep = workers.deployment(OWNER, spec, spec.pools[pool_index], Observed())
    return dep, dep["spec"]["template"]["spec"]["containers"][0]


# --- the spec -------------------------------------------------------------------------------------


def test_the_example_is_valid_for_the_crd_and_the_operator():
    _validator().validate(example(EXAMPLE))
    spec = _spec(example(EXAMPLE))
    assert spec.serving.compile.enabled and spec.serving.buckets.rows == [1, 2, 4, 8]
    assert spec.serving.compile_cache.claim_name == "sd15-neuron-compile-cache"


def test_compile_is_off_by_default():
    spec = _spec(example("cpu-fleet.yaml"))
    assert not spec.serving.compile.enabled and spec.serving.buckets is None
    assert compilation.worker_fields(spec) == {}
    assert compilation.warmup_seconds(spec, spec.pools[0]) == 0


@pytest.mark.parametrize(
    "buckets, field, words",
    [
        ({"rows": [1, 4, 2, 8]}, "spec.serving.buckets.rows", "ascending"),
        ({"rows": [1, 2, 2, 8]}, "spec.serving.buckets.rows", "unique"),
        ({"rows": [0, 8]}, "spec.serving.buckets.rows[0]", "greater than or equal to 1"),
        ({"rows": list(range(1, 66))}, "spec.serving.buckets.rows", "at most 64"),
        ({"rows": [1, 2, 4]}, "spec.serving.buckets.rows", "must hold a full batch: serving.maxBatch 4 x 2"),
        ({"sizes": ["512x500"]}, "spec.serving.buckets.sizes", "multiples of 8"),
        ({"sizes": ["512"]}, "spec.serving.buckets.sizes[0]", "pattern"),
        ({"sizes": ["512x512", "512x512"]}, "spec.serving.buckets.sizes", "unique"),
        ({"sizes": ["2048x2048"]}, "spec.serving.buckets.sizes", "largest image side (1024)"),
    ],
)
def test_bad_buckets_are_refused_naming_the_field(buckets, field, words):
    problems = _problems(_obj(buckets=buckets))
    assert field in problems, problems
    assert words in problems[field]


def test_a_pool_whose_own_max_batch_outgrows_the_buckets_is_named():
    obj = example(EXAMPLE)
    obj["spec"]["pools"][0]["maxBatch"] = 8
    problems = _problems(obj)
    assert "pool inf2's maxBatch 8 x 2 rows per image = 16" in problems["spec.serving.buckets.rows"]


def test_an_unguided_family_needs_one_row_per_image():
    obj = _obj(buckets={"rows": [1, 2, 4]})
    obj["spec"]["model"]["family"] = "flux"
    assert _spec(obj).serving.buckets.rows == [1, 2, 4]


@pytest.mark.parametrize(
    "serving, field",
    [
        ({"compile": {"enabled": True, "backend": "tensorrt"}}, "spec.serving.compile.backend"),
        ({"compile": {"enabled": True, "mode": "fast"}}, "spec.serving.compile.mode"),
        ({"compile": {"enabled": True, "warmupSeconds": -1}}, "spec.serving.compile.warmupSeconds"),
        ({"compileCache": {"claimName": "Bad_Claim"}}, "spec.serving.compileCache.claimName"),
        ({"compileCache": {}}, "spec.serving.compileCache.claimName"),
        ({"compile": {"enabeld": True}}, "spec.serving.compile.enabeld"),
    ],
)
def test_bad_compile_settings_are_refused_naming_the_field(serving, field):
    assert field in _problems(_obj(**serving))


def test_the_crd_schema_refuses_what_it_can():
    validator = _validator()
    for serving in ({"compile": {"backend": "tensorrt"}}, {"buckets": {"sizes": ["big"]}},
                    {"buckets": {"rows": [0]}}, {"compileCache": {}}):
        assert list(validator.iter_errors(_obj(**serving))), serving


# --- the worker Deployment --------------------------------------------------------------------------


def test_a_compiled_pool_runs_workers_with_the_compile_flags():
    spec = _spec(example(EXAMPLE))
    _, container = _container(spec)
    command = container["command"]
    settings = WorkerSettings.from_argv(command[2:])
    assert settings.compile is True
    assert (settings.compile_backend, settings.compile_mode) == ("auto", "auto")
    assert settings.bucket_rows == "1,2,4,8" and settings.bucket_sizes == "512x512,768x512"
    assert settings.compile_cache == "/var/cache/stepfleet/compile"
    # backend and mode are written even at their defaults: a new worker default must not change a pool
    assert "--compile-backend" in command and "--compile-mode" in command


def test_the_compile_cache_claim_is_mounted_read_write():
    spec = _spec(example(EXAMPLE))
    dep, container = _container(spec)
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["compile-cache"]["persistentVolumeClaim"] == {"claimName": "sd15-neuron-compile-cache"}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "compile-cache"]
    assert mount == {"name": "compile-cache", "mountPath": "/var/cache/stepfleet/compile"}


def test_the_startup_probe_waits_for_readiness_through_the_warm_up():
    spec = _spec(example(EXAMPLE))  # warmupSeconds 1800
    dep, container = _container(spec)
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/readyz"
    window = startup["failureThreshold"] * startup["periodSeconds"]
    assert window >= compilation.MODEL_LOAD_ALLOWANCE_S + 1800
    assert window < compilation.MODEL_LOAD_ALLOWANCE_S + 1800 + startup["periodSeconds"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"  # readiness as without compile
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert dep["spec"]["progressDeadlineSeconds"] > window


def test_without_compile_nothing_changes():
    spec = _spec(_obj(compile={"enabled": False}))
    dep, container = _container(spec)
    assert not any(a.startswith(("--compile", "--bucket")) for a in container["command"])
    assert "compile-cache" not in {v["name"] for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["failureThreshold"] == workers.STARTUP_FAILURES
    assert "progressDeadlineSeconds" not in dep["spec"]


def test_unset_buckets_are_left_to_the_worker():
    spec = _spec(_obj(buckets=None, compileCache=None))
    _, container = _container(spec)
    settings = WorkerSettings.from_argv(container["command"][2:])
    assert settings.compile and settings.bucket_rows == "" and settings.bucket_sizes == ""
    assert settings.compile_cache is None


def test_compiled_children_pass_strict_kubernetes_schemas():
    spec = _spec(example(EXAMPLE))
    for manifest in build_all(OWNER, spec, Observed()):
        if manifest["apiVersion"] in {"v1", "apps/v1", "policy/v1", "networking.k8s.io/v1"}:
            kubernetes_validate.validate(manifest, "1.37.0", strict=True)


# --- warm-up in the loop's timing ----------------------------------------------------------------


def test_default_warm_up_is_per_bucket_by_accelerator():
    obj = _obj(compile={"enabled": True})
    spec = _spec(obj)  # 4 rows x 2 sizes on Neuron
    assert compilation.bucket_count(spec, spec.pools[0]) == 8
    assert compilation.warmup_seconds(spec, spec.pools[0]) == 8 * compilation.WARMUP_PER_BUCKET_S["aws-neuron"]
    obj = _obj(compile={"enabled": True}, buckets=None)
    spec = _spec(obj)  # worker default: rows 1, 2, 4, 8 for maxBatch 4; one size
    assert compilation.bucket_rows(spec, spec.pools[0]) == (1, 2, 4, 8)
    assert compilation.warmup_seconds(spec, spec.pools[0]) == 4 * 300


def test_the_policy_plans_with_the_warm_up_in_provisioning_time():
    spec = _spec(example(EXAMPLE))
    (pool,) = policy_spec(spec).pools
    assert pool.provision_s == spec.control_loop.provisioning_seconds + 1800
    off = _spec(_obj(compile={"enabled": False}))
    assert policy_spec(off).pools[0].provision_s == off.control_loop.provisioning_seconds


def test_a_compiling_pod_is_not_short_until_its_warm_up_has_had_time():
    spec = _spec(example(EXAMPLE))
    timeouts = compilation.readiness_timeouts(spec)
    assert timeouts == {"inf2": 900 + 1800}
    now = time.time()
    compiling = [{**pod("sd15-neuron", "inf2", 0), "status": unready_status(1200)}]  # past 900, within 2700
    base = spec.control_loop.readiness_timeout_seconds
    assert observe.shortages_from_unready_pods(compiling, now, 180, base) == {"inf2": pytest.approx(now - 1200, abs=2)}
    assert observe.shortages_from_unready_pods(compiling, now, 180, base, timeouts) == {}
    stuck = [{**pod("sd15-neuron", "inf2", 0), "status": unready_status(2800)}]
    assert observe.shortages_from_unready_pods(stuck, now, 180, base, timeouts) == {"inf2": pytest.approx(now - 2800, abs=2)}
    # 0 still turns the signal off
    off = _obj()
    off["spec"]["controlLoop"]["readinessTimeoutSeconds"] = 0
    assert compilation.readiness_timeouts(_spec(off)) == {"inf2": 0.0}
