"""Secrets `spec.security` names, as volumes and the flags that point the processes at them.

The operator never reads a Secret: it names it in the pod template and the kubelet mounts it
as a file, so the operator's RBAC holds no right to Secrets. Both sides read files, not
environment variables, because a mounted Secret is updated in place when it changes (the
router re-reads its API keys file, router and workers their token file: rotation in three
Secret edits without a rollout, `serving.worker_auth`).
Mode 0440 with the pods' fsGroup: readable by the non-root user, by nobody else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stepfleet.operator import names
from stepfleet.operator.models import SecretKeyRef, SecuritySpec

#: Owner and group may read (the pods run with fsGroup 10001), nobody may write.
SECRET_MODE = 0o440


@dataclass(frozen=True)
class MountedSecret:
    """One Secret key mounted as a file: the volume, its mount, and the file's path."""

    volume: dict[str, Any]
    mount: dict[str, Any]
    path: str


def _mounted(volume_name: str, ref: SecretKeyRef, default_key: str) -> MountedSecret:
    directory = f"{names.SECRETS_DIR}/{volume_name}"
    key = ref.key or default_key
    return MountedSecret(
        volume={"name": volume_name, "secret": {"secretName": ref.name, "defaultMode": SECRET_MODE,
                                                "items": [{"key": key, "path": default_key}]}},
        # A directory mount, not subPath: only then does the kubelet update the file when the Secret changes.
        mount={"name": volume_name, "mountPath": directory, "readOnly": True},
        path=f"{directory}/{default_key}",
    )


def worker_token(security: SecuritySpec) -> MountedSecret | None:
    """The router's and every worker's shared token, if the spec names one."""
    if security.worker_token is None:
        return None
    return _mounted("worker-token", security.worker_token, names.WORKER_TOKEN_KEY)


def api_keys(security: SecuritySpec) -> MountedSecret | None:
    """The router's API keys file, if the spec names one."""
    if security.api_keys is None:
        return None
    return _mounted("api-keys", security.api_keys, names.API_KEYS_KEY)
