# `make report` and `make test` set everything up on a fresh machine (a virtual environment with
# the CPU build of torch 2.13.0, then the extension) and run the main job / the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS := torch==2.13.0 numpy pytest pytest-benchmark scikit-learn scipy matplotlib mlxtend pytorch-optimizer transformers pybind11 ninja \
	setuptools wheel

.PHONY: setup build report test ctest cuda-compile torchvision-check bench clean

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(DEPS)
	touch $@

$(VENV)/.installed: $(VENV)/.deps
	RELFLAT_NO_EXTENSION=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.installed build

build: $(VENV)/.installed  ## incremental rebuild of the extension (ninja)
	$(PY) setup.py -q build_ext --inplace

report: setup
	$(VENV)/bin/relflat report --out reports/digits.json

test: setup
	$(PY) -m pytest tests -q

ctest: $(VENV)/.deps  ## CMake build of the op library and the C++ dispatcher test
	cmake -S . -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build build/cmake
	ctest --test-dir build/cmake --output-on-failure

cuda-compile:  ## compile and link the CUDA kernels against the CUDA 13.0 torch wheel (no GPU needed)
	bash .ci/cuda_compile.sh

torchvision-check: cuda-compile  ## ResNet-18 profile and the CUDA build's CPU kernels under torch 2.14.1 + torchvision
	bash .ci/torchvision_check.sh

bench: setup
	$(PY) -m pytest bench --benchmark-only -q

clean:
	rm -rf build relflat_ext/_C*.so *.egg-info
