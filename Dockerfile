# syntax=docker/dockerfile:1
# stepfleet images, one per accelerator flavour:
#   docker build --build-arg ACCELERATOR=cpu    -t ghcr.io/stepfleet/stepfleet:0.1.0-cpu .
#   docker build --build-arg ACCELERATOR=cuda   -t ghcr.io/stepfleet/stepfleet:0.1.0-cuda .
#   docker build --build-arg ACCELERATOR=neuron -t ghcr.io/stepfleet/stepfleet:0.1.0-neuron .
#   docker build --build-arg ACCELERATOR=tpu    -t ghcr.io/stepfleet/stepfleet:0.1.0-tpu .
# The flavour picks the base image and the torch build; everything else is the same. One image
# runs every role: `stepfleet worker`, `stepfleet router`, `stepfleet operator` (the chart uses
# the cpu flavour for the operator and the router).
ARG ACCELERATOR=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# AWS's Neuron deep-learning container: the Neuron runtime (libnrt) and torch-neuronx.
ARG NEURON_IMAGE=public.ecr.aws/neuron/pytorch-inference-neuronx:2.5.1-neuronx-py310-sdk2.21.0-ubuntu22.04

# ---- one base per flavour: where torch comes from ----------------------------------------------
FROM ${PYTHON_IMAGE} AS base-cpu
ENV TORCH_PACKAGES="torch==2.13.0" \
    PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
    STEPFLEET_DEVICE=cpu

# CUDA wheels carry the CUDA user-space libraries; the node's driver comes from the NVIDIA runtime.
FROM ${PYTHON_IMAGE} AS base-cuda
ENV TORCH_PACKAGES="torch==2.13.0" \
    STEPFLEET_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM ${PYTHON_IMAGE} AS base-tpu
ENV TORCH_PACKAGES="torch==2.8.0 torch_xla[tpu]==2.8.0" \
    PIP_FIND_LINKS=https://storage.googleapis.com/libtpu-releases/index.html \
    STEPFLEET_DEVICE=xla \
    PJRT_DEVICE=TPU

# torch-neuronx is already installed in the base image; the venv sees it (--system-site-packages).
FROM ${NEURON_IMAGE} AS base-neuron
ENV TORCH_PACKAGES="" \
    STEPFLEET_DEVICE=neuron

# ---- build: a virtual environment with torch and stepfleet -------------------------------------
# (DL3006 wants a tag, but base-${ACCELERATOR} is one of the stages above, whose images are pinned.)
# hadolint ignore=DL3006
FROM base-${ACCELERATOR} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python3 -m venv --system-site-packages /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first and on its own layer: it is large and changes less often than the code.
RUN if [ -n "$TORCH_PACKAGES" ]; then \
        echo "$TORCH_PACKAGES" | tr ' ' '\n' > /tmp/torch-requirements.txt \
        && pip install --no-cache-dir --requirement /tmp/torch-requirements.txt; \
    fi
WORKDIR /src
COPY pyproject.toml README.md ./
COPY stepfleet/ stepfleet/
COPY serving/ serving/
COPY operator/ operator/
RUN pip install --no-cache-dir . \
    && python -c "import stepfleet.serving.app, stepfleet.operator.main"

# ---- runtime: the venv, a non-root user, nothing else ------------------------------------------
# hadolint ignore=DL3006
FROM base-${ACCELERATOR} AS runtime
ARG ACCELERATOR
LABEL org.opencontainers.image.title="stepfleet" \
      org.opencontainers.image.description="Diffusion serving across heterogeneous accelerators (${ACCELERATOR})" \
      org.opencontainers.image.source="https://github.com/stepfleet/stepfleet" \
      org.opencontainers.image.licenses="Apache-2.0"
# uid/gid 10001: the operator's pod securityContext (runAsUser 10001) and the chart's match it.
RUN groupadd --system --gid 10001 stepfleet \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/stepfleet --create-home --shell /usr/sbin/nologin stepfleet \
    && mkdir -p /cache /models \
    && chown 10001:10001 /cache
COPY --from=build /opt/venv /opt/venv
# The root filesystem is read-only in Kubernetes: caches and temp files go to mounted volumes.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/stepfleet \
    HF_HOME=/cache/hf \
    STEPFLEET_CACHE=/cache/stepfleet \
    STEPFLEET_HEALTH_URL=http://127.0.0.1:8001/healthz
USER 10001:10001
WORKDIR /home/stepfleet
EXPOSE 8000 8001
# Docker and Compose use this; Kubernetes uses the probes in the pod spec. Override the URL for the
# router (:8000) or the operator (:8080).
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['STEPFLEET_HEALTH_URL'], timeout=4)"]
ENTRYPOINT ["stepfleet"]
CMD ["worker", "--host", "0.0.0.0", "--port", "8001"]
