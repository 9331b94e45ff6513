"""The Helm chart, rendered by the real helm: lint, schema, RBAC, pod security, CRDs, dashboards."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import kubernetes_validate
import pytest
import yaml
from deploy_helpers import CHART, FULL_VALUES, RELEASE_NAMESPACE, ROOT, helm_template, run

K8S_VERSION = "1.37.0"
BUILTIN_GROUPS = {"v1", "apps/v1", "rbac.authorization.k8s.io/v1", "policy/v1", "networking.k8s.io/v1"}


@pytest.fixture(scope="module")
def default_objects(helm):
    return helm_template(helm)


@pytest.fixture(scope="module")
def full_objects(helm):
    return helm_template(helm, "-f", str(FULL_VALUES))


@pytest.fixture(scope="module")
def cluster_wide_objects(helm):
    return helm_template(helm, "--set", "operator.clusterWide=true")


def _one(objects, kind, name=None):
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def _rules(role) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def test_chart_crds_are_the_generated_crds():
    generated = ROOT / "crds" / "diffusionservices.stepfleet.io.yaml"
    assert (CHART / "crds" / generated.name).read_bytes() == generated.read_bytes(), (
        "charts/stepfleet/crds/ is out of date: cp crds/diffusionservices.stepfleet.io.yaml charts/stepfleet/crds/"
    )
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == [generated.name]


@pytest.mark.parametrize("values", [None, FULL_VALUES], ids=["default", "full"])
def test_helm_lint_strict(helm, values):
    run([helm, "lint", "--strict", str(CHART), *(["-f", str(values)] if values else [])])


@pytest.mark.parametrize("which", ["default_objects", "full_objects", "cluster_wide_objects"])
def test_rendered_builtin_kinds_pass_strict_kubernetes_schemas(request, which):
    objects = request.getfixturevalue(which)
    builtin = [o for o in objects if o["apiVersion"] in BUILTIN_GROUPS]
    assert len(builtin) >= 5
    for obj in builtin:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    others = {o["apiVersion"] for o in objects} - BUILTIN_GROUPS
    assert others <= {"monitoring.coreos.com/v1"}, others


def test_default_render_contents(default_objects):
    kinds = Counter(o["kind"] for o in default_objects)
    # namespaced by default: a Role in the release's namespace, a ClusterRole for cluster-scoped objects only
    assert kinds == Counter({"ServiceAccount": 1, "ClusterRole": 1, "ClusterRoleBinding": 1, "Role": 1,
                             "RoleBinding": 1, "Deployment": 1, "ConfigMap": 1, "NetworkPolicy": 1})
    for obj in default_objects:
        if obj["kind"] not in {"ClusterRole", "ClusterRoleBinding"}:
            assert obj["metadata"]["namespace"] == RELEASE_NAMESPACE


def test_operator_deployment_is_one_recreated_replica_with_pod_security(default_objects):
    dep = _one(default_objects, "Deployment")
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == _one(default_objects, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert container["image"] == "ghcr.io/stepfleet/stepfleet:0.1.0-cpu"
    assert container["command"] == ["stepfleet"]
    assert container["args"][:2] == ["operator", f"--namespace={RELEASE_NAMESPACE}"]
    # The liveness probe asks the endpoint the operator is told to serve.
    liveness = next(a for a in container["args"] if a.startswith("--liveness="))
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "liveness")
    assert liveness == f"--liveness=http://0.0.0.0:{port}/healthz"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "liveness"}
    # ...and serves its metrics on the port named `metrics`, which the ServiceMonitor scrapes.
    metrics = next(a for a in container["args"] if a.startswith("--metrics="))
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
    assert metrics == f"--metrics=http://0.0.0.0:{port}/metrics"
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_operator_args_parse_with_the_real_cli(default_objects, full_objects):
    """The chart passes only flags `stepfleet operator` accepts (kopf.run stubbed out)."""
    for objects, scope in ((default_objects, f"False ['{RELEASE_NAMESPACE}']"), (full_objects, "False ['ml', 'research']")):
        container = _one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
        args = container["args"][1:]
        proc = subprocess.run(
            [sys.executable, "-c",
             "import sys, kopf; from stepfleet.operator import main as m\n"
             "kopf.run = lambda **kw: print('OK', kw['clusterwide'], kw['namespaces'])\n"
             "sys.exit(m.main(sys.argv[1:]))", *args],
            capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"OK {scope}", proc.stdout


# What docs/operator.md ("Permissions the operator needs") lists, plus the control loop's reads.
NAMESPACED = {
    ("stepfleet.io", "diffusionservices"): {"get", "list", "watch", "patch"},
    ("stepfleet.io", "diffusionservices/status"): {"patch"},
    ("apps", "deployments"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "services"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "configmaps"): {"get", "list", "watch", "create", "patch", "delete"},
    ("policy", "poddisruptionbudgets"): {"get", "list", "watch", "create", "patch", "delete"},
    ("monitoring.coreos.com", "servicemonitors"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "events"): {"create"},
    ("", "pods"): {"list"},
    # the router's ServiceAccount, Role and RoleBinding, and the Role's own permission (escalation check)
    ("", "serviceaccounts"): {"get", "list", "watch", "create", "patch", "delete"},
    ("rbac.authorization.k8s.io", "roles"): {"get", "list", "watch", "create", "patch", "delete"},
    ("rbac.authorization.k8s.io", "rolebindings"): {"get", "list", "watch", "create", "patch", "delete"},
    ("discovery.k8s.io", "endpointslices"): {"get", "list", "watch"},
    # each fleet's NetworkPolicy (only the router, the operator and the scraper reach workers)
    ("networking.k8s.io", "networkpolicies"): {"get", "list", "watch", "create", "patch", "delete"},
}
# Only a cluster-wide operator scans namespaces and CRDs (kopf's scanning is off with exact namespaces).
SCANNING = {
    ("", "namespaces"): {"list", "watch"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
}
CLUSTER = {
    ("karpenter.sh", "nodepools"): {"get", "list", "create", "patch", "delete"},
    ("karpenter.sh", "nodeclaims"): {"list"},
    ("", "events"): {"list"},  # Karpenter's Events on NodeClaims, listed cluster-wide by the control loop
}


def test_rbac_cluster_wide_only_when_asked_is_exactly_what_the_operator_needs(cluster_wide_objects):
    role = _one(cluster_wide_objects, "ClusterRole")
    expected = {**SCANNING, **CLUSTER, **NAMESPACED, ("", "events"): {"create", "list"}}
    assert _rules(role) == expected
    assert not [o for o in cluster_wide_objects if o["kind"] in {"Role", "RoleBinding"}]
    binding = _one(cluster_wide_objects, "ClusterRoleBinding")
    sa = _one(cluster_wide_objects, "ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": RELEASE_NAMESPACE}]
    args = _one(cluster_wide_objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--all-namespaces" in args and not any(a.startswith("--namespace") for a in args)


def test_rbac_by_default_is_a_role_in_the_release_namespace(default_objects):
    # nothing namespaced is granted cluster-wide: no Deployments, Roles, ... in kube-system
    assert _rules(_one(default_objects, "ClusterRole")) == CLUSTER
    role = _one(default_objects, "Role")
    assert role["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert _rules(role) == NAMESPACED
    binding = _one(default_objects, "RoleBinding")
    assert binding["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}


def test_cluster_wide_with_namespaces_is_refused(helm):
    proc = run([helm, "template", "sf", str(CHART), "--set", "operator.clusterWide=true",
                "--set", "operator.watchNamespaces[0]=ml"], check=False)
    assert proc.returncode != 0 and "clusterWide" in proc.stderr, proc.stderr


def test_rbac_can_be_narrowed_to_reconcile_only(helm):
    objects = helm_template(helm, "--set", "controlLoop.rbac=false", "--set", "karpenter.rbac=false",
                            "--set", "operator.clusterWide=true")
    rules = _rules(_one(objects, "ClusterRole"))
    assert ("", "pods") not in rules and ("karpenter.sh", "nodepools") not in rules
    assert ("karpenter.sh", "nodeclaims") not in rules
    assert rules[("", "events")] == {"create"}
    # namespaced and reconcile only: nothing cluster-wide at all
    objects = helm_template(helm, "--set", "controlLoop.rbac=false", "--set", "karpenter.rbac=false")
    assert not [o for o in objects if o["kind"] in {"ClusterRole", "ClusterRoleBinding"}]
    assert ("", "pods") not in _rules(_one(objects, "Role"))


def test_every_rbac_rule_is_justified_by_a_comment():
    for name in ("_rbac.tpl", "rbac.yaml"):
        lines = (CHART / "templates" / name).read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip().startswith("- apiGroups:"):
                before = next(p.strip() for p in reversed(lines[:i]) if not p.strip().startswith("{{"))
                assert before.startswith("#"), f"{name}:{i + 1}: rule without a comment saying why"


def test_no_wildcards_and_no_secrets(default_objects, full_objects, cluster_wide_objects):
    # Secrets reach fleets as volumes the kubelet mounts: the operator never reads one.
    for obj in default_objects + full_objects + cluster_wide_objects:
        for rule in obj.get("rules", []):
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
            assert "secrets" not in rule["resources"]
            assert not {"update", "deletecollection", "escalate", "bind", "impersonate"} & set(rule["verbs"])


def test_dashboards_are_configmaps_for_the_grafana_sidecar(default_objects, full_objects):
    files = sorted((CHART / "dashboards").glob("*.json"))
    assert files
    for objects, namespace in ((default_objects, RELEASE_NAMESPACE), (full_objects, "monitoring")):
        maps = [o for o in objects if o["kind"] == "ConfigMap"]
        assert len(maps) == len(files)
        for cm in maps:
            assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
            assert cm["metadata"]["namespace"] == namespace
            ((key, text),) = cm["data"].items()
            assert json.loads(text) == json.loads((CHART / "dashboards" / key).read_text())


def test_service_monitor_scrapes_the_operator_metrics_port(full_objects):
    sm = _one(full_objects, "ServiceMonitor")
    svc = _one(full_objects, "Service")
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [RELEASE_NAMESPACE]}
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    pod = _one(full_objects, "Deployment")["spec"]["template"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert "metrics" in {p["name"] for p in pod["spec"]["containers"][0]["ports"]}


def test_prometheus_rule_carries_the_checked_rules_file(full_objects, promtool, tmp_path):
    rule = _one(full_objects, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((CHART / "rules" / "stepfleet.rules.yaml").read_text())
    rendered = tmp_path / "rendered.rules.yaml"
    rendered.write_text(yaml.safe_dump(rule["spec"]))
    run([promtool, "check", "rules", str(rendered)])


def _peer(namespace, labels=None):
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "podSelector": {"matchLabels": labels} if labels else {}}


def test_operator_network_policy_admits_only_the_scraper_to_the_metrics_port(default_objects, full_objects):
    for objects in (default_objects, full_objects):
        policy = _one(objects, "NetworkPolicy")
        pod = _one(objects, "Deployment")["spec"]["template"]
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert _one(default_objects, "NetworkPolicy")["spec"]["ingress"] == []  # no scraper named: nobody
    (rule,) = _one(full_objects, "NetworkPolicy")["spec"]["ingress"]
    assert rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert rule["from"] == [_peer("monitoring", {"app.kubernetes.io/name": "prometheus"}), _peer("observability")]


def test_fleets_admit_the_operator_and_the_scraper_to_their_workers(default_objects, full_objects):
    """The chart tells the operator who it is and who scrapes; every fleet's NetworkPolicy admits them."""
    from stepfleet.operator.children import Observed, Owner
    from stepfleet.operator.children.network import workers_policy
    from stepfleet.operator.main import metrics_peer
    from stepfleet.operator.models import DiffusionServiceSpec

    spec = DiffusionServiceSpec.model_validate(yaml.safe_load((ROOT / "docs/examples/cpu-fleet.yaml").read_text())["spec"])
    for objects, expected_scrapers in ((default_objects, []), (full_objects, [
            _peer("monitoring", {"app.kubernetes.io/name": "prometheus"}), _peer("observability")])):
        dep = _one(objects, "Deployment")
        args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        peers = tuple(metrics_peer(a.split("=", 1)[1]) for a in args if a.startswith("--metrics-from="))
        policy = workers_policy(Owner("tiny", "ml", "u"), spec, Observed(metrics_peers=peers).metrics_peers)
        _, scrapers = policy["spec"]["ingress"]
        operator_pod = dep["spec"]["template"]["metadata"]["labels"]
        me, *rest = scrapers["from"]
        assert me["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": RELEASE_NAMESPACE}
        assert me["podSelector"]["matchLabels"].items() <= operator_pod.items()
        assert rest == expected_scrapers


@pytest.mark.parametrize(
    "override",
    [
        "securityContext.readOnlyRootFilesystem=false",
        "podSecurityContext.runAsNonRoot=false",
        "operator.livenessPort=0",
        "operator.watchNamespaces[0]=Not_A_Namespace",
        "networkPolicy.metricsFrom[0].podLabels.app=prometheus",  # a peer without a namespace
        "unknownKey=1",
    ],
)
def test_values_schema_rejects_unsafe_or_unknown_values(helm, override):
    proc = run([helm, "template", "sf", str(CHART), "--set", override], check=False)
    assert proc.returncode != 0 and "schema" in proc.stderr.lower(), proc.stderr
