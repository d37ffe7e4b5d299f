"""distil: fused kernels and a thin harness for DistilBERT-style knowledge distillation.

Public API: :mod:`distil.fused_loss` (losses), :mod:`distil.ops` (masked-token gather).
Importing this package loads the compiled operator library ``distil._C`` and registers every op.
"""
from distil import fused_loss, ops  # noqa: F401  (each op's CUDA kernel, fake impl and autograd)

__version__ = "0.1.0"
