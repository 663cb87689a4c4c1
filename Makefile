# The two commands of the README:
#   make bench   the main job: the end-to-end ResNet-50 harness (reduced on the CPU, full on a GPU)
#   make test    the test suite
# Both create .venv and install everything on first use. Also: make bench-optim,
# make bench-ghost-bn (microbenchmarks), make bench-distributed (optimizer step under FSDP2 on
# 2 gloo ranks), make demo (digits convergence demo), make study (the large-batch study on MNIST-1D).

VENV   ?= .venv
PYTHON := $(VENV)/bin/python
ARCH   := $(shell uname -m)

# x86_64: a CUDA build of torch (CUDA 13.0), so the CUDA sources compile here even without a GPU.
ifeq ($(ARCH),x86_64)
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1
else
TORCH_PACKAGES ?= torch==2.9.1 torchvision==0.24.1
endif

export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0

.PHONY: setup test bench bench-optim bench-ghost-bn bench-distributed demo study clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py fastlars/_extension.py $(wildcard csrc/*)
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip "setuptools>=77" wheel
	$(PYTHON) -m pip install --quiet $(TORCH_PACKAGES)
	$(PYTHON) -m pip install --quiet --no-build-isolation -e ".[dev]"
	touch $@

test: setup
	$(PYTHON) -m pytest -q tests

bench: setup
	$(PYTHON) -m fastlars.bench e2e

bench-optim: setup
	$(PYTHON) -m bench.optim_step

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
	rm -rf $(VENV) build *.egg-info
