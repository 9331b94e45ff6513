"""Scenario files: what a simulated day looks like (pools, load, events) and how to read one.

A scenario is YAML validated into these models, so a typo or a missing field fails with a
message naming the field instead of silently simulating something else. docs/simulator.md
documents every key; the built-in scenarios (`scenarios/*.yaml`, package data) are examples.
"""

from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Slo(_Model):
    latency_s: float = Field(gt=0)
    percentile: float = Field(default=0.95, gt=0, lt=1)


class Pool(_Model):
    name: str = Field(min_length=1)
    price_per_hour: float = Field(ge=0)
    throughput_rps_per_replica: float = Field(gt=0)
    #: Latency of one request on an idle replica (queueing comes on top).
    latency_s: float = Field(gt=0)
    #: Seconds from asking for a replica (capacity permitting) to it serving: node launch
    #: plus image pull plus model load. Billing starts when the node is launched.
    provision_s: float = Field(default=600.0, ge=0)
    min_replicas: int = Field(default=0, ge=0)
    max_replicas: int = Field(default=100, ge=0)
    initial_replicas: int = Field(default=0, ge=0)
    #: Coefficient of variation of one request's service time (0: deterministic).
    service_cv: float = Field(default=0.1, ge=0, le=2)
    #: What the pool's replicas fail with (pools sharing it are lost together: a spot
    #: market, a zone, an instance family). Unset: the pool is its own failure domain.
    failure_domain: str | None = Field(default=None, min_length=1, max_length=63)
    #: Spot pools are hedged by default (SpotHedge); on-demand ones after a loss.
    capacity_type: Literal["on-demand", "spot", "reserved"] = "on-demand"
    #: Fixed router weight for the fixed-weight baselines (`static-mixed`, `hpa`, `paper`'s
    #: cost mode). Unset on every pool: weights in inverse proportion to price per image.
    weight: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> Pool:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"pool {self.name}: min_replicas > max_replicas")
        return self


class ConstantLoad(_Model):
    kind: Literal["constant"]
    rps: float = Field(ge=0)


class CosineLoad(_Model):
    """base at t=0, peak half a period later: base + (peak-base)*(1-cos(2*pi*t/period))/2."""

    kind: Literal["cosine"]
    base_rps: float = Field(ge=0)
    peak_rps: float = Field(ge=0)
    period_s: float = Field(gt=0)
    phase_s: float = 0.0


class Step(_Model):
    at_s: float = Field(ge=0)
    rps: float = Field(ge=0)


class StepsLoad(_Model):
    """Piecewise constant: each step's rate holds from its `at_s` to the next step."""

    kind: Literal["steps"]
    steps: tuple[Step, ...] = Field(min_length=1)


class TraceLoad(_Model):
    """A CSV of `time_s,rps` rows (a header row is allowed), interpolated linearly.

    `file` is relative to the scenario file; `points` may hold the rows inline instead.
    """

    kind: Literal["trace"]
    file: str | None = None
    points: tuple[tuple[float, float], ...] = ()
    #: Multiply every rate (replay a trace at another scale).
    scale: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _source(self) -> TraceLoad:
        if (self.file is None) == (not self.points):
            raise ValueError("trace load needs exactly one of `file` or `points`")
        return self


Load = Annotated[ConstantLoad | CosineLoad | StepsLoad | TraceLoad, Field(discriminator="kind")]


class CapacityShort(_Model):
    """The pool cannot get new replicas for `duration_s`; running ones keep running.

    With `available_replicas` the pool holds at most that many during the window, and
    replicas above it are reclaimed at the start (a capacity limit, as in the paper's demo).
    """

    kind: Literal["capacity_short"]
    at_s: float = Field(ge=0)
    pool: str
    duration_s: float = Field(gt=0)
    available_replicas: int | None = Field(default=None, ge=0)


class PriceChange(_Model):
    kind: Literal["price"]
    at_s: float = Field(ge=0)
    pool: str
    price_per_hour: float = Field(ge=0)


class Outage(_Model):
    """Every replica of the pool (ready or starting) is lost; in-flight requests fail.

    Deployments recreate the pods at once; with `duration_s` the pool also cannot get
    capacity for that long (a zone outage), otherwise new replicas start right away.
    """

    kind: Literal["outage"]
    at_s: float = Field(ge=0)
    pool: str
    duration_s: float = Field(default=0.0, ge=0)


class Interrupt(_Model):
    """A `fraction` of the pool's running replicas is lost (spot interruption)."""

    kind: Literal["interrupt"]
    at_s: float = Field(ge=0)
    pool: str
    fraction: float = Field(gt=0, le=1)


Event = Annotated[CapacityShort | PriceChange | Outage | Interrupt, Field(discriminator="kind")]


class Control(_Model):
    """Optional overrides of `ours`' loop settings (see policy.model.ControlSettings)."""

    dwell_s: float | None = Field(default=None, ge=0)
    recovery_window_s: float | None = Field(default=None, ge=0)
    stabilization_s: float | None = Field(default=None, ge=0)
    headroom: float | None = Field(default=None, ge=0)
    capacity_headroom: float | None = Field(default=None, ge=0)
    max_utilization: float | None = Field(default=None, gt=0, le=1)
    tail_budget: float | None = Field(default=None, gt=0, le=1)
    max_pool_share: float | None = Field(default=None, gt=0, le=1)
    switch_margin: float | None = Field(default=None, ge=0, lt=1)
    scale_down_buffer: float | None = Field(default=None, ge=0)
    scale_down_per_min: float | None = Field(default=None, gt=0)
    hedge_spot: float | None = Field(default=None, ge=0, le=1)
    hedge_on_demand: float | None = Field(default=None, ge=0, le=1)
    hedge_after_loss: float | None = Field(default=None, ge=0, le=1)
    loss_memory_s: float | None = Field(default=None, ge=0)
    loss_fraction: float | None = Field(default=None, gt=0, le=1)


class Scenario(_Model):
    name: str
    description: str = ""
    seed: int = 0
    duration_s: float = Field(gt=0)
    slo: Slo
    control_interval_s: float = Field(default=60.0, gt=0)
    #: A request whose queueing wait would exceed this is turned away (HTTP 429): the
    #: worker's queue bound, so an overloaded pool fails fast instead of queueing forever.
    timeout_s: float = Field(default=30.0, gt=0)
    pools: tuple[Pool, ...] = Field(min_length=1)
    load: Load
    events: tuple[Event, ...] = ()
    control: Control = Control()
    #: Where relative paths (trace files) resolve; set by the loader.
    base_dir: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise ValueError(f"pool names must be unique: {names}")
        for event in self.events:
            if event.pool not in names:
                raise ValueError(f"event at {event.at_s}s names unknown pool {event.pool!r}")
            if event.at_s >= self.duration_s:
                raise ValueError(f"event at {event.at_s}s is past duration_s {self.duration_s}")
        return self

    def pool_index(self, name: str) -> int:
        return [p.name for p in self.pools].index(name)

    def trace_points(self) -> tuple[tuple[float, float], ...]:
        """The (time_s, rps) rows of a trace load, read from its file if needed."""
        load = self.load
        if not isinstance(load, TraceLoad):
            raise TypeError("not a trace load")
        rows = load.points or _read_trace(_resolve(load.file or "", self.base_dir))
        if len(rows) < 1:
            raise ValueError("trace load has no rows")
        return tuple((t, r * load.scale) for t, r in rows)


def _resolve(path: str, base_dir: str | None) -> Path:
    candidate = Path(path)
    if not candidate.is_absolute() and base_dir:
        candidate = Path(base_dir) / candidate
    return candidate


def _read_trace(path: Path) -> tuple[tuple[float, float], ...]:
    rows: list[tuple[float, float]] = []
    with path.open(newline="") as handle:
        for number, row in enumerate(csv.reader(handle)):
            if not row or row[0].lstrip().startswith("#"):
                continue
            try:
                rows.append((float(row[0]), float(row[1])))
            except (ValueError, IndexError):
                if number == 0:  # a header row
                    continue
                raise ValueError(f"{path}:{number + 1}: expected `time_s,rps`, got {row}") from None
    rows.sort()
    return tuple(rows)


def parse(data: dict[str, Any], base_dir: str | None = None) -> Scenario:
    """Validate a scenario given as a dict (from YAML, or built in code)."""
    if base_dir is not None and "base_dir" not in data:
        data = {**data, "base_dir": base_dir}
    return Scenario.model_validate(data)


def load_file(path: str | Path) -> Scenario:
    path = Path(path)
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a scenario is a YAML mapping")
    return parse(data, base_dir=str(path.parent.resolve()))


def builtin_names() -> list[str]:
    folder = resources.files(__package__).joinpath("scenarios")
    return sorted(item.name[: -len(".yaml")] for item in folder.iterdir()
                  if item.name.endswith(".yaml"))


def load_builtin(name: str) -> Scenario:
    folder = resources.files(__package__).joinpath("scenarios")
    item = folder.joinpath(f"{name}.yaml")
    if not item.is_file():
        raise KeyError(f"no built-in scenario {name!r}; have {', '.join(builtin_names())}")
    return parse(yaml.safe_load(item.read_text()))
