"""How each accelerator type maps onto Kubernetes and onto the worker.

One table, so that adding an accelerator is one entry: the device-plugin resource a pod
requests, the taint its nodes usually carry (and that workers must tolerate), the worker's
`--device` backend, the image flavour built for it, and how Karpenter finds its instances.
An accelerator type missing here has "no device mapping" and the operator refuses the spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DeviceMapping:
    """Everything type-specific the builders need about one accelerator type."""

    #: Extended resource requested per device (None: plain CPU pods).
    resource_name: str | None
    #: Resource names a spec may choose instead (e.g. Neuron cores instead of whole devices).
    allowed_resource_names: frozenset[str]
    #: `stepfleet worker --device` value.
    backend: str
    #: Image tag suffix of the Dockerfile flavour (build arg) that carries this backend.
    image_flavour: str
    #: Taint key that nodes with this accelerator carry; workers tolerate it.
    taint_key: str | None
    #: Whether Karpenter (AWS) can provision it; TPUs come from GKE node pools instead.
    karpenter: bool
    #: Karpenter requirement key that selects the accelerator model (None: use families).
    karpenter_model_key: str | None = None
    #: accelerator.model -> default EC2 instance families, where the model implies them.
    families_by_model: dict[str, tuple[str, ...]] = field(default_factory=dict)


DEVICES: dict[str, DeviceMapping] = {
    "nvidia-gpu": DeviceMapping(
        resource_name="nvidia.com/gpu",
        allowed_resource_names=frozenset({"nvidia.com/gpu"}),
        backend="cuda",
        image_flavour="cuda",
        taint_key="nvidia.com/gpu",
        karpenter=True,
        karpenter_model_key="karpenter.k8s.aws/instance-gpu-name",
    ),
    "aws-neuron": DeviceMapping(
        resource_name="aws.amazon.com/neuron",
        allowed_resource_names=frozenset({"aws.amazon.com/neuron", "aws.amazon.com/neuroncore", "aws.amazon.com/neurondevice"}),
        backend="neuron",
        image_flavour="neuron",
        taint_key="aws.amazon.com/neuron",
        karpenter=True,
        families_by_model={
            "inferentia": ("inf1",),
            "inferentia2": ("inf2",),
            "trainium": ("trn1", "trn1n"),
            "trainium2": ("trn2",),
        },
    ),
    "google-tpu": DeviceMapping(
        resource_name="google.com/tpu",
        allowed_resource_names=frozenset({"google.com/tpu"}),
        backend="xla",
        image_flavour="tpu",
        taint_key="google.com/tpu",
        karpenter=False,
    ),
    "cpu": DeviceMapping(
        resource_name=None,
        allowed_resource_names=frozenset(),
        backend="cpu",
        image_flavour="cpu",
        taint_key=None,
        karpenter=True,
    ),
}

#: GKE node labels that place a pod on a TPU slice of a given accelerator and topology.
TPU_ACCELERATOR_LABEL = "cloud.google.com/gke-tpu-accelerator"
TPU_TOPOLOGY_LABEL = "cloud.google.com/gke-tpu-topology"
#: Karpenter's label naming the NodePool a node came from.
KARPENTER_NODEPOOL_LABEL = "karpenter.sh/nodepool"
