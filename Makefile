# stepfleet — two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch 2.13.0 is what this project's machines install from disk; install it
# first so nothing resolves a CUDA build. GPU users bring their own torch (any 2.x the range allows).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# The repository's top-level operator/ folder would shadow Python's standard `operator` module
# for any `python -m ...` run from here before the project is installed; never put the working
# directory on sys.path (Python >= 3.11 honours this; the installed package is what we import).
export PYTHONSAFEPATH := 1
PYTEST_ARGS ?=

.PHONY: install tools demo test test-all lint fuzz bench-engine bench-engine-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/python -m stepfleet.operator.local.demo --out demo.png

# helm and promtool for the deployment tests (tests/deploy), into .tools/bin; instant once there.
tools:
	bash scripts/fetch-tools.sh

test: install tools
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-all: install tools
	$(BIN)/python -m pytest -q -m '' $(PYTEST_ARGS)

# Schema-driven fuzzing of a worker and the router (1,000 cases each; the default suite runs 60).
# docs/reliability.md records its counts.
FUZZ_CASES ?= 1000
fuzz: install
	STEPFLEET_FUZZ_CASES=$(FUZZ_CASES) $(BIN)/python -m pytest -q -s --timeout 1800 tests/serving/test_fuzz.py $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check stepfleet serving operator training tests

bench-engine: install
	$(BIN)/stepfleet bench engine --json > docs/results/bench-engine.json

bench-engine-quick: install
	$(BIN)/stepfleet bench engine --json --quick

# Issue 19's soak: `stepfleet up` (mini-sd, two workers) at 0.9 of its measured capacity for 10 minutes,
# a worker killed at 30 % of the run and the restarted one stopped (SIGSTOP) at 60 %; about 13 minutes.
# Prints the verdict, writes the report; exit code 1 when a criterion fails (docs/reliability.md).
.PHONY: soak
soak: install
	$(BIN)/stepfleet soak --out docs/results/soak-cpu.json

clean:
	rm -rf $(VENV) build *.egg-info demo.png
