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
REPORT_RUN := $(RUN)
RUN ?= $(if $(RESUME),$(RESUME),$(shell date +%Y%m%d-%H%M%S))
ifneq ($(and $(RESUME),$(filter-out $(RESUME),$(RUN))),)
$(error RESUME=$(RESUME) and RUN=$(RUN) name two runs: RESUME=<run-id> alone continues a run)
endif
# Expanded once: a recursive RUN re-ran `date` at every use, so a run that began with a slow setup
# (installing the venv) wrote its records under one id and looked for them under another.
RUN := $(RUN)
BASE ?=
HEAD ?=
THRESHOLD ?= 10
PYTEST_ARGS ?=
PLUGINS ?= $(KERNELS_PLUGINS)
ISOLATE ?=
TIMEOUT ?= 900
RESUME ?=
WORKERS ?= 1
TEST_WORKERS ?= 2
PROFILE ?=
RETIME ?=
COLD ?= first
# TARGETS_FIRST=1: the benchmarks the GPU targets read (harness.targets) run before the others
TARGETS_FIRST ?=
# comma-separated case names (harness.cases.parse): these cases instead of the tier's
SHAPES ?=

ifneq ($(filter-out 0 1,$(PROFILE) $(TARGETS_FIRST)),)
$(error PROFILE and TARGETS_FIRST take 1 or 0, got PROFILE=$(PROFILE) TARGETS_FIRST=$(TARGETS_FIRST))
endif

# the reports root, as harness.results has it (KERNELS_REPORTS moves it, e.g. in the tests)
REPORTS := $(or $(KERNELS_REPORTS),reports)
PROFILES := $(or $(KERNELS_PROFILES),profiles)
RUN_DIR := $(REPORTS)/runs/$(RUN)
# ISOLATE=1: hand-written kernels run in a worker process too (plugins always do; ISOLATE=0: none)
# (any other value goes to pytest as it is, which refuses it)
ISOLATION := $(if $(filter 1 all,$(ISOLATE)),all,$(if $(filter 0 none,$(ISOLATE)),none,$(or $(ISOLATE),plugins)))
BENCH_JSON := $(RUN_DIR)/benchmark$(if $(RESUME),-resumed-$(shell date +%H%M%S),).json
BENCH_FLAGS = --bench --ops=$(OPS) --impls=$(IMPLS) --tier=$(TIER) --dtypes=$(DTYPES) \
	--modes=$(MODES) $(if $(SHAPES),--shapes='$(SHAPES)') --run-id=$(RUN) \
	--benchmark-json=$(BENCH_JSON) \
	--benchmark-columns=median,iqr,rounds --benchmark-sort=name \
	--isolate=$(ISOLATION) --bench-timeout=$(TIMEOUT) $(if $(RESUME),--resume) \
	$(if $(filter 1,$(PROFILE)),--profile) $(if $(RETIME),--retime=$(RETIME)) \
	--compile-cold=$(COLD) $(if $(filter 1,$(TARGETS_FIRST)),--targets-first) \
	$(if $(filter-out 1,$(WORKERS)),-n $(WORKERS) --dist loadgroup)
export KERNELS_PLUGINS := $(PLUGINS)

.PHONY: bench report profile test compare summary setup clean-venv gpu gpu-wheels aot

setup: $(SETUP)

# Re-installs only when requirements.txt changes.
$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

# The report is written even when some implementations failed; the exit status stays pytest's.
# A refused call (pytest's usage error, exit 4: a bad filter, a RUN already used) writes no
# report, and leaves no run directory it made.
# Exit status 75 (harness.runner.CONTEXT_LOST_EXIT): a benchmark left the process's CUDA context
# unusable, and the benchmarks after it that needed that process were not run; each such pass
# records at least that benchmark, so resuming in a fresh process until there is none ends.
bench: $(SETUP)
	@mkdir -p $(RUN_DIR)
	@$(PY) -m pytest tests/bench -v $(BENCH_FLAGS) $(PYTEST_ARGS); status=$$?; lost=; \
	while [ $$status -eq 75 ]; do lost=1; \
		echo "CUDA context lost (above): resuming run $(RUN) in a fresh process"; \
		$(PY) -m pytest tests/bench -v $(BENCH_FLAGS) --resume \
			--benchmark-json=$(RUN_DIR)/benchmark-resumed-$$(date +%H%M%S).json \
			$(PYTEST_ARGS); status=$$?; \
	done; \
	[ -z "$$lost" ] || [ $$status -ne 0 ] || status=1; \
	if [ $$status -ne 4 ] && [ -f $(RUN_DIR)/results.jsonl ]; then \
		$(PY) -m harness.report $(RUN_DIR) || status=1; \
	else rmdir $(RUN_DIR) 2>/dev/null; fi; exit $$status

# reports/<run>/index.html and summary.md; RUN=<run-id> or a directory such as
# reports/baselines/<gpu>/<date> (default: the reports root's latest). BASE=<run> adds a comparison.
report: $(SETUP)
	$(PY) -m harness.report $(if $(REPORT_RUN),$(REPORT_RUN),$(REPORTS)/latest) \
		$(if $(REPORT_OUT),--out $(REPORT_OUT)) $(if $(BASE),--compare $(BASE))

# The benchmarks with a profiler trace each and the run timeline under profiles/<run-id>/.
profile: $(SETUP)
	@$(MAKE) --no-print-directory bench PROFILE=1

# Tests spread over TEST_WORKERS pytest-xdist processes (0: one process). Two halve the 2-core CI
# machine's wall time; each worker holds its own torch, JAX and Triton (1-2 GB).
test: $(SETUP)
	$(PY) -m pytest tests -q -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# Compares the device-time medians of two runs (default: the last two under reports/runs) and
# fails on a regression over THRESHOLD percent.
compare: $(SETUP)
	$(PY) -m harness.compare $(BASE) $(HEAD) --threshold $(THRESHOLD) --report

summary: $(SETUP)
	$(PY) -m harness.summary $(if $(REPORT_RUN),$(REPORT_RUN),$(REPORTS)/latest)

clean-venv:
	rm -rf $(VENV)

# Every Triton kernel config the tier's cases launch, and every Pallas kernel as Pallas' GPU
# lowering hands it to Triton, compiled for a GPU that need not be here (TARGET, default Hopper):
# registers, spills, shared memory, wgmma, and what does not compile.
TARGET ?= cuda:90
# CASES: a regular expression; only the cases whose name it finds (e.g. _q1_, the decode steps)
CASES ?=
# the GPU's tier unless TIER is given (the Makefile's own default is the CPU's smoke tier)
AOT_TIER := $(if $(filter file,$(origin TIER)),standard,$(TIER))
aot: $(SETUP)
	$(PY) -m harness.aot --tier $(AOT_TIER) --target $(TARGET) \
		$(if $(OPS),--ops $(OPS)) $(if $(IMPLS),--impls $(IMPLS)) \
		$(if $(DTYPES),--dtypes $(DTYPES)) --modes fwd,bwd \
		$(if $(CASES),--cases '$(CASES)') $(if $(SHAPES),--shapes '$(SHAPES)')

# ---------------------------------------------------------------- the H100 run (issue: baselines)
# On a CPU machine with network: `make gpu-wheels` fetches what the GPU machine lacks (the perfetto
# wheel, pure Python; its protobuf is there) into wheels/ (ignored by git; carry it along).
# On the GPU machine (no network, its own CUDA torch / Triton / JAX): `make gpu OUT=<dir>` runs, in
# one go, the tests (the GPU timing cross-check alone on the card, the rest in parallel), the
# `standard` tier of every op, and a few profiled benchmarks, and leaves in OUT: env.txt (commit,
# settings, versions, nvidia-smi), stages.txt, tests.txt, tests.xml, tests-gpu.xml, bench.txt and
# run.tar.gz (records, benchmark JSON, report, traces).
# Each stage has a time limit (GPU_*_S), and all of them one deadline (GPU_TOTAL_S from the start,
# less GPU_PACK_S to pack the results): a stage gets what is left when its own limit would pass
# the deadline, so the call ends inside a 10-minute command with run.tar.gz written, instead of
# being killed with the records still outside OUT. A bench stage cut short keeps what it measured
# (records are appended as they come), and `make gpu RESUME=<run>` finishes it, and the tests the
# earlier calls of the run did not reach (their JUnit files are kept in the run: below), so the
# calls together run each test once. GPU_TESTS_RAN="<dir>/tests.xml <dir>/tests-gpu.xml" names
# the JUnit files of calls made elsewhere instead (RESUME or not).
# The TPU kernels are left out here: off a TPU they only run in the TPU interpreter, which the
# CPU test run covers.
GPU_PY ?= python3
GPU_SITE := .gpusite
GPU_DTYPES ?= bf16
GPU_MODES ?= fwd,bwd
# cheapest first (in each part of GPU_TARGETS_FIRST's order, below)
GPU_OPS ?= matmul,conv2d,attention
GPU_RUN ?= $(if $(RESUME),$(RESUME),$(shell date +%Y%m%d-%H%M)-gpu)
# read the date once (a recursive variable would re-read it at every use)
GPU_RUN := $(GPU_RUN)
GPU_TEST_WORKERS ?= 8
GPU_RETIME ?= torch,triton
# Hand-written kernels run in a worker process (make bench ISOLATE=1): most of them have never run
# on a GPU, and one that hangs the GPU (a warp-specialized kernel waiting on a barrier forever) or
# poisons the CUDA context would otherwise take the rest of the stage with it. GPU_TIMEOUT bounds
# one benchmark (the slowest of the 2026-11-23 run took 12 s, cold compile included).
GPU_ISOLATE ?= 1
GPU_TIMEOUT ?= 120
# cold compiles once per implementation, dtype and mode: every case cold would double the run
GPU_COLD ?= first
# what the targets read first (matmul's five, cuDNN and triton on the ResNet-50 layers, triton's
# attention forward and backward: 120 benchmarks), then the rest of the tier in GPU_OPS
# order: a bench stage cut at its limit still judges every target
GPU_TARGETS_FIRST ?= 1
GPU_TEST_S ?= 170
GPU_BENCH_S ?= 330
GPU_PROFILE_S ?= 45
GPU_TOTAL_S ?= 570
GPU_PACK_S ?= 30
GPU_START := $(shell date +%s)
# the profiled few: the largest square matmul, the 4k-token D=128 causal attention, a ResNet 3x3,
# each by the hand-written kernels and the two frameworks' stock ops. The bench stage leaves
# GPU_PROFILE_S for them: a call whose bench is cut short still has the traces that show why.
GPU_PROFILE_CASES ?= 8192x8192x8192 or b4_h16_q4096_k4096_d128_causal or c64_3x3_n32
GPU_PROFILE_IMPLS ?= torch,xla,triton,triton_tma,pallas,pallas_mosaic
GPU_TESTS_RAN ?=
# Each call keeps its JUnit files in the run, junit/<call>-tests.xml and <call>-tests-gpu.xml, and
# marks junit/complete when both test stages ended by themselves (exit 0, 1 or 5, not at a limit).
# So a call with RESUME (and no GPU_TESTS_RAN) runs the tests none of the run's files has a result
# for, or none once complete: `make gpu RESUME=<run>` goes on where the last call stopped, tests
# and bench, with nothing carried from an earlier call's OUT while the machine is warm.
# GPU_TESTS=no: a call without tests.
GPU_JUNIT := $(REPORTS)/runs/$(GPU_RUN)/junit
ifeq ($(RESUME),)
GPU_TESTS := yes
else ifneq ($(strip $(GPU_TESTS_RAN)),)
GPU_TESTS := yes
else ifeq ($(wildcard $(GPU_JUNIT)/complete),)
GPU_TESTS := $(if $(wildcard $(GPU_JUNIT)),yes)
GPU_TESTS_RAN := $(wildcard $(GPU_JUNIT)/*.xml)
endif
# the kernels' correctness tests before the harness's own, in case the stage is cut short
GPU_TESTS_FIRST ?= test_pallas_mosaic.py test_ops_all_impls.py test_attention_kernels.py \
	test_matmul.py test_conv2d_kernels.py test_bad_input.py
GPU_SKIP_RAN := $(foreach f,$(GPU_TESTS_RAN),--skip-ran=$(abspath $(f)))
GPU_COMMIT ?= $(shell git rev-parse HEAD 2>/dev/null)
OUT ?= reports/gpu-out
GPU_STAGE := $(REPORTS)/runs/.gpu-stage

# $(call gpu_stage,<name>,<own limit s>,<command>[,<reserve s>]): the command under `timeout`, for
# its own limit or what is left before the deadline less <reserve> (kept for the stages after it),
# whichever is less (SIGINT first, so pytest writes what it has; a kill 15 s later, which
# GPU_PACK_S covers); under 10 s left, skipped, saying so. Each stage adds a line to
# OUT/stages.txt: its name, start and end (UTC), limit and exit status (124: cut at its limit), the
# provenance of what the call left.
define gpu_stage
{ left=$$(( $(GPU_START) + $(GPU_TOTAL_S) - $(GPU_PACK_S) - $(or $(4),0) - $$(date +%s) )); \
	limit=$$(( $(2) < left ? $(2) : left )); start=$$(date -u +%FT%TZ); \
	if [ $$limit -lt 10 ]; then \
		echo "skipped: $$left s left of GPU_TOTAL_S=$(GPU_TOTAL_S) (less GPU_PACK_S$(if \
		$(strip $(4)), and $(strip $(4)) s kept for the stages after it))"; rc=skipped; \
	else timeout -s INT -k 15 $$limit $(3); rc=$$?; fi; \
	echo "$(1): $$start .. $$(date -u +%FT%TZ), limit $$limit s, exit $$rc" >> $(OUT)/stages.txt; }
endef

# The run's records, benchmark JSON, report and traces into OUT/run.tar.gz (after each stage
# that adds to them, so a later stage cut short loses nothing before it).
define gpu_pack
	rm -rf $(GPU_STAGE) && mkdir -p $(GPU_STAGE)
	for d in $(REPORTS)/runs/$(GPU_RUN) $(REPORTS)/runs/$(GPU_RUN)-profile; do \
		[ ! -d $$d ] || cp -r $$d $(GPU_STAGE)/; done
	[ ! -d $(PROFILES)/$(GPU_RUN)-profile ] || cp -r $(PROFILES)/$(GPU_RUN)-profile $(GPU_STAGE)/traces
	tar czf $(OUT)/run.tar.gz -C $(GPU_STAGE) .
endef

gpu-wheels:
	python3 -m pip download --no-deps -d wheels perfetto==0.59.1

# The machine's python3 is itself a venv: packages go beside it (PYTHONPATH, ahead of what the
# machine's own PYTHONPATH holds), not into a new one.
gpu: export PYTHONPATH := $(abspath $(GPU_SITE))$(if $(PYTHONPATH),:$(PYTHONPATH))
gpu:
	@# refused before the tests spend the call's minutes: the bench stage would refuse it anyway
	@[ -n "$(RESUME)" ] || [ ! -s $(REPORTS)/runs/$(GPU_RUN)/results.jsonl ] || { \
		echo "GPU_RUN=$(GPU_RUN) already holds records: RESUME=$(GPU_RUN) continues it" >&2; \
		exit 2; }
	@mkdir -p $(OUT)
	$(GPU_PY) -m pip install -q --no-index --no-deps --target $(GPU_SITE) wheels/perfetto-*.whl \
		|| echo "no perfetto wheel in wheels/: the run timeline will be missing"
	{ echo "commit $(GPU_COMMIT)"; echo "run $(GPU_RUN)"; date -u; \
	  echo "settings: RESUME=$(RESUME) GPU_OPS=$(GPU_OPS) GPU_DTYPES=$(GPU_DTYPES)" \
	    "GPU_MODES=$(GPU_MODES) GPU_RETIME=$(GPU_RETIME) GPU_COLD=$(GPU_COLD)" \
	    "GPU_TARGETS_FIRST=$(GPU_TARGETS_FIRST)" \
	    "GPU_ISOLATE=$(GPU_ISOLATE) GPU_TIMEOUT=$(GPU_TIMEOUT) GPU_TEST_WORKERS=$(GPU_TEST_WORKERS)" \
	    "GPU_TEST_S=$(GPU_TEST_S) GPU_BENCH_S=$(GPU_BENCH_S) GPU_PROFILE_S=$(GPU_PROFILE_S)" \
	    "GPU_TOTAL_S=$(GPU_TOTAL_S) GPU_PROFILE_IMPLS=$(GPU_PROFILE_IMPLS)" \
	    "GPU_TESTS_RAN=$(GPU_TESTS_RAN)"; \
	  $(GPU_PY) -c "import json; \
	  from harness import env; print(json.dumps({'gpu': env.device_name(), **env.versions()}, \
	  indent=1))"; nvidia-smi; } > $(OUT)/env.txt 2>&1; cat $(OUT)/env.txt
ifeq ($(GPU_TESTS),yes)
	mkdir -p $(GPU_JUNIT)
	-$(call gpu_stage,tests,$(GPU_TEST_S),$(GPU_PY) -m pytest tests -q -p no:cacheprovider \
		-m "not gpu" -n $(GPU_TEST_WORKERS) --dist loadgroup --ignore=tests/test_faults.py \
		--ignore=tests/test_pallas_tpu.py -k "not pallas_tpu" --durations=20 $(GPU_SKIP_RAN) \
		$(foreach f,$(GPU_TESTS_FIRST),--first=$(f)) \
		--junitxml=$(GPU_JUNIT)/$(GPU_START)-tests.xml) > $(OUT)/tests.txt 2>&1; \
		tail -30 $(OUT)/tests.txt
	-$(call gpu_stage,gpu-tests,90,$(GPU_PY) -m pytest tests -q -p no:cacheprovider -m gpu -rA \
		$(GPU_SKIP_RAN) --junitxml=$(GPU_JUNIT)/$(GPU_START)-tests-gpu.xml) \
		>> $(OUT)/tests.txt 2>&1; tail -8 $(OUT)/tests.txt
	-cp $(GPU_JUNIT)/$(GPU_START)-tests.xml $(OUT)/tests.xml
	-cp $(GPU_JUNIT)/$(GPU_START)-tests-gpu.xml $(OUT)/tests-gpu.xml
	-[ "$$(tail -2 $(OUT)/stages.txt | grep -Ec ' exit [015]$$')" != 2 ] \
		|| touch $(GPU_JUNIT)/complete
endif
	-$(call gpu_stage,bench,$(GPU_BENCH_S),$(MAKE) --no-print-directory bench PYTHON=$(GPU_PY) \
		TIER=standard OPS=$(GPU_OPS) DTYPES=$(GPU_DTYPES) MODES=$(GPU_MODES) RUN=$(GPU_RUN) \
		$(if $(RESUME),RESUME=$(RESUME)) RETIME=$(GPU_RETIME) COLD=$(GPU_COLD) \
		TARGETS_FIRST=$(GPU_TARGETS_FIRST) ISOLATE=$(GPU_ISOLATE) TIMEOUT=$(GPU_TIMEOUT), \
		$(GPU_PROFILE_S)) > $(OUT)/bench.txt 2>&1; tail -5 $(OUT)/bench.txt
	-$(GPU_PY) -m harness.report $(REPORTS)/runs/$(GPU_RUN) >> $(OUT)/bench.txt 2>&1
	-sed -n '/^## Targets/,/^## Harness noise/p' $(REPORTS)/runs/$(GPU_RUN)/summary.md \
		| grep '^|' | cut -d'|' -f2-6
	$(gpu_pack)
ifneq ($(GPU_PROFILE_S),0)
	-$(call gpu_stage,profile,$(GPU_PROFILE_S),$(MAKE) --no-print-directory bench PYTHON=$(GPU_PY) \
		TIER=standard IMPLS=$(GPU_PROFILE_IMPLS) DTYPES=$(GPU_DTYPES) MODES=fwd \
		RUN=$(GPU_RUN)-profile $(if $(RESUME),RESUME=$(GPU_RUN)-profile) PROFILE=1 \
		ISOLATE=$(GPU_ISOLATE) TIMEOUT=$(GPU_TIMEOUT) \
		PYTEST_ARGS='-k "$(GPU_PROFILE_CASES)"') >> $(OUT)/bench.txt 2>&1
	$(gpu_pack)
endif
	ls -la $(OUT)
