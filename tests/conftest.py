import os

from helpers import GPU_RUN

# Triton kernels run on CPU tensors through the interpreter unless the suite runs on a GPU.
# Must precede any triton import.
if not GPU_RUN:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import distil.fused_loss  # noqa: E402,F401  (registers every op: schemas, CUDA kernels, fake impls, autograd)
import distil.ops  # noqa: E402,F401


@pytest.fixture
def triton_device():
    """Device on which Triton launchers are exercised: CUDA on a GPU run, else CPU tensors
    through the interpreter."""
    return "cuda" if GPU_RUN else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
