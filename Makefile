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
PROFILE ?=

RUN_DIR := reports/runs/$(RUN)
# ISOLATE=1: hand-written kernels run in a worker process too (plugins always do; ISOLATE=0: none)
ISOLATION := $(if $(filter 1 all,$(ISOLATE)),all,$(if $(filter 0 none,$(ISOLATE)),none,plugins))
BENCH_JSON := $(RUN_DIR)/benchmark$(if $(RESUME),-resumed-$(shell date +%H%M%S),).json
BENCH_FLAGS = --bench --ops=$(OPS) --impls=$(IMPLS) --tier=$(TIER) --dtypes=$(DTYPES) \
	--modes=$(MODES) --run-id=$(RUN) --benchmark-json=$(BENCH_JSON) \
	--benchmark-columns=median,iqr,rounds --benchmark-sort=name \
	--isolate=$(ISOLATION) --bench-timeout=$(TIMEOUT) $(if $(RESUME),--resume) \
	$(if $(filter 1,$(PROFILE)),--profile) \
	$(if $(filter-out 1,$(WORKERS)),-n $(WORKERS) --dist loadgroup)
export KERNELS_PLUGINS := $(PLUGINS)

.PHONY: bench profile test compare summary setup clean-venv gpu gpu-wheels

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

# The benchmarks with a profiler trace each and the run timeline under profiles/<run-id>/.
profile: $(SETUP)
	@$(MAKE) --no-print-directory bench PROFILE=1

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

# ---------------------------------------------------------------- the H100 run (issue: baselines)
# On a CPU machine with network: `make gpu-wheels` fetches what the GPU machine lacks (perfetto and
# protobuf wheels for its Python 3.12) into wheels/ (ignored by git; carry it along).
# On the GPU machine (no network, its own CUDA torch / Triton / JAX): `make gpu OUT=<dir>` runs
# the tests and the `standard` tier of every op in one go and writes records, pytest-benchmark
# JSON, the report and traces into OUT.
GPU_VENV := .gpuvenv
GPU_PY := $(GPU_VENV)/bin/python
GPU_DTYPES ?= bf16
GPU_RUN ?= $(shell date +%Y%m%d)-gpu
OUT ?= reports/gpu-out

gpu-wheels:
	python3 -m pip download --no-deps -d wheels perfetto==0.59.1
	python3 -m pip download --no-deps -d wheels protobuf==7.36.2 --python-version 3.12 \
		--only-binary=:all: --platform manylinux2014_x86_64

gpu:
	python3 -m venv --system-site-packages $(GPU_VENV)
	$(GPU_PY) -m pip install --no-index --find-links wheels perfetto protobuf \
		|| echo "no perfetto wheel in wheels/: the run timeline will be missing"
	mkdir -p $(OUT)
	$(GPU_PY) -c "import torch, triton, jax; print(torch.__version__, torch.cuda.get_device_name(0), triton.__version__, jax.__version__, jax.devices())" | tee $(OUT)/env.txt
	nvidia-smi >> $(OUT)/env.txt 2>&1 || true
	-$(GPU_PY) -m pytest tests -q -p no:cacheprovider --junitxml=$(OUT)/tests.xml \
		--ignore=tests/test_faults.py 2>&1 | tail -40 | tee $(OUT)/tests.txt
	-$(MAKE) bench PYTHON=$(GPU_PY) TIER=standard DTYPES=$(GPU_DTYPES) RUN=$(GPU_RUN) \
		MODES=fwd,bwd 2>&1 | tail -400 > $(OUT)/bench.txt
	cp -r reports/runs/$(GPU_RUN) $(OUT)/run
