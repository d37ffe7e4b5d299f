"""distil: fused kernels and a thin harness for DistilBERT-style knowledge distillation.

Public API: :mod:`distil.fused_loss` (losses), :mod:`distil.ops` (masked-token gather).
Importing this package loads the compiled operator library ``distil._C``.
"""
import torch  # noqa: F401  (loads libtorch before our extension links against it)

from distil import _C  # noqa: F401,E402  (runs the TORCH_LIBRARY registrations)
from distil import ops  # noqa: F401,E402  (fake impls and autograd of the gather ops)
from distil import fused_loss  # noqa: F401,E402  (the loss ops' CUDA kernels, fake impls and autograd)

__version__ = "0.1.0"
