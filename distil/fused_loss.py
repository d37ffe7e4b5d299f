"""The public loss API of distil: fused DistilBERT losses that other trainers import.

Every function takes raw logits (or hidden states; ``linear_kl_ce_loss`` the rows the LM heads project)
of shape ``[N, D]`` or ``[B, S, D]`` with row masks / labels of shape ``[N]`` / ``[B, S]``; nothing of shape
``[..., D]`` is copied. CUDA tensors
run the Triton kernels of :mod:`distil.kernels`, CPU tensors the C++ kernels of ``distil._C``; both
have the same semantics. The gradient w.r.t. the student is computed in the forward pass, so the
backward is free when you backpropagate the combination named by ``kl_weight`` / ``ce_weight`` /
``weight`` and at most one scaling pass otherwise. The teacher never receives a gradient.

Differences from PyTorch, by design: when no row is selected the losses are exactly 0 with a zero
gradient (PyTorch's ``batchmean`` / ``mean`` give NaN there), and a row whose logits are all -inf
contributes 0 (see the -inf policy in kernels/kl_ce.py).

This module only re-exports: each op lives in its own module under :mod:`distil._ops`.
"""
from distil._ops.cosine import cosine_loss
from distil._ops.kl_ce import kl_ce_loss, kl_div_loss
from distil._ops.linear_kl_ce import LinearKLCELoss, linear_kl_ce_loss
from distil._ops.topk_kl_ce import TopKLogits, topk_kl_ce_loss
from distil.distillation_loss import DistillationLoss, DistillationLossOutput

__all__ = ["kl_div_loss", "kl_ce_loss", "cosine_loss", "linear_kl_ce_loss", "LinearKLCELoss", "topk_kl_ce_loss",
           "TopKLogits", "DistillationLoss",
           "DistillationLossOutput"]
