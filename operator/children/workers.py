"""A worker pool's Deployment, Service and PodDisruptionBudget.

The pod template carries everything that should roll the pool when it changes: image, model,
device backend and counts. Things that should *not* restart workers (router weights) live
elsewhere. Probes are split: `/healthz` for liveness, `/readyz` for readiness, and a
generous startup probe, because loading a diffusion model onto an accelerator (or compiling
it for Neuron or XLA) takes minutes and must not be mistaken for a hung process.
"""

from __future__ import annotations

from typing import Any

from stepfleet.operator import accelerators, compilation, names
from stepfleet.operator.children import secrets
from stepfleet.operator.children.common import (
    CONTAINER_SECURITY,
    POD_SECURITY,
    Manifest,
    Observed,
    Owner,
    http_probe,
    metadata,
    resources,
)
from stepfleet.operator.models import DiffusionServiceSpec, PoolSpec
from stepfleet.operator.validation import ModelSource, parse_source
from stepfleet.serving.adapters.spec import AdapterSpecEntry, render_adapters
from stepfleet.serving.controlnet.spec import ControlNetEntry, render_registry
from stepfleet.serving.settings import WorkerSettings

MODEL_MOUNT = "/models"
CACHE_MOUNT = "/cache"
#: Startup allowance: 60 x 10 s = 10 minutes to load or compile a model before liveness applies.
STARTUP_PERIOD_S, STARTUP_FAILURES = 10, 60

_DEFAULT_RESOURCES = {
    "nvidia-gpu": {"requests": {"cpu": "3", "memory": "12Gi"}, "limits": {"memory": "12Gi"}},
    "aws-neuron": {"requests": {"cpu": "3", "memory": "12Gi"}, "limits": {"memory": "12Gi"}},
    "google-tpu": {"requests": {"cpu": "8", "memory": "32Gi"}, "limits": {"memory": "32Gi"}},
    "cpu": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "4Gi"}},
}


def initial_replicas(pool: PoolSpec, current: int | None) -> int:
    """Replicas to write: keep the control loop's choice, clamped into the spec's bounds."""
    if current is None:
        return pool.min_replicas
    return max(pool.min_replicas, min(pool.max_replicas, current))


def _model_arg(source: ModelSource) -> str:
    if source.scheme == "pvc":
        return f"{MODEL_MOUNT}/{source.location}".rstrip("/")
    # Builtins (`tiny-sd`) and hub ids are passed as-is: the worker resolves both itself.
    return source.location


def _adapter_arg(source: str) -> str:
    """A spec adapter's `--adapters` source: hub sources as they are, a pvc:// path where the model's
    claim is mounted (the spec checks it is that claim)."""
    if source.startswith("pvc://"):
        return f"{MODEL_MOUNT}/" + "/".join(source.removeprefix("pvc://").split("/")[1:])
    return source


def _node_placement(owner: Owner, pool: PoolSpec) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """nodeSelector and tolerations for a pool's pods."""
    acc = pool.accelerator
    mapping = accelerators.DEVICES[acc.type]
    selector: dict[str, str] = {}
    if pool.node_pool is not None:
        selector[accelerators.KARPENTER_NODEPOOL_LABEL] = names.nodepool(owner.namespace, owner.name, pool.name)
    if acc.type == "google-tpu":
        selector[accelerators.TPU_ACCELERATOR_LABEL] = acc.model or ""
        selector[accelerators.TPU_TOPOLOGY_LABEL] = acc.topology or ""
    selector.update(pool.node_selector)
    tolerations: list[dict[str, Any]] = []
    if mapping.taint_key:
        tolerations.append({"key": mapping.taint_key, "operator": "Exists", "effect": "NoSchedule"})
    tolerations += [t.model_dump(by_alias=True, exclude_none=True) for t in pool.tolerations]
    return selector, tolerations


#: Settings the operator writes into every worker's command even where they equal the worker's
#: defaults: they come from the spec (or must match the pod's ports), so a later change of a
#: worker default must not change what a pool runs.
EXPLICIT_SETTINGS = ("model", "host", "port", "max_batch", "device", "pool", "template_cache_bytes", "family",
                     "dtype", "revision")


def worker_settings(spec: DiffusionServiceSpec, pool: PoolSpec) -> WorkerSettings:
    """What a pool's workers run with: the contract with the data plane, as one typed value."""
    source = parse_source(spec.model.source)
    assert not isinstance(source, str), "validated before building"
    token = secrets.worker_token(spec.security)
    return WorkerSettings(
        model=_model_arg(source),
        # Revisions name Hub commits; a built-in or a directory on a claim has none (validation
        # refuses one there, and nothing would read it).
        revision=spec.model.revision if source.scheme == "hf" else None,
        family=spec.model.family,
        device=accelerators.DEVICES[pool.accelerator.type].backend,
        dtype="float32" if pool.accelerator.type == "cpu" else spec.model.dtype,
        pool=pool.name,
        # The image's default command listens on all addresses too; a pod's `command` replaces it.
        host="0.0.0.0",
        port=names.WORKER_PORT,
        max_batch=pool.max_batch or spec.serving.max_batch,
        template_cache_bytes=spec.serving.template_cache_bytes,
        controlnets=render_registry([ControlNetEntry(c.name, c.worker_source(), c.kind) for c in spec.controlnets]),
        controlnet_placement=pool.controlnet_placement or spec.serving.controlnet_placement,
        max_controlnets=spec.serving.max_controlnets,
        adapters=render_adapters([AdapterSpecEntry(a.name, _adapter_arg(a.source), a.preload)
                                  for a in spec.adapters]),
        slo_image_s=spec.slo.image,
        slo_video_s=spec.slo.video,
        # The router's token (a mounted Secret): without it a worker answers 401 to the API.
        worker_token_file=token.path if token is not None else None,
        # Compiled pools (issue 20): --compile and its backend, mode, buckets and cache directory.
        **compilation.worker_fields(spec),
    )


def worker_command(spec: DiffusionServiceSpec, pool: PoolSpec) -> list[str]:
    """The worker's argv: `stepfleet worker` and the flags `WorkerSettings.from_argv` reads back."""
    always = EXPLICIT_SETTINGS + (compilation.EXPLICIT_COMPILE_SETTINGS if compilation.enabled(spec) else ())
    return ["stepfleet", "worker", *worker_settings(spec, pool).to_argv(always=always)]


def startup_probe(spec: DiffusionServiceSpec, pool: PoolSpec) -> dict[str, Any]:
    """Hold liveness off until the worker is up, and a compiled worker until it is ready.

    An uncompiled worker's `/healthz` answers while the model loads, so it ends the startup
    phase at once. A compiled worker probes `/readyz` instead, with `failures x period`
    covering the model load plus the pool's warm-up (`compilation.warmup_seconds`): while it
    compiles, a `/healthz` slowed past the probe's timeout must not get it killed. A worker
    whose compile failed is restarted after that window (its error reaches the status first).
    """
    if not compilation.enabled(spec):
        return http_probe("/healthz", period=STARTUP_PERIOD_S, failures=STARTUP_FAILURES)
    failures = max(STARTUP_FAILURES, compilation.startup_failures(spec, pool, STARTUP_PERIOD_S))
    return http_probe("/readyz", period=STARTUP_PERIOD_S, failures=failures)


def deployment(owner: Owner, spec: DiffusionServiceSpec, pool: PoolSpec, observed: Observed) -> Manifest:
    acc = pool.accelerator
    mapping = accelerators.DEVICES[acc.type]
    source = parse_source(spec.model.source)
    assert not isinstance(source, str), "validated before building"
    name = names.worker(owner.name, pool.name)
    labels = names.worker_labels(owner.name, pool.name)
    selector, tolerations = _node_placement(owner, pool)

    res = resources(pool.resources, _DEFAULT_RESOURCES[acc.type])
    resource_name = acc.resource_name or mapping.resource_name
    if resource_name and acc.devices:
        res.setdefault("requests", {})[resource_name] = str(acc.devices)
        res.setdefault("limits", {})[resource_name] = str(acc.devices)

    # Only what something in the container reads (the Hugging Face libraries): every worker
    # setting travels in the command, where `WorkerSettings` parses it.
    env = [{"name": "HF_HOME", "value": f"{CACHE_MOUNT}/hf"}]

    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": CACHE_MOUNT},
    ]
    token = secrets.worker_token(spec.security)
    if token is not None:
        volumes.append(token.volume)
        mounts.append(token.mount)
    if source.scheme == "pvc":
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": source.claim, "readOnly": True}})
        mounts.append({"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True})
    if compilation.enabled(spec) and spec.serving.compile_cache is not None:
        # Read-write and shared: the first replica to compile a bucket fills it for the others.
        claim = spec.serving.compile_cache.claim_name
        volumes.append({"name": compilation.COMPILE_CACHE_VOLUME, "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": compilation.COMPILE_CACHE_VOLUME, "mountPath": compilation.COMPILE_CACHE_MOUNT})

    container: dict[str, Any] = {
        "name": "worker",
        "image": pool.image or spec.serving.image or names.default_image(mapping.image_flavour),
        "imagePullPolicy": "IfNotPresent",
        "command": worker_command(spec, pool),
        "ports": [{"name": "http", "containerPort": names.WORKER_PORT, "protocol": "TCP"}],
        "env": env,
        "resources": res,
        "readinessProbe": http_probe("/readyz", period=5, failures=3),
        "livenessProbe": http_probe("/healthz", period=10, failures=6),
        "startupProbe": startup_probe(spec, pool),
        "securityContext": dict(CONTAINER_SECURITY),
        "volumeMounts": mounts,
    }
    pod_spec: dict[str, Any] = {
        "securityContext": dict(POD_SECURITY),
        "terminationGracePeriodSeconds": 60,
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "containers": [container],
        "volumes": volumes,
    }
    if selector:
        pod_spec["nodeSelector"] = selector
    if tolerations:
        pod_spec["tolerations"] = tolerations
    deployment_spec: dict[str, Any] = {}
    if compilation.enabled(spec):
        # A rollout whose new pod compiles for longer than the default 600 s is not stalled.
        window = container["startupProbe"]["failureThreshold"] * STARTUP_PERIOD_S
        deployment_spec["progressDeadlineSeconds"] = max(600, window + 60)

    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(owner, name, labels),
        "spec": {
            "replicas": initial_replicas(pool, observed.replicas.get(pool.name)),
            "selector": {"matchLabels": names.worker_selector(owner.name, pool.name)},
            # Surge one at a time and never drop below the current count: accelerators are scarce
            # and a new replica spends minutes loading the model before it can serve.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            **deployment_spec,
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(names.WORKER_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def service(owner: Owner, pool: PoolSpec) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(owner, names.worker(owner.name, pool.name), names.worker_labels(owner.name, pool.name)),
        "spec": {
            "type": "ClusterIP",
            "selector": names.worker_selector(owner.name, pool.name),
            "ports": [{"name": "http", "port": names.WORKER_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def disruption_budget(owner: Owner, pool: PoolSpec) -> Manifest:
    """At most one worker of a pool voluntarily evicted at a time (node drains, consolidation)."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(owner, names.worker(owner.name, pool.name), names.worker_labels(owner.name, pool.name)),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": names.worker_selector(owner.name, pool.name)},
        },
    }


def pool_url(owner: Owner, pool_name: str) -> str:
    """In-cluster URL of a pool's Service (what the router dials)."""
    return f"http://{names.worker(owner.name, pool_name)}.{owner.namespace}.svc.cluster.local:{names.WORKER_PORT}"
