#!/usr/bin/env bash
# The ResNet-18 profile path, in CI's torch 2.14.1 environment with torchvision 0.29.1 (PyPI's
# torchvision imports only beside a matching torch build, not beside the CPU torch 2.13.0 the main
# environment uses). The package runs with the library `make cuda-compile` built for torch 2.14.1,
# which also checks that a CUDA build of the extension loads and runs its CPU kernels (forward and
# backward) without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(cd "${CUDA_VENV:-.venv-cuda}" && pwd)
"$VENV/bin/python" -m pip install -q torchvision==0.29.1 pytest scikit-learn scipy matplotlib
pkg=$(mktemp -d)
trap 'rm -rf "$pkg"' EXIT
cp -r relflat_ext "$pkg/"
rm -f "$pkg"/relflat_ext/_C*.so
cp build/cuda-lib/relflat_ext/_C*.so "$pkg/relflat_ext/"
cd tests
PYTHONPATH="$pkg" "$VENV/bin/python" -c 'import relflat_ext as rf; info = rf.build_info(); print(info); assert info["compiled"] and info["cuda"]'
PYTHONPATH="$pkg" "$VENV/bin/python" -m pytest -q -p no:cacheprovider test_torchvision.py test_ops.py test_gradients.py
