"""Issue 19 on the operator's side: API keys and the worker token come from Secrets the
kubelet mounts, and a NetworkPolicy lets only the router and named scrapers reach workers."""

from __future__ import annotations

import kubernetes_validate
from k8s_helpers import example

from stepfleet.operator.children import Observed, Owner, build_all, router, workers
from stepfleet.operator.children.network import workers_policy
from stepfleet.operator.main import metrics_peer, watched_namespaces
from stepfleet.operator.models import NetworkPeer
from stepfleet.operator.validation import validate
from stepfleet.serving.settings import WorkerSettings

K8S_VERSION = "1.37.0"
OWNER = Owner(name="sd15", namespace="ml", uid="u-1")


def _spec(security=None, name="three-pool-fleet.yaml"):
    obj = example(name)
    if security is not None:
        obj["spec"]["security"] = security
    spec, problems = validate(obj["metadata"]["name"], obj["spec"])
    assert not problems, problems
    return spec


def _pod(manifest):
    return manifest["spec"]["template"]["spec"]


def test_worker_token_is_mounted_in_every_worker_and_read_through_its_flag():
    spec = _spec({"workerToken": {"name": "tok", "key": "shared"}})
    for pool in spec.pools:
        dep = workers.deployment(OWNER, spec, pool, Observed())
        pod = _pod(dep)
        (volume,) = [v for v in pod["volumes"] if v["name"] == "worker-token"]
        assert volume["secret"] == {"secretName": "tok", "defaultMode": 0o440,
                                    "items": [{"key": "shared", "path": "token"}]}
        (c,) = pod["containers"]
        mount = next(m for m in c["volumeMounts"] if m["name"] == "worker-token")
        assert mount == {"name": "worker-token", "mountPath": "/var/run/stepfleet/worker-token", "readOnly": True}
        # the worker parses its command back: the token file is in the mounted directory
        settings = WorkerSettings.from_argv(c["command"][2:])
        assert settings.worker_token_file == "/var/run/stepfleet/worker-token/token"
        assert not any(e["name"] == "STEPFLEET_WORKER_TOKEN" for e in c["env"])  # a file, not the environment
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def test_router_gets_the_api_keys_file_and_the_token():
    spec = _spec({"apiKeys": {"name": "keys"}, "workerToken": {"name": "tok"}})
    dep = router.deployment(OWNER, spec)
    pod = _pod(dep)
    (c,) = pod["containers"]
    flags = dict(zip(c["command"][8::2], c["command"][9::2], strict=True))
    assert flags == {"--api-keys-file": "/var/run/stepfleet/api-keys/api-keys",
                     "--worker-token-file": "/var/run/stepfleet/worker-token/token"}
    secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    assert secrets["api-keys"]["secretName"] == "keys"
    assert secrets["api-keys"]["items"] == [{"key": "api-keys", "path": "api-keys"}]  # the default key
    assert secrets["worker-token"]["items"] == [{"key": "token", "path": "token"}]
    # directory mounts (no subPath), so the kubelet refreshes the keys file when the Secret changes
    assert all("subPath" not in m for m in c["volumeMounts"])
    kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def test_without_secrets_nothing_is_mounted_and_the_router_is_open():
    spec = _spec(name="cpu-fleet.yaml")
    c = _pod(router.deployment(OWNER, spec))["containers"][0]
    assert "--api-keys-file" not in c["command"] and "--worker-token-file" not in c["command"]
    w = _pod(workers.deployment(OWNER, spec, spec.pools[0], Observed()))
    assert not any("secret" in v for v in w["volumes"])
    assert "--worker-token-file" not in w["containers"][0]["command"]


def test_network_policy_admits_the_router_the_operator_and_the_scrapers_on_the_worker_port_only():
    spec = _spec({"metricsFrom": [{"namespace": "monitoring", "podLabels": {"app.kubernetes.io/name": "prometheus"}}]})
    operator = NetworkPeer(namespace="stepfleet-system", pod_labels={"app.kubernetes.io/component": "operator"})
    kids = {(m["kind"], m["metadata"]["name"]): m
            for m in build_all(OWNER, spec, Observed(metrics_peers=(operator,)))}
    policy = kids[("NetworkPolicy", "sd15-workers")]
    kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
    assert policy["spec"]["policyTypes"] == ["Ingress"]  # egress stays open (model downloads)
    selected = policy["spec"]["podSelector"]["matchLabels"]
    # it guards every worker pod of every pool, and no router pod
    for pool in spec.pools:
        labels = kids[("Deployment", f"sd15-{pool.name}")]["spec"]["template"]["metadata"]["labels"]
        assert selected.items() <= labels.items()
    router_labels = kids[("Deployment", "sd15-router")]["spec"]["template"]["metadata"]["labels"]
    assert not selected.items() <= router_labels.items()
    from_router, from_scrapers = policy["spec"]["ingress"]
    assert from_router["from"] == [{"podSelector": {"matchLabels": kids[("Deployment", "sd15-router")]["spec"]
                                                    ["selector"]["matchLabels"]}}]
    assert from_scrapers["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "stepfleet-system"}},
         "podSelector": {"matchLabels": {"app.kubernetes.io/component": "operator"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
         "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}},
    ]
    for rule in policy["spec"]["ingress"]:
        assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]  # the worker container's port name


def test_network_policy_without_scrapers_admits_the_router_alone_and_can_be_turned_off():
    spec = _spec(name="cpu-fleet.yaml")
    policy = workers_policy(OWNER, spec)
    assert len(policy["spec"]["ingress"]) == 1
    off = _spec({"networkPolicy": False}, name="cpu-fleet.yaml")
    assert "NetworkPolicy" not in {m["kind"] for m in build_all(OWNER, off, Observed())}


def test_a_scraper_in_the_services_own_namespace_and_every_pod_of_a_namespace():
    spec = _spec({"metricsFrom": [{"podLabels": {"app": "vm-agent"}}, {"namespace": "monitoring"}]})
    (_, scrapers) = workers_policy(OWNER, spec)["spec"]["ingress"]
    assert scrapers["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ml"}},
         "podSelector": {"matchLabels": {"app": "vm-agent"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}, "podSelector": {}},
    ]


def test_operator_flags_for_peers_and_namespaces(monkeypatch):
    peer = metrics_peer("stepfleet-system:app.kubernetes.io/instance=sf,app.kubernetes.io/component=operator")
    assert peer == NetworkPeer(namespace="stepfleet-system", pod_labels={
        "app.kubernetes.io/instance": "sf", "app.kubernetes.io/component": "operator"})
    assert metrics_peer("monitoring") == NetworkPeer(namespace="monitoring")
    for bad in ("Not_A_NS", "monitoring:app"):
        try:
            metrics_peer(bad)
        except ValueError as exc:
            assert bad in str(exc)
        else:
            raise AssertionError(f"{bad!r} accepted")
    # namespaced unless asked: the given namespaces, else the operator's own
    monkeypatch.setenv("POD_NAMESPACE", "stepfleet-system")
    assert watched_namespaces([], False) == ["stepfleet-system"]
    assert watched_namespaces(["ml"], False) == ["ml"]
    assert watched_namespaces([], True) == []
    monkeypatch.delenv("POD_NAMESPACE")
    assert watched_namespaces([], False) == ["default"]
