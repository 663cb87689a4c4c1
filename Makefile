# The two commands of the README:
#   make bench   the main job: the end-to-end ResNet-50 harness (reduced on the CPU, full on a GPU)
#   make test    the test suite
# Both create .venv and install everything on first use. make test-compat runs the
# compatibility job on the oldest supported stack (.venv-compat). Also: make bench-optim,
# make bench-check (the optimizer step's ratios to torch's fused step against bench/baseline-cpu.json;
# run it before submitting a change to csrc/, fastlars/ops/ or an optimizer's step),
# make bench-ghost-bn (microbenchmarks), make bench-distributed (optimizer step under FSDP2 on
# 2 gloo ranks), make demo (digits convergence demo), make study (the large-batch study on MNIST-1D),
# make fuzz (the property tests of every backend against the reference, with many more examples).

VENV   ?= .venv
PYTHON := $(VENV)/bin/python
ARCH   := $(shell uname -m)

# x86_64: a CUDA build of torch (CUDA 13.0), so the CUDA sources compile here even without a GPU.
ifeq ($(ARCH),x86_64)
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1
else
TORCH_PACKAGES ?= torch==2.9.1 torchvision==0.24.1
endif

# the CUDA toolkit: fastlars/_cuda_toolkit.py's find_cuda_toolkit (CUDA_HOME, /usr/local/cuda, nvcc on PATH)
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0

# The compatibility job: the oldest stack the README promises (torch 2.11 and its Triton 3.6),
# on Python 3.12 where the machine has one, else 3.11.
COMPAT_VENV   ?= .venv-compat
COMPAT_PYTHON := $(COMPAT_VENV)/bin/python
COMPAT_BASE   ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) \
                 $(shell command -v python3.12 || command -v python3.11 || command -v python3))
COMPAT_TORCH  ?= torch==2.11.0 torchvision==0.26.0
# the files that exercise the optimizers, kernels and torch integrations most directly
COMPAT_TESTS  ?= tests/test_torch_conformance.py tests/test_optim_backends.py tests/test_ghost_bn.py \
                 tests/test_capturable.py tests/test_gpu_readiness.py tests/test_triton_compile.py

.PHONY: setup setup-compat test test-compat fuzz bench bench-optim bench-check bench-ghost-bn bench-distributed demo study clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py fastlars/_extension.py fastlars/_cuda_toolkit.py $(wildcard csrc/*)
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip "setuptools>=77" wheel
	$(PYTHON) -m pip install --quiet $(TORCH_PACKAGES)
	$(PYTHON) -m pip install --quiet --no-build-isolation -e ".[dev,integrations]"
	touch $@

test: setup
	$(PYTHON) -m pytest -q tests

# not part of `make test`: tests/test_fuzz_backends.py's property tests (every fused backend
# against the reference) with FUZZ_SCALE times the examples `make test` draws, from a fresh
# seed (SEED=n repeats a run); prints the seed, each test's examples and times, and a failure's
# example. The tests of known wrong results are left out (-k matches_reference).
FUZZ_SCALE ?= 20
fuzz: setup
	@seed=$${SEED:-$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}; start=$$(date +%s); \
	echo "make fuzz: hypothesis seed $$seed, FUZZ_SCALE=$(FUZZ_SCALE) (make fuzz SEED=$$seed repeats it)"; \
	HYPOTHESIS_PROFILE=fuzz FUZZ_SCALE=$(FUZZ_SCALE) $(PYTHON) -m pytest -q tests/test_fuzz_backends.py \
		-k matches_reference -p no:cacheprovider --hypothesis-seed=$$seed --hypothesis-show-statistics; \
	rc=$$?; echo "make fuzz: seed $$seed, exit $$rc after $$(( $$(date +%s) - start )) s"; exit $$rc

# fastlars is installed without compiling (FASTLARS_NO_EXTENSION=1): the device check's dry run
# builds the extension in place for this Python and torch (sm_90, as on the GPU machine, with the
# toolkit that fastlars finds), then the tests use that build.
$(COMPAT_VENV)/.installed: pyproject.toml setup.py
	test -x $(COMPAT_PYTHON) || $(COMPAT_BASE) -m venv $(COMPAT_VENV)
	$(COMPAT_PYTHON) -m pip install --quiet --upgrade pip "setuptools>=77" wheel
	$(COMPAT_PYTHON) -m pip install --quiet $(COMPAT_TORCH)
	FASTLARS_NO_EXTENSION=1 $(COMPAT_PYTHON) -m pip install --quiet --no-build-isolation -e ".[dev]"
	touch $@

setup-compat: $(COMPAT_VENV)/.installed

test-compat: $(COMPAT_VENV)/.installed
	@$(COMPAT_PYTHON) -c "import sys, torch, triton; print('compat stack: Python', sys.version.split()[0], \
		'torch', torch.__version__, 'Triton', triton.__version__)"
	PYTHON=$(COMPAT_PYTHON) bash bench/gpu_check.sh --dry-run --build $(COMPAT_VENV)/gpu_check; dry=$$?; \
	$(COMPAT_PYTHON) -m pytest -q $(COMPAT_TESTS); tests=$$?; \
	echo "test-compat: device check dry run exited $$dry, tests exited $$tests"; [ $$dry = 0 ] && [ $$tests = 0 ]

bench: setup
	$(PYTHON) -m fastlars.bench e2e

bench-optim: setup
	$(PYTHON) -m bench.optim_step

# not part of `make test` (it times); ARGS="--update-baseline" rewrites the baseline,
# ARGS="--plant-slowdown 'LAMB[cpu]=1.5'" shows it failing
bench-check: setup
	$(PYTHON) -m bench.check $(ARGS)

bench-ghost-bn: setup
	$(PYTHON) -m bench.ghost_bn

bench-distributed: setup
	$(PYTHON) -m bench.distributed_step

demo: setup
	$(PYTHON) -m fastlars.demo

# one thread per worker process (2 workers): the study's runs are small, threads would only contend
study: setup
	OMP_NUM_THREADS=1 $(PYTHON) -m fastlars.study

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info
