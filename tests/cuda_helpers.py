"""What every CUDA test module shares: skip without a GPU, fail (never skip) on a GPU machine whose build of
sage_ext lacks the CUDA kernels, and the sync counter.

A test module uses it with::

    from cuda_helpers import CUDA, cuda_kernels_required, needs_gpu  # noqa: F401  (autouse fixture)
    pytestmark = needs_gpu
"""
from __future__ import annotations

import pytest
import torch

from sage_ext import ops

CUDA = torch.device("cuda")

#: How to get the kernels, for the failure message (docs: README, scripts/device_check.sh).
BUILD_HINT = (
    "a CUDA device is present but this build of sage_ext has no CUDA kernels (sage_ext.ops.cuda_available() is "
    "False): the extension was built without nvcc or against a CPU-only torch. Rebuild it with the kernels for "
    "this GPU, e.g.\n"
    "  SAGE_EXT_CUDA=ON CUDACXX=/usr/local/cuda/bin/nvcc "
    "TORCH_CUDA_ARCH_LIST=$(python -c \"import torch; print('%d.%d' % torch.cuda.get_device_capability())\") "
    "pip install --no-build-isolation -e .\n"
    "(or run scripts/device_check.sh, which does that first)"
)

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def cuda_kernels_required():
    """On a machine with a GPU, a test of the CUDA path fails when the kernels were not built (a skip there
    would hide that the GPU code never ran)."""
    if not ops.cuda_available():
        pytest.fail(BUILD_HINT, pytrace=False)
