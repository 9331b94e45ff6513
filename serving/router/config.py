"""The router's configuration: the `router.yaml` the operator writes, and the router's own settings.

Two objects, two owners. `RouterConfig` is the file (ConfigMap key `router.yaml`, written by
the operator, see docs/operator.md): pools, their URLs and the control loop's weights. It
changes every control-loop interval and is re-read live. `RouterSettings` are the process's
own knobs (CLI flags): ports, timeouts, limits; they never change while it runs.

A local, static fleet uses the same file format; a pool may list its workers one by one
under `endpoints:` (then `url` is optional), which the operator never writes: in a cluster
the workers of a pool are the EndpointSlices of the Service that `url` names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_VERSION = 1


class ConfigError(ValueError):
    """The file is not a router config this router understands; the message names the field."""


def _check_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http(s) URL with a host")
    return value.rstrip("/")


class PoolConfig(BaseModel):
    # Unknown keys are ignored, not refused: a newer operator may add fields, and refusing
    # them would freeze the router on stale weights. Incompatible changes bump `version`.
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    name: str = Field(min_length=1)
    #: The pool's Service URL (what the operator writes).
    url: str | None = None
    #: Worker URLs, one per worker (local/static fleets); overrides discovery from `url`.
    endpoints: tuple[str, ...] = ()
    #: Share of new requests; normalised over pools, so they need not sum to 1.
    weight: float = Field(default=1.0, ge=0)
    accelerator: str | None = None
    price_per_hour: float | None = Field(default=None, alias="pricePerHour", ge=0)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return None if v is None else _check_url(v)

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_url(u) for u in v)

    @model_validator(mode="after")
    def _has_target(self) -> PoolConfig:
        if not self.url and not self.endpoints:
            raise ValueError("a pool needs `url` or `endpoints`")
        return self

    def static_endpoints(self) -> tuple[str, ...]:
        """Workers when nothing is discovered: the explicit list, else the Service URL itself."""
        return self.endpoints or ((self.url,) if self.url else ())


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    version: int
    service: str | None = None
    model: str | None = None
    pools: tuple[PoolConfig, ...] = ()
    #: What the control loop last decided (mode, decisions with reasons), for `GET /v1/fleet`;
    #: read leniently there (`fleet_view`), so a section this router cannot read never stops a reload.
    control: Any = None

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != CONFIG_VERSION:
            raise ValueError(f"unsupported version {v}; this router reads version {CONFIG_VERSION}")
        return v

    @field_validator("pools")
    @classmethod
    def _unique(cls, v: tuple[PoolConfig, ...]) -> tuple[PoolConfig, ...]:
        names = [p.name for p in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate pool names: {', '.join(sorted(dup))}")
        return v

    def weights(self) -> dict[str, float]:
        return {p.name: p.weight for p in self.pools}


def parse_config(text: str) -> RouterConfig:
    """Parse `router.yaml`; every failure is a `ConfigError` naming the field."""
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"router config is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("router config must be a mapping with `version` and `pools`")
    try:
        return RouterConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise ConfigError(f"router config: {where}: {first['msg']}") from None


def load_config(path: str | Path) -> RouterConfig:
    return parse_config(Path(path).read_text())


class RouterSettings(BaseModel):
    """The router process's own settings (CLI flags); validated once at start-up."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    #: Within-pool choice: the issue's predicted-latency policy, or a baseline (for comparison).
    policy: Literal["predicted", "least_requests", "round_robin"] = "predicted"
    #: Attempts per request after connection errors and 5xx: first, another worker, another pool.
    max_attempts: int = Field(default=3, ge=1, le=10)
    #: Hard limit on one upstream attempt (a diffusion request may take a while).
    upstream_timeout_s: float = Field(default=300.0, gt=0)
    connect_timeout_s: float = Field(default=2.0, gt=0)
    #: A worker that refused a connection is skipped this long (the load poller may revive it sooner).
    eject_s: float = Field(default=5.0, ge=0)
    #: How often each worker's /v1/load is polled (readiness and backlog between responses).
    load_poll_s: float = Field(default=1.0, gt=0)
    #: A poll not answered within this is a silent one; `hang_polls` silent polls in a row mark
    #: the worker unresponsive: skipped, its requests in flight retried elsewhere, until it
    #: answers a poll again. Defaults detect a hung worker in about 5 s (2 × (1 s + 2 s)) while a
    #: busy one, whose event loop answers polls between steps, is never mistaken for it.
    load_poll_timeout_s: float = Field(default=2.0, gt=0)
    hang_polls: int = Field(default=2, ge=1)
    #: How often the config file (and API keys file) are checked for changes.
    reload_s: float = Field(default=1.0, gt=0)
    #: Requests this router keeps in flight per worker before counting it saturated.
    max_inflight_per_worker: int = Field(default=128, ge=1)
    #: Largest request body accepted (multipart edits carry images).
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    #: Largest JSON body (generations): the schema's longest fields fit in a few tens of KB.
    max_json_bytes: int = Field(default=1024 * 1024, ge=1024)
    #: Worker defaults the router assumes when a request leaves them out (for cost only).
    default_steps: int = Field(default=20, ge=1)
    default_size: int = Field(default=512, ge=8)
    #: Optional API keys file (one key per line, optionally `rps=` and `burst=`); None = open.
    api_keys_file: str | None = None
    #: Per-key rate limit when a key line sets none; None = unlimited.
    rate_limit_rps: float | None = Field(default=None, gt=0)
    rate_limit_burst: float | None = Field(default=None, ge=1)
    #: File with the token sent to workers (they refuse requests without it); None: the
    #: `STEPFLEET_WORKER_TOKEN` environment variable, or no token when that is unset too.
    worker_token_file: str | None = None
    #: How workers are found: from the file only, from EndpointSlices, or EndpointSlices when in a cluster.
    discovery: Literal["static", "kubernetes", "auto"] = "auto"
