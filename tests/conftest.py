import os

# Triton kernels run on CPU tensors through the interpreter unless the suite runs on
# a GPU (benchmarks/gpu_suite.sh sets DISTIL_GPU_TESTS=1).  Must precede any triton import.
GPU_RUN = os.environ.get("DISTIL_GPU_TESTS") == "1"
if not GPU_RUN:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import distil  # noqa: E402,F401


@pytest.fixture
def triton_device():
    """Device on which Triton launchers are exercised: CUDA on a GPU run, else CPU tensors
    through the interpreter."""
    return "cuda" if GPU_RUN else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def relative_error(out, ref):
    """||out - ref|| / ||ref||; the absolute error where the reference is exactly zero."""
    out, ref = out.double().cpu(), ref.double().cpu()
    denom = ref.norm().item() or 1.0
    return (out - ref).norm().item() / denom


def rows_past_int32(cols, dtype, device):
    """A random [2, cols] tensor whose row 1 starts past element 2**31 of its storage: only the two
    rows' pages are touched, the rest of the (lazily allocated) storage stays virtual."""
    stride = 2**31 + 5 * cols
    storage = torch.empty(stride + cols, dtype=dtype, device=device)
    x = storage.as_strided((2, cols), (stride, 1))
    return x.copy_(torch.randn(2, cols, device=device).to(dtype))
