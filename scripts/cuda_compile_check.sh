#!/usr/bin/env bash
# Compile the CUDA kernels with nvcc against a CUDA build of torch, with no GPU needed, so GPU code
# cannot rot on CPU-only machines. A private venv holds the CUDA torch (reused when present); the
# build tree is build/cuda-check. Override SAGE_EXT_CUDA_TORCH / SAGE_EXT_CUDA_VENV if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SAGE_EXT_CUDA_VENV:-$HOME/.cache/sage_ext/venv-cuda}
torch_spec=${SAGE_EXT_CUDA_TORCH:-torch==2.14.1}

if ! "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  echo "creating $venv with $torch_spec"
  python -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$torch_spec" numpy
fi

start=$(date +%s)
cmake -S . -B build/cuda-check -G Ninja \
  -DPython_EXECUTABLE="$venv/bin/python" -DSAGE_EXT_CUDA=ON \
  -DSAGE_EXT_CUDA_ARCHS="${SAGE_EXT_CUDA_ARCHS:-80;90}" >/dev/null
cmake --build build/cuda-check -j"${SAGE_EXT_JOBS:-2}"
echo "CUDA kernels compiled for sm_${SAGE_EXT_CUDA_ARCHS:-80;90} in $(( $(date +%s) - start )) s"
