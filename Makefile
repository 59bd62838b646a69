# The README's two commands: `make demo` and `make test`. Both set up what they need, once.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Debian packages the demo and the tests run for real: etcd (its client lists keys for tests) and
# Prometheus (with promtool); docker-compose checks the compose file (no engine runs here);
# openssl makes the TLS tests' certificates.
DEBIAN_PACKAGES := etcd-server etcd-client prometheus docker-compose openssl
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: demo test soak simulate bench lint typecheck unit setup debian-packages clean

demo: setup
	$(BIN)/python -m etcd_rdzv_devtools.demo

test: setup lint typecheck
	$(BIN)/pytest $(PYTEST_ARGS)

# 200 rendezvous rounds per etcd API with random kills and restarts; a few minutes.
soak: setup
	$(BIN)/pytest tests/soak -m soak -s $(PYTEST_ARGS)

# The deterministic simulator over as many seeded schedules as asked (make test runs 0-1999
# and the large ones): SEEDS=17 replays one, SEEDS=0-99999 searches; NODES=1000 fixes the size;
# RANK_POLICIES=1 draws a rank policy for each claims-layout schedule (make test: seeds 0-999).
SEEDS ?= 0-1999
NODES ?=
RANK_POLICIES ?=
simulate: setup
	$(BIN)/python -m tests.simulation $(SEEDS) $(if $(NODES),--nodes $(NODES)) $(if $(RANK_POLICIES),--rank-policies)

# Rendezvous latency, etcd requests and CPU against torch's backends, N = 2 to 256 (about 20
# minutes on 2 cores): prints the tables, writes runs/bench/results.json, docs/benchmarks.png and the
# generated section of docs/benchmarks.md. BENCH_ARGS="--nodes 2 8 --rounds 1" for a quick look.
BENCH_ARGS ?=
bench: setup
	$(BIN)/python benchmarks/rendezvous_latency.py $(BENCH_ARGS)

unit: setup
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

# lint-imports proves the seams (pyproject.toml, [tool.importlinter]).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: setup
	$(BIN)/mypy

setup: debian-packages $(VENV)/.installed

debian-packages:
	@missing=""; for pkg in $(DEBIAN_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$pkg 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages:$$missing"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# torch is pinned here, before the project, so that pip takes the CPU build on this disk
# instead of resolving the package's range to a multi-GB CUDA build.
# The development tools (devtools/: a local etcd, the demo) are a package of their own.
$(VENV)/.installed: pyproject.toml devtools/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e ./devtools
	touch $@

clean:
	rm -rf $(VENV) runs .mypy_cache .ruff_cache .pytest_cache
