"""The `DiffusionService` contract as pydantic models: the single source of truth.

The CRD's OpenAPI schema (`stepfleet crds`) is generated from these models, and the operator
parses every object it sees through them. Doing both from one definition means the schema
the API server enforces and the checks the operator makes can never drift apart; the
operator still re-validates, because an object can reach it without passing the current
schema (an older CRD version, an API server without CEL, or a test emulator).

Field names are camelCase on the wire (Kubernetes convention) and snake_case in Python.
Defaults live here, not in the CRD: the API server never bakes them into stored objects,
so a newer operator can change a default without a storage migration.

This module imports neither kopf nor kubernetes, so the policy and the simulator may use it
(nor torch: the list of model families comes from `stepfleet.serving.backbones`' torch-free
top level).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from stepfleet.serving.backbones import FAMILIES
from stepfleet.serving.controlnet import BUILTIN_BASES, KINDS, PLACEMENTS

API_GROUP = "stepfleet.io"
API_VERSION = "v1alpha1"
KIND = "DiffusionService"
PLURAL = "diffusionservices"
SINGULAR = "diffusionservice"
SHORT_NAMES = ("dfs",)

#: Upper bound on pools per service; keeps CEL list rules within the API server's cost budget.
MAX_POOLS = 16

#: Families a worker has a backbone for (the data plane's list, torch-free to import).
Family = Literal[FAMILIES]  # type: ignore[valid-type]
AcceleratorType = Literal["nvidia-gpu", "aws-neuron", "google-tpu", "cpu"]
#: Where workers run ControlNets, and what one reads (the data plane's lists, torch-free to import).
ControlNetPlacement = Literal[PLACEMENTS]  # type: ignore[valid-type]
ControlNetKind = Literal[KINDS]  # type: ignore[valid-type]
Mode = Literal["auto", "cost", "capacity"]
#: Kubernetes quantities ("2", "500m", "16Gi") arrive as int or string.
Quantity = int | str
DNSLabel = Annotated[
    str,
    Field(pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$", min_length=1, max_length=20),
]


class _Model(BaseModel):
    """Shared config: camelCase aliases, unknown fields rejected (typos become InvalidSpec)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class ModelSpec(_Model):
    """Which diffusion model the workers load, and how."""

    source: str = Field(
        min_length=1,
        max_length=512,
        description=(
            "Where the weights come from: `hf://ORG/NAME` (Hugging Face Hub id, cached in the pod), "
            "`pvc://CLAIM/PATH` (a directory on a PersistentVolumeClaim, mounted read-only), "
            "or `builtin://NAME` (a random-weight model that ships with stepfleet, e.g. `tiny-sd`)."
        ),
    )
    revision: str | None = Field(
        default=None, max_length=128, description="Hub revision (branch, tag or commit) for `hf://` sources."
    )
    family: Family = Field(
        default="sd15",
        description=(
            "Pipeline family, which fixes latent shapes and the worker's backbone: one a worker serves "
            "(an unknown family is refused). A checkpoint of another family fails the workers' "
            "readiness, reported as Degraded/ModelLoadFailed."
        ),
    )
    dtype: Literal["float16", "bfloat16", "float32"] = Field(
        default="float16", description="Weight dtype on the accelerator (CPU pools always run float32)."
    )


class SLOSpec(_Model):
    """The latency objective the control loop keeps; cost is minimised subject to it."""

    latency_seconds: float = Field(gt=0, le=3600, description="End-to-end latency target per image, seconds.")
    percentile: float = Field(default=95.0, gt=0, lt=100, description="Percentile the target applies to.")
    image: float | None = Field(
        default=None, gt=0, le=3600,
        description="Deadline of one image request at a worker, seconds (per-kind SLO; the planner pauses "
                    "videos for images that would miss it). Unset: 4x the request's own solo service time.")
    video: float | None = Field(
        default=None, gt=0, le=86400,
        description="Deadline of one video job at a worker, seconds (per-kind SLO). Unset: 4x its solo "
                    "service time.")


class AcceleratorSpec(_Model):
    """What one replica of a pool runs on. `type` picks the device plugin resource and backend."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.type == 'cpu' || has(self.model)",
                    "message": "accelerator.model is required for nvidia-gpu, aws-neuron and google-tpu",
                    "fieldPath": ".model",
                },
                {
                    "rule": "self.type != 'google-tpu' || has(self.topology)",
                    "message": "accelerator.topology is required for google-tpu (e.g. 2x2)",
                    "fieldPath": ".topology",
                },
                {
                    "rule": "self.type != 'cpu' || !has(self.count) || self.count == 0",
                    "message": "cpu pools request no accelerator devices: leave count unset or 0",
                    "fieldPath": ".count",
                },
                {
                    "rule": "self.type == 'cpu' || !has(self.count) || self.count >= 1",
                    "message": "accelerator pools need count >= 1",
                    "fieldPath": ".count",
                },
            ]
        }
    )

    type: AcceleratorType = Field(description="Accelerator kind: nvidia-gpu, aws-neuron, google-tpu or cpu.")
    model: str | None = Field(
        default=None,
        max_length=63,
        description=(
            "Accelerator model: the GPU name for nvidia-gpu (e.g. `l4`, matched against Karpenter's "
            "`karpenter.k8s.aws/instance-gpu-name`), the chip for aws-neuron (`inferentia2`, "
            "`trainium`), the GKE accelerator for google-tpu (e.g. `tpu-v5-lite-podslice`)."
        ),
    )
    count: int | None = Field(
        default=None,
        ge=0,
        le=64,
        description="Devices per replica (GPUs, Neuron devices or TPU chips). Default: 1, or 0 for cpu.",
    )
    topology: str | None = Field(
        default=None, max_length=32, pattern=r"^[0-9]+(x[0-9]+){1,2}$", description="TPU slice topology, e.g. `1x1` or `2x2`."
    )
    resource_name: str | None = Field(
        default=None,
        max_length=253,
        description=(
            "Extended resource to request instead of the type's default, e.g. "
            "`aws.amazon.com/neuroncore` to share a Neuron device between replicas."
        ),
    )

    @property
    def devices(self) -> int:
        """Devices one replica requests, with the type's default applied."""
        if self.count is not None:
            return self.count
        return 0 if self.type == "cpu" else 1


class NodePoolSpec(_Model):
    """Ask the operator for a Karpenter `NodePool` (karpenter.sh/v1, AWS) dedicated to this pool."""

    capacity_types: list[Literal["on-demand", "spot", "reserved"]] = Field(
        default_factory=lambda: ["on-demand"],
        min_length=1,
        max_length=3,
        description="Karpenter capacity types to allow. Default: [on-demand].",
    )
    instance_families: list[Annotated[str, Field(max_length=32)]] = Field(
        default_factory=list,
        max_length=16,
        description="EC2 instance families, e.g. [g6] or [inf2]. Default: derived from the accelerator.",
    )
    instance_types: list[Annotated[str, Field(max_length=64)]] = Field(
        default_factory=list, max_length=32, description="Exact instance types, e.g. [g6.xlarge]."
    )
    node_class: str = Field(
        default="default", max_length=253, description="Name of the EC2NodeClass the NodePool refers to."
    )
    limits: dict[str, Quantity] | None = Field(
        default=None,
        description="NodePool resource limits. Default: maxReplicas x devices of the accelerator resource.",
    )
    consolidate_after: str = Field(
        default="5m",
        pattern=r"^(([0-9]+(s|m|h))+|Never)$",
        description="How long a node must be empty before Karpenter removes it.",
    )


class Toleration(_Model):
    key: str | None = Field(default=None, max_length=316)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(default=None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class Resources(_Model):
    """CPU/memory for a container; accelerator devices come from `accelerator`, not from here."""

    requests: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, Quantity] = Field(default_factory=dict)


class PoolSpec(_Model):
    """One worker pool: a Deployment of identical replicas on one accelerator type."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
                    "message": "minReplicas must be <= maxReplicas",
                    "fieldPath": ".minReplicas",
                },
                {
                    "rule": "self.accelerator.type != 'google-tpu' || !has(self.nodePool)",
                    "message": "Karpenter NodePools are AWS-only; TPU pools use GKE node pools",
                    "fieldPath": ".nodePool",
                },
                {
                    "rule": "self.name != 'router'",
                    "message": "pool name 'router' is reserved for the router's objects",
                    "fieldPath": ".name",
                },
            ]
        }
    )

    name: DNSLabel = Field(description="Pool name, unique within the service; part of child object names.")
    accelerator: AcceleratorSpec
    price_per_hour: float = Field(
        ge=0, le=10000, description="On-demand price of one replica's capacity, USD per hour."
    )
    min_replicas: int = Field(default=1, ge=0, le=1000, description="Fewest replicas the control loop keeps. Default: 1.")
    max_replicas: int = Field(default=4, ge=0, le=1000, description="Most replicas the control loop asks for. Default: 4.")
    throughput_per_replica: float | None = Field(
        default=None, gt=0, description="Measured images per second one replica sustains at the SLO, if known."
    )
    video_throughput_per_replica: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Measured video jobs per second one replica sustains, if known (a video costs one to two orders of "
            "magnitude an image's device time, so the control loop plans videos apart). Default: "
            "throughputPerReplica / 30."
        ),
    )
    max_batch: int | None = Field(default=None, ge=1, le=256, description="Overrides serving.maxBatch for this pool.")
    controlnet_placement: ControlNetPlacement | None = Field(
        default=None, description="Overrides serving.controlnetPlacement for this pool."
    )
    node_pool: NodePoolSpec | None = Field(default=None, description="Create a Karpenter NodePool for this pool.")
    failure_domain: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?$",
        description=(
            "What this pool's replicas fail with, e.g. `spot/us-east-1a/inf2`: pools that share it are "
            "lost together, and the control loop keeps capacity outside each hedged domain. Default: "
            "the NodePool's capacity type (`spot` when it allows only spot, else `on-demand`) and "
            "instance family (or the accelerator model), e.g. `spot/c7i`."
        ),
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Extra node selector labels.")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=16, description="Extra tolerations.")
    image: str | None = Field(default=None, max_length=512, description="Worker image for this pool.")
    resources: Resources | None = Field(default=None, description="CPU/memory requests and limits of a worker.")

    @model_validator(mode="after")
    def _replica_bounds(self) -> PoolSpec:
        # Mirrors the CEL rule, which cannot see defaults (it only checks fields that are set).
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"minReplicas ({self.min_replicas}) must be <= maxReplicas ({self.max_replicas})")
        return self


class RouterSpec(_Model):
    replicas: int = Field(default=2, ge=0, le=100, description="Router replicas. Default: 2.")
    image: str | None = Field(default=None, max_length=512, description="Router image. Default: the cpu image.")
    resources: Resources | None = None


#: torch.compile backends and modes a worker accepts (`--compile-backend`, `--compile-mode`).
CompileBackend = Literal["auto", "inductor", "aot_eager", "cudagraphs", "openxla"]
CompileMode = Literal["auto", "default", "reduce-overhead", "max-autotune-no-cudagraphs"]
#: Most shape buckets of either kind (the worker's `compiled.buckets.MAX_BUCKETS`): each is a compile.
MAX_BUCKETS = 64
BucketSize = Annotated[str, Field(pattern=r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$", max_length=11)]


class CompileSpec(_Model):
    """Compiled, static-shape execution (issue 20): every shape bucket compiled during warm-up."""

    enabled: bool = Field(
        default=False,
        description=(
            "Compile the denoiser once per shape bucket before a worker reports ready (worker `--compile`; "
            "CUDA graphs on nvidia-gpu, XLA graphs on aws-neuron and google-tpu). Default: false."
        ),
    )
    backend: CompileBackend = Field(
        default="auto", description="Worker `--compile-backend` (auto: openxla on XLA devices, inductor elsewhere)."
    )
    mode: CompileMode = Field(
        default="auto", description="Worker `--compile-mode` (auto: reduce-overhead, i.e. CUDA graphs, on CUDA)."
    )
    warmup_seconds: int | None = Field(
        default=None, ge=0, le=86400,
        description=(
            "Estimated warm-up compile time of one replica, seconds. It widens the startup probe, the readiness "
            "timeout and the provisioning time the control loop plans with. Default: per bucket by accelerator "
            "(nvidia-gpu 120 s, aws-neuron 300 s, google-tpu 180 s, cpu 75 s) times the buckets; see "
            "docs/accelerators.md."
        ),
    )


class BucketsSpec(_Model):
    """The shapes a compiled worker runs: every step's batch is padded up to a row bucket."""

    rows: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=list, max_length=MAX_BUCKETS,
        description=(
            "Denoiser row counts, ascending (an image with guidance takes 2 rows); the largest must hold a full "
            "batch (2 x maxBatch). Default: powers of two up to 2 x maxBatch, and that itself."
        ),
    )
    sizes: list[BucketSize] = Field(
        default_factory=list, max_length=MAX_BUCKETS,
        description="Image sizes `WxH` compiled for (multiples of 8); others are refused with 400. "
                    "Default: the model's default size.",
    )

    @model_validator(mode="after")
    def _well_formed(self) -> BucketsSpec:
        if self.rows != sorted(set(self.rows)):
            raise ValueError(f"rows must be ascending and unique (got {self.rows})")
        for size in self.sizes:
            width, height = (int(side) for side in size.split("x"))
            if width % 8 or height % 8:
                raise ValueError(f"sizes must have sides that are multiples of 8 (got {size})")
        dupes = sorted({s for s in self.sizes if self.sizes.count(s) > 1})
        if dupes:
            raise ValueError(f"sizes must be unique; repeated: {', '.join(dupes)}")
        return self


class CompileCacheSpec(_Model):
    """An existing PersistentVolumeClaim for the workers' persistent compile caches."""

    claim_name: str = Field(
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", min_length=1, max_length=253,
        description=(
            "PersistentVolumeClaim in the service's namespace, mounted read-write in every worker at "
            "/var/cache/stepfleet/compile (ReadWriteMany, so replicas on several nodes share it)."
        ),
    )


class ServingSpec(_Model):
    image: str | None = Field(
        default=None, max_length=512, description="Worker image for every pool (a pool's `image` wins)."
    )
    max_batch: int = Field(default=8, ge=1, le=256, description="Largest step-level batch. Default: 8.")
    template_cache_bytes: int = Field(
        default=1 << 30, ge=0, description="Activation-cache budget per worker, bytes. Default: 1 GiB."
    )
    controlnet_placement: ControlNetPlacement = Field(
        default="inline",
        description=(
            "Where workers run ControlNets: inline on the step loop (CPU pools), or overlap (an executor beside the "
            "loop computes each request's next residuals ahead; see docs/controlnet.md). Default: inline."
        ),
    )
    max_controlnets: int = Field(default=2, ge=1, le=8, description="ControlNets one request may name. Default: 2.")
    compile: CompileSpec = Field(
        default_factory=CompileSpec, description="Compiled, static-shape execution (see docs/accelerators.md)."
    )
    buckets: BucketsSpec | None = Field(
        default=None, description="Shape buckets of compiled workers (used only with compile.enabled)."
    )
    compile_cache: CompileCacheSpec | None = Field(
        default=None,
        description="PVC for the persistent compile caches, so a new replica starts without compiling (used only "
                    "with compile.enabled).",
    )


class ControlNetSpec(_Model):
    """A ControlNet requests may name (`controlnet: [{"name": ...}]`); every pool's workers load it."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", description="What requests call it.")]
    source: str = Field(
        pattern=r"^(builtin://[a-z0-9-]+|hf://[A-Za-z0-9][-A-Za-z0-9_.]*/[-A-Za-z0-9_.]+)$", max_length=256,
        description="builtin://tiny-controlnet (or tiny-controlnet-sdxl) or hf://ORG/NAME.",
    )
    kind: ControlNetKind = Field(default="other", description="What it was trained on (informational).")

    def worker_source(self) -> str:
        """The worker's `--controlnets` source: the built-in's name or the hub id."""
        return self.source.split("://", 1)[1]


class AdapterSpec(_Model):
    """A LoRA adapter every worker registers at start (requests name it in `lora`); see docs/adapters.md."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", description="What requests call it.")]
    source: str = Field(
        pattern=r"^(hf://[A-Za-z0-9][-A-Za-z0-9_.]*/[-A-Za-z0-9_.]+(/[-A-Za-z0-9_.]+)*|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?"
                r"(/[-A-Za-z0-9_.]+)+)$",
        max_length=512,
        description=(
            "hf://ORG/NAME[/FILE] (default file pytorch_lora_weights.safetensors), or pvc://CLAIM/PATH on the "
            "model's claim (mounted read-only beside the model)."
        ),
    )
    preload: bool = Field(default=False, description="Load it onto the device before a worker reports ready.")


#: A Secret's name (a DNS subdomain) and a key in it.
SecretName = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", min_length=1, max_length=253)]
SecretKey = Annotated[str, Field(pattern=r"^[-._a-zA-Z0-9]+$", min_length=1, max_length=253)]


class SecretKeyRef(_Model):
    """A key of a Secret in the service's namespace. The operator never reads it: the kubelet
    mounts it into the pods as a file, so the operator needs no right to read Secrets."""

    name: SecretName = Field(description="Secret name, in the DiffusionService's namespace.")
    key: SecretKey | None = Field(default=None, description="Key in the Secret. Default: the field's own (see its description).")


class NetworkPeer(_Model):
    """Pods allowed to reach the workers' port besides the router (a NetworkPolicy peer)."""

    namespace: str | None = Field(
        default=None, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63,
        description="Namespace of the pods. Default: the DiffusionService's own.",
    )
    pod_labels: dict[str, str] = Field(
        default_factory=dict, description="Labels the pods carry. Empty: every pod of the namespace."
    )


class SecuritySpec(_Model):
    """Who may call the fleet and who may reach its workers (issue 19)."""

    api_keys: SecretKeyRef | None = Field(
        default=None,
        description=(
            "Secret holding the router's API keys file (key default `api-keys`): one key per line, optionally "
            "`tenant=NAME rps=N burst=N`; keys of one tenant share its templates, other tenants never see them. "
            "Mounted into the router, which re-reads it when the Secret changes. Unset: the router is open to "
            "anyone who can reach it."
        ),
    )
    worker_token: SecretKeyRef | None = Field(
        default=None,
        description=(
            "Secret holding the token the router sends to workers (key default `token`); workers answer 401 to "
            "any other caller except on /healthz, /readyz and /metrics. Mounted into the router and every "
            "worker; re-read when it changes (several lines: send the first, accept any, for rotation without a "
            "rollout). Unset: workers rely on the NetworkPolicy."
        ),
    )
    network_policy: bool = Field(
        default=True,
        description=(
            "Create a NetworkPolicy that lets only the router's pods, the operator and `metricsFrom` reach the "
            "workers' port. Default: true (it needs a network plugin that enforces NetworkPolicies)."
        ),
    )
    metrics_from: list[NetworkPeer] = Field(
        default_factory=list, max_length=8,
        description=(
            "Who else may reach the workers' port: a Prometheus scraping /metrics. A NetworkPolicy admits ports, "
            "not paths: the worker token keeps such a peer to /metrics, /readyz and /healthz."
        ),
    )


class ControlLoopSpec(_Model):
    """Settings of the cost/capacity control loop (`stepfleet.operator.loop`)."""

    interval_seconds: float = Field(
        default=30, ge=0.1, le=3600, description="How often the loop decides (values under 1 s are for tests)."
    )
    dwell_seconds: float = Field(
        default=600, ge=0, le=86400, description="Least time in capacity mode before returning to cost mode."
    )
    stabilization_seconds: float = Field(
        default=120, ge=0, le=86400, description="Window over which scale-down decisions are smoothed."
    )
    pending_grace_seconds: float = Field(
        default=180, ge=0, le=86400, description="How long a pod may stay Pending before it signals a shortage."
    )
    readiness_timeout_seconds: float = Field(
        default=900, ge=0, le=86400,
        description="How long a scheduled worker pod may stay un-ready (model still loading or failed to load) "
        "before its pool counts as short; crash loops and image pull errors count after pendingGraceSeconds. "
        "0 turns the un-ready signal off.",
    )
    recovery_window_seconds: float = Field(
        default=600, ge=0, le=86400, description="How long a short pool must show capacity again before it is trusted."
    )
    provisioning_seconds: float = Field(
        default=600, ge=0, le=86400,
        description="Expected seconds from asking for a replica to it serving (node + model load); the loop plans this far ahead.",
    )
    hedge_spot: float = Field(
        default=0.5, ge=0, le=1,
        description="Share of the planned demand that ready capacity outside a spot failure domain must serve "
        "(on-demand fallback while spot replacements load). Default: 0.5.",
    )
    hedge_on_demand: float = Field(
        default=0, ge=0, le=1,
        description="The same for on-demand domains that never failed. 1 keeps the SLO through any one domain's "
        "loss at about twice the cost. Default: 0.",
    )
    hedge_after_loss: float = Field(
        default=1, ge=0, le=1,
        description="The same for a domain that lost ready capacity within lossMemorySeconds. Default: 1.",
    )
    loss_memory_seconds: float = Field(
        default=86400, ge=0, le=2592000, description="How long a domain that lost ready capacity stays hedged."
    )
    loss_fraction: float = Field(
        default=0.25, gt=0, le=1,
        description="A pool whose ready replicas fall this fraction below what was ready and planned at the last "
        "decision has lost capacity: the loop enters capacity mode at once. Default: 0.25.",
    )
    prometheus_url: str | None = Field(
        default=None,
        max_length=512,
        pattern=r"^https?://",
        description=(
            "Prometheus base URL (e.g. `http://prometheus.monitoring:9090`) the loop queries; "
            "unset: the loop scrapes the pool pods' /metrics itself."
        ),
    )


class DiffusionServiceSpec(_Model):
    """Desired state of a diffusion serving fleet."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "size(self.pools) >= 1", "message": "at least one pool is required", "fieldPath": ".pools"},
                {
                    "rule": "self.pools.all(p, self.pools.exists_one(q, q.name == p.name))",
                    "message": "pool names must be unique",
                    "fieldPath": ".pools",
                },
                {
                    "rule": "self.pools.all(p, has(p.pricePerHour))",
                    "message": "every pool needs pricePerHour",
                    "fieldPath": ".pools",
                },
            ]
        }
    )

    model: ModelSpec
    slo: SLOSpec
    mode: Mode = Field(default="auto", description="auto lets the control loop choose; cost or capacity pin it.")
    pools: list[PoolSpec] = Field(min_length=1, max_length=MAX_POOLS)
    router: RouterSpec = Field(default_factory=RouterSpec)
    serving: ServingSpec = Field(default_factory=ServingSpec)
    control_loop: ControlLoopSpec = Field(default_factory=ControlLoopSpec)
    security: SecuritySpec = Field(default_factory=SecuritySpec)
    controlnets: list[ControlNetSpec] = Field(default_factory=list, max_length=16, description=(
        "ControlNets requests may use (GET /v1/controlnets lists them); each must fit the model's family."))
    adapters: list[AdapterSpec] = Field(default_factory=list, max_length=64, description=(
        "LoRA adapters every worker registers at start (more can be added with POST /v1/adapters); each is "
        "checked against the model when loaded."))

    @model_validator(mode="after")
    def _adapters_fit(self) -> DiffusionServiceSpec:
        names = [a.name for a in self.adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"adapter names must be unique; repeated: {', '.join(dupes)}")
        claim = self.model.source.removeprefix("pvc://").split("/")[0] if self.model.source.startswith("pvc://") \
            else None
        for a in self.adapters:
            if a.source.startswith("pvc://") and a.source.removeprefix("pvc://").split("/")[0] != claim:
                raise ValueError(f"adapter {a.name!r}: a pvc:// adapter must be on the model's claim "
                                 f"({claim or 'the model is not on a claim'}), which workers mount")
        return self

    @model_validator(mode="after")
    def _unique_controlnet_names(self) -> DiffusionServiceSpec:
        names = [c.name for c in self.controlnets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"controlnet names must be unique; repeated: {', '.join(dupes)}")
        for c in self.controlnets:  # a built-in net fits only its built-in model (a worker would fail to load)
            if c.source.startswith("builtin://"):
                net = c.worker_source()
                base = BUILTIN_BASES.get(net)
                if base is None:
                    raise ValueError(f"controlnet {c.name}: unknown built-in {net!r} "
                                     f"(known: {', '.join(sorted(BUILTIN_BASES))})")
                if self.model.source != f"builtin://{base}":
                    raise ValueError(f"controlnet {c.name}: builtin://{net} fits only the model builtin://{base}")
        return self

    @model_validator(mode="after")
    def _unique_pool_names(self) -> DiffusionServiceSpec:
        names = [p.name for p in self.pools]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"pool names must be unique; repeated: {', '.join(dupes)}")
        return self


# --- status -----------------------------------------------------------------------------------


class Condition(_Model):
    """A Kubernetes-style condition; see `stepfleet.operator.conditions` for how they are set."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = None


class PoolStatus(_Model):
    name: str
    replicas: int = 0
    ready_replicas: int = 0
    weight: float = 0.0
    capacity_state: Literal["Available", "Short", "Unknown"] = "Unknown"
    cost_per_hour: float = 0.0


class ControlLoopStatus(_Model):
    """What the control loop last decided and why; also what it must remember across restarts."""

    last_decision_time: str | None = None
    mode_since: str | None = Field(default=None, description="When the current mode was entered.")
    demand_rps: float | None = Field(default=None, description="Estimated arrival rate, requests per second.")
    planned_rps: float | None = Field(default=None, description="Rate the plan provisions for (trend and headroom).")
    short_since: dict[str, str] = Field(
        default_factory=dict, description="Pools the loop remembers as short, with when the shortage began."
    )
    reasons: list[str] = Field(default_factory=list, max_length=32, description="Why the last plan is what it is.")
    last_error: str | None = Field(default=None, description="Why the last observation or action failed, if it did.")
    model_load_failures: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Pools whose workers gave up loading the model (their /readyz answers `failed`), "
            "with the workers' error, e.g. a family that does not match the checkpoint."
        ),
    )


class DiffusionServiceStatus(_Model):
    observed_generation: int | None = None
    mode: Literal["cost", "capacity"] | None = None
    pools: list[PoolStatus] = Field(default_factory=list)
    total_cost_per_hour: float | None = None
    conditions: list[Condition] = Field(default_factory=list)
    control_loop: ControlLoopStatus | None = None


class DiffusionService(_Model):
    """The whole object (metadata is left to Kubernetes and not modelled)."""

    api_version: Literal["stepfleet.io/v1alpha1"] = "stepfleet.io/v1alpha1"
    kind: Literal["DiffusionService"] = "DiffusionService"
    spec: DiffusionServiceSpec
    status: DiffusionServiceStatus | None = None
