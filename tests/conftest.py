import os

from helpers import GPU_RUN

# Triton kernels run on CPU tensors through the interpreter unless the suite runs on a GPU.
# Must precede any triton import.
if not GPU_RUN:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def _interpreter_scalar_index():
    """The interpreter holds a scalar as a 1-element array; Triton <= 3.6 takes ``int(array)`` for a loop
    bound (``range(1, n - 1)``), which numpy >= 2.5 refuses for ndim > 0 ("only 0-dimensional arrays can
    be converted to Python scalars"). Triton 3.8 squeezes the array first: the same here, where needed."""
    import inspect

    import numpy as np
    from triton.runtime import interpreter

    try:
        int(np.ones(1, dtype=np.int32))
        return  # numpy < 2.5: int() of a 1-element array still works
    except TypeError:
        pass
    patch_tensor = interpreter._patch_lang_tensor
    if "squeeze" in inspect.getsource(patch_tensor):
        return

    def _patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = _patch_lang_tensor


def _interpreter_rounds_bf16_to_nearest():
    """The interpreter truncates a float32 -> bfloat16 cast (its bit-level converter without a rounding
    mode); a GPU build rounds to nearest even (``cvt.rn.bf16.f32`` in the sm_80 / sm_90 PTX of Triton 3.6
    and 3.8). Truncation doubles the worst rounding error of every bf16 output (2^-7 instead of 2^-8
    relative), which would eat the bf16 tolerance of GPU code that is right: cast as the GPU does."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    truncating_cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.array(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return truncating_cast(self, src, dst_type)

    builder.cast_impl = cast_impl


if not GPU_RUN:
    _interpreter_scalar_index()
    _interpreter_rounds_bf16_to_nearest()

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
