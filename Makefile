# hpc-relay: `make demo` and `make test` are the whole quick start.
# .venv (PYTHON, default python3) serves the demo, lint, docs, fuzz and bench; the suite runs
# in one venv per interpreter, .venv-X.Y (scripts/test-pythons).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv demo test test-one lint dist-check unit debs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

## the whole chain on loopback through an idle-killing middlebox
demo: venv
	$(BIN)/relay demo

debs:
	./scripts/install-debs

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/vermin --target=3.9- --no-tips --violations --eval-annotations relay glidein_wrapper

## python -m build without warnings; the wheel installed (binary wheels only) into a fresh
## venv of the oldest Python, every console script run from there; again as nobody if root
dist-check: venv
	./scripts/check-dist $(BIN)/python

## lint, the package check, then every test on the oldest and on the newest Python found
## (pyenv, python3.X on PATH: scripts/pythons; needs root for namespaces and Debian packages)
test: venv debs lint dist-check
	./scripts/test-pythons -- $(PYTEST_ARGS)
	$(MAKE) soak-ci

## every test on one interpreter: make test-one PY=3.9 (or a path, or python3.12)
PY ?= $(PYTHON)
test-one: debs
	./scripts/test-pythons --python $(PY) -- $(PYTEST_ARGS)

## regenerate docs/CONFIG.md from the option schema (a test fails when it is stale)
.PHONY: docs
docs: venv
	$(BIN)/python -m relay.config.doc > docs/CONFIG.md.tmp
	mv docs/CONFIG.md.tmp docs/CONFIG.md

## long coverage-guided fuzzing of the protocol codecs (atheris; FUZZ_SECONDS, default 600)
FUZZ_SECONDS ?= 600
.PHONY: fuzz
fuzz: venv
	$(BIN)/python -m pip install -q atheris
	$(BIN)/python tests/fuzz/fuzz_codecs.py -max_total_time=$(FUZZ_SECONDS) .fuzz-corpus

## the fast tests only: no root, no namespaces
unit: venv
	$(BIN)/pytest -m unit $(PYTEST_ARGS)

## relay vs the old chain, side by side: the namespace lab first (the primary table), then
## loopback (as root; about 20 min expected; updates docs/PERFORMANCE.md)
BENCH_STAMP := $(VENV)/.bench-stamp
BENCH_ARGS ?=
$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $(BENCH_STAMP)

.PHONY: bench bench-quick
bench: $(BENCH_STAMP)
	./bench/install-debs
	$(BIN)/python -m bench --full --update-docs $(BENCH_ARGS)

## the same in a few minutes: small sizes, one lab round (results under bench/results/ only)
bench-quick: $(BENCH_STAMP)
	./bench/install-debs
	$(BIN)/python -m bench --quick $(BENCH_ARGS)

## compute nodes, login nodes and exits in namespaces, verified streams under faults on a
## schedule (bench/soak.py); `make soak` is the full run: 8 workers, 10,000 streams, 30 min
SOAK_ARGS ?=
.PHONY: soak soak-ci
soak: $(BENCH_STAMP) debs
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

## the soak's 3-minute version, once per `make test` (results in .test-results/soak-ci/)
soak-ci: venv debs
	$(BIN)/python -m bench.soak --ci --out .test-results/soak-ci $(SOAK_ARGS)

## a batch site in namespaces: COBalD/TARDIS runs glidein.sbatch under Slurm behind the relay
## (root; about 2 minutes, the first run also installs COBalD/TARDIS into a venv)
.PHONY: site-demo
site-demo: venv debs
	$(BIN)/python -m tests.support.site_demo $(SITE_DEMO_ARGS)

clean:
	rm -rf $(VENV) .venv-3.* .test-results .pytest_cache .mypy_cache .ruff_cache .hypothesis
