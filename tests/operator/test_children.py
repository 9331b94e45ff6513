"""Pure child builders: every manifest valid for Kubernetes, and the fields the issue asks for."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml
from k8s_helpers import example

from stepfleet.operator import names
from stepfleet.operator.children import Observed, Owner, build_all, router, workers
from stepfleet.operator.validation import validate
from stepfleet.serving.settings import WorkerSettings

K8S_VERSION = "1.37.0"
OWNER = Owner(name="sd15", namespace="ml", uid="0b5a2f8e-1111-2222-3333-444455556666")


def _spec(obj):
    spec, problems = validate(obj["metadata"]["name"], obj["spec"])
    assert not problems, problems
    return spec


def _by_kind(manifests):
    out: dict[tuple[str, str], dict] = {}
    for m in manifests:
        out[(m["kind"], m["metadata"]["name"])] = m
    return out


@pytest.mark.parametrize("name", ["three-pool-fleet.yaml", "cpu-fleet.yaml"])
def test_builtin_children_pass_strict_kubernetes_schemas(name):
    obj = example(name)
    owner = Owner(name=obj["metadata"]["name"], namespace="ml", uid="u-1")
    manifests = build_all(owner, _spec(obj), Observed(servicemonitor_available=True))
    builtin = [m for m in manifests if m["apiVersion"] in {"v1", "apps/v1", "policy/v1", "rbac.authorization.k8s.io/v1",
                                                           "networking.k8s.io/v1"}]
    assert len(builtin) == len(manifests) - sum(1 for m in manifests if m["apiVersion"].startswith(("karpenter", "monitoring")))
    for manifest in builtin:
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def test_three_pool_fleet_children():
    spec = _spec(example("three-pool-fleet.yaml"))
    kids = _by_kind(build_all(OWNER, spec, Observed()))
    assert set(kids) == {
        ("ConfigMap", "sd15-router"), ("Service", "sd15-router"), ("Deployment", "sd15-router"),
        ("ServiceAccount", "sd15-router"), ("Role", "sd15-router"), ("RoleBinding", "sd15-router"),
        *[(k, f"sd15-{p}") for p in ("l4", "inf2", "tpu-v5e") for k in ("Deployment", "Service", "PodDisruptionBudget")],
        ("NodePool", "ml-sd15-l4"), ("NodePool", "ml-sd15-inf2"), ("NetworkPolicy", "sd15-workers"),
    }  # no ServiceMonitor: the API is not there
    for (kind, _), m in kids.items():
        if kind != "NodePool":
            assert m["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
            assert m["metadata"]["ownerReferences"][0]["controller"] is True
        else:
            assert "ownerReferences" not in m["metadata"] and "namespace" not in m["metadata"]


def test_gpu_worker_deployment_fields():
    spec = _spec(example("three-pool-fleet.yaml"))
    dep = workers.deployment(OWNER, spec, spec.pools[0], Observed())
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"][:2] == ["stepfleet", "worker"]
    args = dict(zip(c["command"][2::2], c["command"][3::2], strict=True))
    assert args == {
        "--model": "stable-diffusion-v1-5/stable-diffusion-v1-5", "--family": "sd15", "--device": "cuda",
        "--dtype": "float16", "--pool": "l4", "--host": "0.0.0.0", "--port": "8001", "--max-batch": "8",
        "--template-cache-bytes": "2147483648", "--worker-token-file": "/var/run/stepfleet/worker-token/token",
    }
    assert {e["name"] for e in c["env"]} == {"HF_HOME"}  # every worker setting is in the command
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"karpenter.sh/nodepool": "ml-sd15-l4"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "8001"
    assert dep["spec"]["replicas"] == 1
    assert c["image"].endswith("-cuda")


def test_neuron_and_tpu_placement():
    spec = _spec(example("three-pool-fleet.yaml"))
    inf2 = workers.deployment(OWNER, spec, spec.pools[1], Observed())["spec"]["template"]["spec"]
    assert inf2["containers"][0]["resources"]["limits"]["aws.amazon.com/neuron"] == "1"
    assert "--device" in inf2["containers"][0]["command"] and "neuron" in inf2["containers"][0]["command"]
    tpu = workers.deployment(OWNER, spec, spec.pools[2], Observed())["spec"]["template"]["spec"]
    assert tpu["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
        "cloud.google.com/gke-tpu-topology": "1x1",
    }
    assert tpu["containers"][0]["resources"]["limits"]["google.com/tpu"] == "1"
    assert "xla" in tpu["containers"][0]["command"]


def test_cpu_pool_has_no_device_request_or_toleration():
    spec = _spec(example("cpu-fleet.yaml"))
    pod = workers.deployment(OWNER, spec, spec.pools[0], Observed())["spec"]["template"]["spec"]
    assert set(pod["containers"][0]["resources"]["limits"]) == {"memory"}
    assert "tolerations" not in pod
    assert pod["containers"][0]["command"][3] == "tiny-sd"


def test_pvc_source_is_mounted_read_only():
    obj = example("cpu-fleet.yaml")
    obj["spec"]["model"]["source"] = "pvc://models/sd15/v1"
    dep = workers.deployment(OWNER, _spec(obj), _spec(obj).pools[0], Observed())
    pod = dep["spec"]["template"]["spec"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod["volumes"]
    assert pod["containers"][0]["command"][3] == "/models/sd15/v1"
    kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def test_replicas_follow_control_loop_within_bounds():
    spec = _spec(example("three-pool-fleet.yaml"))
    l4 = spec.pools[0]  # min 1, max 8
    assert workers.deployment(OWNER, spec, l4, Observed(replicas={"l4": 5}))["spec"]["replicas"] == 5
    assert workers.deployment(OWNER, spec, l4, Observed(replicas={"l4": 50}))["spec"]["replicas"] == 8
    assert workers.deployment(OWNER, spec, l4, Observed(replicas={"l4": 0}))["spec"]["replicas"] == 1


def test_router_config_format_and_weights():
    spec = _spec(example("three-pool-fleet.yaml"))
    cm = router.configmap(OWNER, spec, Observed())
    cfg = router.parse_config(cm["data"]["router.yaml"])
    assert cfg["version"] == 1 and cfg["service"] == "sd15"
    pools = {p["name"]: p for p in cfg["pools"]}
    assert pools["l4"]["url"] == "http://sd15-l4.ml.svc.cluster.local:8001"
    # min replicas 1, 1, 0 -> the scale-to-zero TPU pool starts without traffic
    assert pools["l4"]["weight"] == pools["inf2"]["weight"] == 0.5 and pools["tpu-v5e"]["weight"] == 0
    kept = router.config(OWNER, spec, Observed(weights={"l4": 0.2, "inf2": 0.3, "tpu-v5e": 0.5}))
    assert [p["weight"] for p in kept["pools"]] == [0.2, 0.3, 0.5]
    reset = router.config(OWNER, spec, Observed(weights={"l4": 1.0}))  # pool set changed
    assert [p["weight"] for p in reset["pools"]] == [0.5, 0.5, 0.0]
    # the loop's decisions (router.yaml's `control`) are carried over like the weights
    assert "control" not in cfg
    control = {"mode": "cost", "decisions": [{"at": 1.0, "reasons": ["cheapest first"]}]}
    assert router.config(OWNER, spec, Observed(control=control))["control"] == control
    dep = router.deployment(OWNER, spec)
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["command"][:8] == ["stepfleet", "router", "--config", "/etc/stepfleet/router.yaml",
                                "--host", "0.0.0.0", "--port", str(c["ports"][0]["containerPort"])]
    assert dep["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] == "sd15-router"
    assert yaml.safe_load(cm["data"]["router.yaml"]) == cfg


def test_nodepool_requirements_limits_and_labels():
    spec = _spec(example("three-pool-fleet.yaml"))
    kids = _by_kind(build_all(OWNER, spec, Observed()))
    l4 = kids[("NodePool", "ml-sd15-l4")]
    reqs = {r["key"]: r["values"] for r in l4["spec"]["template"]["spec"]["requirements"]}
    assert reqs["karpenter.k8s.aws/instance-gpu-name"] == ["l4"]
    assert reqs["karpenter.k8s.aws/instance-family"] == ["g6"]
    assert reqs["karpenter.sh/capacity-type"] == ["on-demand"]
    assert l4["spec"]["limits"] == {"nvidia.com/gpu": "8"}
    assert l4["spec"]["template"]["spec"]["taints"] == [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]
    assert l4["metadata"]["labels"][names.LABEL_OWNER_NAMESPACE] == "ml"
    assert l4["metadata"]["labels"][names.LABEL_OWNER_NAME] == "sd15"
    inf2 = kids[("NodePool", "ml-sd15-inf2")]
    reqs = {r["key"]: r["values"] for r in inf2["spec"]["template"]["spec"]["requirements"]}
    assert reqs["karpenter.k8s.aws/instance-family"] == ["inf2"]  # from the chip name
    assert reqs["node.kubernetes.io/instance-type"] == ["inf2.xlarge"]


def test_servicemonitor_only_when_api_available():
    spec = _spec(example("cpu-fleet.yaml"))
    kinds = [m["kind"] for m in build_all(OWNER, spec, Observed(servicemonitor_available=True))]
    assert kinds.count("ServiceMonitor") == 1
    sm = next(m for m in build_all(OWNER, spec, Observed(servicemonitor_available=True)) if m["kind"] == "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == "http"
    svc = workers.service(OWNER, spec.pools[0])
    assert all(svc["metadata"]["labels"][k] == v for k, v in sm["spec"]["selector"]["matchLabels"].items())


def test_model_or_image_change_changes_pod_template():
    obj = example("cpu-fleet.yaml")
    before = workers.deployment(OWNER, _spec(obj), _spec(obj).pools[0], Observed())["spec"]["template"]
    obj["spec"]["model"]["source"] = "hf://segmind/tiny-sd"
    after_model = workers.deployment(OWNER, _spec(obj), _spec(obj).pools[0], Observed())["spec"]["template"]
    obj["spec"]["serving"]["image"] = "registry.example/stepfleet:dev"
    after_image = workers.deployment(OWNER, _spec(obj), _spec(obj).pools[0], Observed())["spec"]["template"]
    assert before != after_model != after_image
    assert after_image["spec"]["containers"][0]["image"] == "registry.example/stepfleet:dev"


def test_the_router_may_only_read_endpointslices_under_its_own_service_account():
    kids = _by_kind(build_all(OWNER, _spec(example("three-pool-fleet.yaml")), Observed()))
    pod = kids[("Deployment", "sd15-router")]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "sd15-router" and pod["automountServiceAccountToken"] is True
    role, binding = kids[("Role", "sd15-router")], kids[("RoleBinding", "sd15-router")]
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["get", "list", "watch"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "sd15-router"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "sd15-router", "namespace": OWNER.namespace}]
    # Worker pods still get no API token.
    assert kids[("Deployment", "sd15-l4")]["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def _pool_settings(obj, pool: int = 0) -> WorkerSettings:
    """The spec → the pool's Deployment → its container's command → what the worker parses."""
    spec = _spec(obj)
    dep = workers.deployment(OWNER, spec, spec.pools[pool], Observed())
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["stepfleet", "worker"]
    return WorkerSettings.from_argv(container["command"][2:])


@pytest.mark.parametrize(
    "model, pool, expect",
    [
        ({"source": "hf://org/sdxl-base", "family": "sdxl", "dtype": "bfloat16", "revision": "v1.0"}, 0,
         {"model": "org/sdxl-base", "family": "sdxl", "dtype": "bfloat16", "revision": "v1.0", "device": "cuda",
          "pool": "l4", "max_batch": 8}),
        ({"source": "hf://org/sd2", "family": "sd2", "revision": "3f1c9a0"}, 1,
         {"model": "org/sd2", "family": "sd2", "dtype": "float16", "revision": "3f1c9a0", "device": "neuron",
          "pool": "inf2"}),
        ({"source": "hf://stable-diffusion-v1-5/stable-diffusion-v1-5"}, 2,  # defaults: sd15, float16
         {"family": "sd15", "dtype": "float16", "revision": None, "device": "xla", "pool": "tpu-v5e"}),
        # a revision names a Hub commit (validation refuses one for other sources)
        ({"source": "pvc://models/sd15/v1"}, 0, {"model": "/models/sd15/v1", "revision": None}),
        ({"source": "builtin://tiny-sd", "family": "sd15"}, 1, {"model": "tiny-sd", "revision": None}),
        ({"source": "builtin://tiny-sdxl", "family": "sdxl"}, 1, {"model": "tiny-sdxl", "family": "sdxl"}),
    ],
)
def test_worker_reads_back_what_the_spec_asks(model, pool, expect):
    obj = example("three-pool-fleet.yaml")
    obj["spec"]["model"] = model
    obj["spec"]["pools"][0]["maxBatch"] = 8
    settings = _pool_settings(obj, pool)
    assert {k: getattr(settings, k) for k in expect} == expect
    assert settings.host == "0.0.0.0" and settings.port == names.WORKER_PORT
    spec = _spec(obj)
    assert settings.template_cache_bytes == spec.serving.template_cache_bytes
    assert settings == workers.worker_settings(spec, spec.pools[pool])


def test_cpu_pools_run_float32_whatever_the_spec_says():
    obj = example("cpu-fleet.yaml")
    obj["spec"]["model"]["dtype"] = "float16"
    obj["spec"]["serving"]["maxBatch"] = 3
    settings = _pool_settings(obj, 1)
    assert (settings.dtype, settings.device, settings.pool, settings.max_batch) == ("float32", "cpu", "spot", 3)
    assert (settings.model, settings.family) == ("tiny-sd", "sd15")
