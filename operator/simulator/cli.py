"""`stepfleet simulate`: run policies over a scenario and print what they cost and served.

    stepfleet simulate --scenario shortage --policy all --json
    stepfleet simulate --scenario-file my.yaml --policy ours --timeline ticks.csv
    stepfleet simulate --scale --policy ours --json
    stepfleet simulate --list
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from .engine import RunLog
from .runner import POLICIES, run
from .scale import scale_scenario
from .scenario import Scenario, builtin_names, load_builtin, load_file


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepfleet simulate",
        description="Event-driven, request-level simulation of the cost/capacity control "
                    "loop against baseline policies (docs/simulator.md).")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--scenario", metavar="NAME", help="a built-in scenario (see --list)")
    source.add_argument("--scenario-file", metavar="FILE", help="a scenario YAML file")
    source.add_argument("--scale", action="store_true",
                        help="10 pools x 1,000 replicas and about 1 M requests")
    parser.add_argument("--policy", default="all", metavar="NAME|all",
                        help=f"one of {', '.join(POLICIES)}, a comma-separated list, or all "
                             "(default: all)")
    parser.add_argument("--seed", type=int, help="override the scenario's seed")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--timeline", metavar="CSV",
                        help="write every control tick (mode, replicas, weights) to a CSV")
    parser.add_argument("--list", action="store_true",
                        help="list built-in scenarios and policies, then exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list:
        print("scenarios: " + ", ".join(builtin_names()))
        print("policies:  " + ", ".join(POLICIES))
        return 0
    policies = list(POLICIES) if args.policy == "all" else args.policy.split(",")
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        parser.error(f"unknown policy {', '.join(unknown)}; have {', '.join(POLICIES)} or all")
    try:
        scenario = _scenario(args)
    except (KeyError, OSError, ValueError, ValidationError) as error:
        print(f"stepfleet simulate: {error}", file=sys.stderr)
        return 1
    if scenario is None:
        parser.error("give --scenario NAME, --scenario-file FILE or --scale")

    runs: list[RunLog] = []
    document = run(scenario, policies, seed=args.seed,
                   on_run=runs.append if args.timeline else None)
    if args.timeline:
        _write_timeline(Path(args.timeline), runs)
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(_table(document))
    return 0


def _scenario(args: argparse.Namespace) -> Scenario | None:
    if args.scale:
        return scale_scenario()
    if args.scenario_file:
        return load_file(args.scenario_file)
    if args.scenario:
        return load_builtin(args.scenario)
    return None


def _table(document: dict) -> str:
    lines = [
        f"scenario {document['scenario']}: {document['duration_s']:.0f} s, "
        f"{document['requests']:,} requests, seed {document['seed']}; "
        f"cost lower bound ${document['cost_lower_bound_usd']:.2f}",
        f"{'policy':<16}{'attainment':>11}{'cost $':>10}{'$/1k img':>10}{'dropped':>9}"
        f"{'switches':>9}{'wall s':>8}  recovery s",
    ]
    for name, result in document["policies"].items():
        recovery = ", ".join(f"{r:.0f}" for r in result["recovery_s"]) or "-"
        lines.append(
            f"{name:<16}{result['slo_attainment']:>11.4f}{result['cost_usd']:>10.2f}"
            f"{result['cost_per_1k_images']:>10.4f}{result['dropped']:>9}"
            f"{result['mode_switches']:>9}{result['wall_s']:>8.2f}  {recovery}")
    lines.append(f"total wall time {document['wall_s']:.2f} s")
    return "\n".join(lines)


def _write_timeline(path: Path, runs: list[RunLog]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        for k, log in enumerate(runs):
            names = [p.name for p in log.scenario.pools]
            if k == 0:
                writer.writerow(["policy", "t_s", "mode"] + [f"desired_{n}" for n in names]
                                + [f"ready_{n}" for n in names] + [f"weight_{n}" for n in names])
            for tick in log.timeline:
                writer.writerow([log.policy, f"{tick.t:.0f}", tick.mode or ""]
                                + list(tick.desired) + list(tick.ready) + list(tick.weights))
