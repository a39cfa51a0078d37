# Two commands: `make bench` (the benchmarks) and `make test` (the tests). Both set up .venv first.
# On a machine whose Python already has CUDA torch, Triton and JAX (no network), pass
# PYTHON=python3 to use it and install nothing.

PYTHON ?=
VENV ?= .venv
ifeq ($(strip $(PYTHON)),)
PY := $(VENV)/bin/python
SETUP := $(VENV)/.installed
else
PY := $(PYTHON)
SETUP :=
endif

OPS ?=
IMPLS ?=
TIER ?= smoke
DTYPES ?=
MODES ?= fwd
RUN ?= $(if $(RESUME),$(RESUME),$(shell date +%Y%m%d-%H%M%S))
BASE ?=
HEAD ?=
THRESHOLD ?= 10
PYTEST_ARGS ?=
PLUGINS ?= $(KERNELS_PLUGINS)
ISOLATE ?=
TIMEOUT ?= 900
RESUME ?=
WORKERS ?= 1

RUN_DIR := reports/runs/$(RUN)
# ISOLATE=1: hand-written kernels run in a worker process too (plugins always do; ISOLATE=0: none)
ISOLATION := $(if $(filter 1 all,$(ISOLATE)),all,$(if $(filter 0 none,$(ISOLATE)),none,plugins))
BENCH_JSON := $(RUN_DIR)/benchmark$(if $(RESUME),-resumed-$(shell date +%H%M%S),).json
BENCH_FLAGS = --bench --ops=$(OPS) --impls=$(IMPLS) --tier=$(TIER) --dtypes=$(DTYPES) \
	--modes=$(MODES) --run-id=$(RUN) --benchmark-json=$(BENCH_JSON) \
	--benchmark-columns=median,iqr,rounds --benchmark-sort=name \
	--isolate=$(ISOLATION) --bench-timeout=$(TIMEOUT) $(if $(RESUME),--resume) \
	$(if $(filter-out 1,$(WORKERS)),-n $(WORKERS) --dist loadgroup)
export KERNELS_PLUGINS := $(PLUGINS)

.PHONY: bench test compare summary setup clean-venv

setup: $(SETUP)

# Re-installs only when requirements.txt changes.
$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

bench: $(SETUP)
	@mkdir -p $(RUN_DIR)
	$(PY) -m pytest tests/bench -v $(BENCH_FLAGS) $(PYTEST_ARGS)

test: $(SETUP)
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

# Compares the device-time medians of two runs (default: the last two under reports/runs) and
# fails on a regression over THRESHOLD percent.
compare: $(SETUP)
	$(PY) -m harness.compare $(BASE) $(HEAD) --threshold $(THRESHOLD)

summary: $(SETUP)
	$(PY) -m harness.summary $(if $(RUN),$(RUN_DIR),reports/latest)

clean-venv:
	rm -rf $(VENV)
