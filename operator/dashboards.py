"""`stepfleet dashboards`: the Grafana dashboards, generated from the metric names the code exports.

Dashboards are code, not hand-edited JSON, for the same reason the CRD is generated from the
models: a panel that queries a metric nobody exports shows "No data" forever and nobody
notices. Queries here are built from the name constants of each component's metrics module
(`stepfleet.serving.metrics` for workers, `stepfleet.serving.router.metrics` for the router,
`stepfleet.operator.loop.metrics` for the control loop),
and a test collects every family those modules register and fails on any `stepfleet_` name a
panel (or a Prometheus rule) uses that no component exports.

A panel may be written before the metric it reads is exported: its name then goes in
`PENDING` with the component that will export it, and the test reports it as skipped instead
of failing until that component's module exports it (none is pending now). The generated JSON
lives in `charts/stepfleet/dashboards/`,
where the chart turns each file into a ConfigMap for Grafana's dashboard sidecar.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from stepfleet.operator.loop import metrics as loop_metrics
from stepfleet.serving import metrics as worker
from stepfleet.serving.router import metrics as router

DEFAULT_DIR = Path("charts/stepfleet/dashboards")


@dataclass(frozen=True)
class Component:
    """A process that exports `stepfleet_` metrics, and the module that declares them."""

    name: str
    module: str


#: Every component that exports metrics. A module that does not exist yet is skipped (and said so).
COMPONENTS: tuple[Component, ...] = (
    Component("worker", "stepfleet.serving.metrics"),
    Component("router", "stepfleet.serving.router.metrics"),
    Component("control loop", "stepfleet.operator.loop.metrics"),
)

# The control loop's gauges (`stepfleet.operator.loop.metrics`, served by `stepfleet operator`).
OPERATOR_MODE = loop_metrics.MODE  # gauge {namespace, diffusionservice, mode}: 1 for the current mode
OPERATOR_COST = loop_metrics.COST  # gauge {namespace, diffusionservice}
OPERATOR_REPLICAS = loop_metrics.POOL_REPLICAS  # gauge {namespace, diffusionservice, pool}: desired
OPERATOR_CAPACITY_SHORT = loop_metrics.POOL_CAPACITY_SHORT  # gauge {..., pool}: 1 while short
CACHE_HITS = "stepfleet_template_cache_hits_total"  # counter {pool}
CACHE_MISSES = "stepfleet_template_cache_misses_total"  # counter {pool}

#: name -> who will export it (the issue that builds it). Empty: every metric used is exported.
PENDING: dict[str, str] = {}

_METRIC = re.compile(r"(?<![\w:])stepfleet_[A-Za-z0-9_]*(?![\w:])")


def referenced_metrics(expr: str) -> set[str]:
    """`stepfleet_` metric names a PromQL expression reads (recorded `a:b:c` names excluded)."""
    return set(_METRIC.findall(expr))


def _sample_names(family_name: str, kind: str) -> set[str]:
    """The series names a family exposes, as PromQL sees them."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
        "summary": ("", "_sum", "_count"),
        "info": ("_info",),
    }.get(kind, ("",))
    return {family_name + s for s in suffixes}


def exported_metrics(components: Iterable[Component] = COMPONENTS) -> tuple[set[str], list[Component]]:
    """(series names the present components export, components whose module does not exist yet).

    Each metrics class in a component's module (one whose constructor takes `registry`) is
    instantiated on a fresh registry and its families listed, so the answer is what the code
    registers, not what a list says.
    """
    from prometheus_client import CollectorRegistry

    names: set[str] = set()
    missing: list[Component] = []
    for comp in components:
        try:
            module = importlib.import_module(comp.module)
        except ModuleNotFoundError as exc:
            if exc.name and comp.module.startswith(exc.name):
                missing.append(comp)
                continue
            raise
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__:
                continue
            if "registry" not in inspect.signature(cls).parameters:
                continue
            registry = CollectorRegistry()
            cls(registry=registry)
            for family in registry.collect():
                names |= _sample_names(family.name, family.type)
    return names, missing


# ---------------------------------------------------------------------------------------------
# The fleet overview dashboard

_SEL = 'namespace=~"$namespace", pool=~"$pool"'
_NS = 'namespace=~"$namespace"'
_RATE = "[$__rate_interval]"


def _quantile(q: float, metric: str) -> str:
    return f"histogram_quantile({q}, sum by (pool, le) (rate({metric}_bucket{{{_SEL}}}{_RATE})))"


def fleet_overview() -> dict:
    """The fleet overview: replicas, weights, mode, cost, latency, SLO, queues, cache."""
    from grafana_foundation_sdk.builders import dashboard as db
    from grafana_foundation_sdk.builders import prometheus as prom
    from grafana_foundation_sdk.builders import stat, statetimeline, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import dashboard as dm

    ds = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")

    def q(expr: str, legend: str, ref: str = "A") -> prom.Dataquery:
        return prom.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(ds)

    def ts(title: str, unit: str, *targets: prom.Dataquery, desc: str = "", width: int = 8):
        panel = timeseries.Panel().title(title).unit(unit).datasource(ds).span(width).height(8)
        panel = panel.description(desc) if desc else panel
        for t in targets:
            panel = panel.with_target(t)
        return panel

    def states(title: str, target: prom.Dataquery, desc: str, width: int = 8):
        return (statetimeline.Panel().title(title).description(desc).datasource(ds).span(width).height(8)
                .with_target(target))

    def label_var(name: str, label: str, query: str, multi: bool) -> db.QueryVariable:
        return (db.QueryVariable(name).label(label).datasource(ds)
                .query({"query": query, "refId": f"{name}-var"})
                .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC)
                .multi(multi).include_all(True).all_value(".*"))

    d = (
        db.Dashboard("stepfleet / Fleet overview")
        .uid("stepfleet-fleet-overview")
        .description("Per-pool replicas, router weights, control-loop mode and cost, latency, SLO "
                     "attainment, queues and the template cache. Generated by `stepfleet dashboards`.")
        .tags(["stepfleet", "generated"])
        .editable()
        .refresh("30s")
        .time("now-3h", "now")
        .timezone("browser")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .with_variable(db.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .with_variable(label_var("namespace", "Namespace", f"label_values({worker.READY}, namespace)", False))
        .with_variable(label_var("pool", "Pool", f"label_values({worker.READY}{{{_NS}}}, pool)", True))
        # --- capacity and cost -----------------------------------------------------------------
        .with_row(db.Row("Fleet: replicas, weights, mode, cost"))
        .with_panel(ts("Ready replicas per pool", "short",
                       q(f"sum by (pool) ({worker.READY}{{{_SEL}}})", "{{pool}}"),
                       desc="Workers whose model is loaded and warm (stepfleet_worker_ready)."))
        .with_panel(ts("Desired replicas per pool", "short",
                       q(f"max by (diffusionservice, pool) ({OPERATOR_REPLICAS}{{{_SEL}}})",
                         "{{diffusionservice}}/{{pool}}"),
                       desc="Replicas the control loop asks for."))
        .with_panel(ts("Router weight per pool", "percentunit",
                       q(f"max by (pool) ({router.WEIGHT}{{{_SEL}}})", "{{pool}}"),
                       desc="Share of new requests each pool gets (sums to 1)."))
        .with_panel(states("Control-loop mode",
                           q(f"max by (diffusionservice, mode) ({OPERATOR_MODE}{{{_NS}}}) == 1",
                             "{{diffusionservice}}: {{mode}}"),
                           "cost: cheapest per image first; capacity: spread over every pool with capacity."))
        .with_panel(states("Capacity short",
                           q(f"max by (diffusionservice, pool) ({OPERATOR_CAPACITY_SHORT}{{{_SEL}}})",
                             "{{diffusionservice}}/{{pool}}"),
                           "1 while the control loop holds a pool short of capacity."))
        .with_panel(stat.Panel().title("Cost per hour").unit("currencyUSD").datasource(ds).span(8).height(8)
                    .description("Sum over pools of replicas x price per hour, per DiffusionService.")
                    .with_target(q(f"sum by (diffusionservice) ({OPERATOR_COST}{{{_NS}}})", "{{diffusionservice}}")))
        # --- latency and SLO --------------------------------------------------------------------
        .with_row(db.Row("Latency and SLO"))
        .with_panel(ts("Request latency (worker) p50 / p95 / p99", "s",
                       q(_quantile(0.5, worker.REQUEST_SECONDS), "p50 {{pool}}", "A"),
                       q(_quantile(0.95, worker.REQUEST_SECONDS), "p95 {{pool}}", "B"),
                       q(_quantile(0.99, worker.REQUEST_SECONDS), "p99 {{pool}}", "C")))
        .with_panel(ts("SLO attainment", "percentunit",
                       q(f'sum by (pool) (rate({worker.SLO}{{{_SEL}, outcome="met"}}{_RATE}))'
                         f" / sum by (pool) (rate({worker.SLO}{{{_SEL}}}{_RATE}))", "{{pool}}"),
                       desc="Share of requests with a deadline that met it."))
        .with_panel(ts("Requests per second", "reqps",
                       q(f"sum by (pool, status) (rate({worker.REQUESTS}{{{_SEL}}}{_RATE}))", "{{pool}} {{status}}")))
        .with_panel(ts("Router upstream latency p95", "s",
                       q(_quantile(0.95, router.UPSTREAM_SECONDS), "{{pool}}"),
                       desc="One forwarded attempt, as the router sees it."))
        .with_panel(ts("Queue wait p95", "s", q(_quantile(0.95, worker.QUEUE_SECONDS), "{{pool}}"),
                       desc="Arrival to first denoising step."))
        .with_panel(ts("Images per second", "short",
                       q(f"sum by (pool) (rate({worker.IMAGES}{{{_SEL}}}{_RATE}))", "{{pool}}")))
        # --- engine and cache -------------------------------------------------------------------
        .with_row(db.Row("Workers: queues, batches, cache"))
        .with_panel(ts("Queue depth", "short", q(f"sum by (pool) ({worker.QUEUE_DEPTH}{{{_SEL}}})", "{{pool}}")))
        .with_panel(ts("Running batch size", "short",
                       q(f"avg by (pool) ({worker.RUNNING_BATCH}{{{_SEL}}})", "{{pool}}"),
                       desc="Images in the last denoising step's batch, averaged over workers."))
        .with_panel(ts("Denoising step p95", "s", q(_quantile(0.95, worker.STEP_SECONDS), "{{pool}}")))
        .with_panel(ts("Backlog", "s", q(f"max by (pool) ({worker.BACKLOG_SECONDS}{{{_SEL}}})", "{{pool}}"),
                       desc="Estimated seconds to finish all accepted work (worst worker)."))
        .with_panel(ts("Template cache hit ratio", "percentunit",
                       q(f"sum by (pool) (rate({CACHE_HITS}{{{_SEL}}}{_RATE})) / (sum by (pool) "
                         f"(rate({CACHE_HITS}{{{_SEL}}}{_RATE})) + sum by (pool) "
                         f"(rate({CACHE_MISSES}{{{_SEL}}}{_RATE})))", "{{pool}}")))
        .with_panel(ts("Preemptions per second", "short",
                       q(f"sum by (pool) (rate({worker.PREEMPTIONS}{{{_SEL}}}{_RATE}))", "{{pool}}"),
                       desc="Requests paused at a step boundary for a more urgent one."))
    )
    return _prune(json.loads(JSONEncoder(sort_keys=True, indent=2).encode(d.build())))


def _prune(node):
    """Drop nulls the SDK leaves for unset fields (`"options": null`), which Grafana does not default."""
    if isinstance(node, dict):
        return {k: _prune(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [_prune(v) for v in node]
    return node


#: file stem -> builder.
DASHBOARDS = {"fleet-overview": fleet_overview}


def render() -> dict[str, str]:
    """file name -> JSON text, exactly as committed."""
    return {f"{stem}.json": json.dumps(build(), indent=2, sort_keys=True) + "\n" for stem, build in DASHBOARDS.items()}


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query in a dashboard, rows included."""
    out = []
    for panel in dashboard.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets") or []:
                if target.get("expr"):
                    out.append((inner.get("title", ""), target["expr"]))
    return out


def main(argv: list[str]) -> int:
    """`stepfleet dashboards [--check] [--output DIR]`."""
    parser = argparse.ArgumentParser(prog="stepfleet dashboards", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_DIR, help="directory for the JSON files")
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is missing or out of date")
    args = parser.parse_args(argv)
    files = render()
    if args.check:
        stale = [n for n, text in files.items()
                 if not (args.output / n).exists() or (args.output / n).read_text() != text]
        if stale:
            print(f"out of date in {args.output}: {', '.join(stale)}; run `stepfleet dashboards`", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.output / name).write_text(text)
        print(f"wrote {args.output / name}")
    return 0
