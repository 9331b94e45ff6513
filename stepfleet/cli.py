"""The `stepfleet` command: a thin dispatcher over subcommands that live beside their code.

Each subcommand is registered as ``name -> "module:function"`` and imported only when it
runs, so `stepfleet worker` never imports kopf and `stepfleet operator` never imports torch.
A subcommand function takes the remaining argv (a list of strings) and returns an exit code.
"""

from __future__ import annotations

import importlib
import sys

#: name -> (target "module:function", one-line help). Keep sorted by name.
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("stepfleet.serving.bench.cli:main", "run a benchmark (engine, ...) and print JSON"),
    "crds": ("stepfleet.operator.crdgen:main", "write (or --check) the DiffusionService CRD YAML"),
    "dashboards": ("stepfleet.operator.dashboards:main", "write (or --check) the Grafana dashboards for the chart"),
    "model": ("stepfleet.serving.cli:model_main", "write a built-in model (tiny-sd) to a directory"),
    "operator": ("stepfleet.operator.main:main", "run the kopf operator that reconciles DiffusionServices"),
    "router": ("stepfleet.serving.router.cli:main", "run the router: OpenAI-compatible front door over worker pools"),
    "simulate": ("stepfleet.operator.simulator.cli:main", "simulate the cost/capacity loop against baselines"),
    "soak": ("stepfleet.operator.local.soak:main", "soak a local fleet: load, a killed and a hung worker, leak checks"),
    "train": ("stepfleet.training.cli:main", "train the project's own small model (mini-sd) on Fashion-MNIST scenes"),
    "up": ("stepfleet.operator.local.cli:main", "run a local fleet: router, workers per pool and the control loop"),
    "worker": ("stepfleet.serving.cli:worker_main", "run a worker: the step-level engine behind the image API"),
}


#: (command, subcommand) -> "module:function" for subcommands that live in another package
#: than their command's (the quality bench is the training package's: serving never imports it).
SUBCOMMANDS: dict[tuple[str, str], str] = {
    ("bench", "quality"): "stepfleet.training.quality:main",
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: stepfleet COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in sorted(COMMANDS.items())]
    lines += ["", "Run `stepfleet COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if argv[0] == "--version":
        from stepfleet import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    from stepfleet.allocator import single_malloc_arena

    single_malloc_arena()  # before any thread: the step loop's allocations share the main arena
    if name not in COMMANDS:
        print(f"stepfleet: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target = COMMANDS[name][0]
    if rest and (name, rest[0]) in SUBCOMMANDS:
        target, rest = SUBCOMMANDS[(name, rest[0])], rest[1:]
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
