"""The main benchmark: distil's fused distillation losses against eager PyTorch, the same eager
function under ``torch.compile``, and (CUDA, when ``liger_kernel`` imports) Liger-Kernel.

    python benchmarks/bench_loss.py                 # CUDA if present, else CPU (the default set)
    python benchmarks/bench_loss.py --device cpu    # force the CPU section
    python benchmarks/bench_loss.py --quick         # tiny shapes: a CI smoke run
    python benchmarks/bench_loss.py --full          # the whole set: CPU adds the LM-head (linear_kl_ce)
                                                    # cells and their memory sweep; CUDA the N x V x dtype grid

On the project's 2-core CPU machine (Intel Xeon, shared with other jobs: load average 4-7) the default run
took 5 min 49 s end to end (its 8 tasks 5 min 40 s), --full 18 min 26 s (16 tasks, the 128 × 4096 × 128256
LM-head cell 7 min of it).

Every op is one entry of ``OPS``: ``LossOp(ours, eager, make_inputs, bytes_moved, liger, dense)``, where each
loss function takes the dict from ``make_inputs`` as keyword arguments and returns the scalar that a
trainer backpropagates (``dense``: the dense loss an approximate op replaces, timed in the same
cell); the ``compile`` variant is ``torch.compile(eager)``.  Modes: ``fwd`` is the
forward with ``student.requires_grad=True`` (a training forward: ours writes the gradient there),
``fwd+bwd`` adds ``.backward()``.  Prints one line per cell (its time, the time the cost model predicted
for it, the elapsed time and an ETA: see CostModel), then a Markdown table, the targets and how the ETA
fared at each cell, and writes ``benchmarks/results/loss_<cpu|cuda>_<machine>_local.json``
and a PNG plot beside it (speed-up and peak memory against eager, each bar labelled with its ratio; git
ignores them); ``--save`` writes the committed reference
``loss_<cpu|cuda>_<machine>.json`` / ``.png`` instead.
"""
import argparse
import functools
import itertools
import math
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from distil import reference
from distil._ops.linear_kl_ce import auto_chunk_rows
from distil.fused_loss import DistillationLoss, cosine_loss, kl_ce_loss, kl_div_loss, linear_kl_ce_loss, topk_kl_ce_loss

if __package__:  # imported as benchmarks.bench_loss (benchmarks/test_bench.py)
    from benchmarks import _common as C
else:  # run as a script: its directory is on sys.path
    import _common as C

T = 2.0
KL_WEIGHT, CE_WEIGHT = 5.0, 2.0  # DistilBERT's alpha_ce, alpha_mlm
LABELLED = 0.15  # share of rows with an MLM label (mlm_mask_prop)
IGNORE = -100


# ---------------------------------------------------------------- the compared functions
def ours_kl_ce(s, t, labels):
    kl, ce = kl_ce_loss(s, t, labels, temperature=T, kl_weight=KL_WEIGHT, ce_weight=CE_WEIGHT)
    return KL_WEIGHT * kl + CE_WEIGHT * ce


def eager_kl_ce(s, t, labels):
    """distiller.py's loss_ce and loss_mlm, weighted as in its README command."""
    return KL_WEIGHT * reference.distiller_kl(s, t, T) + CE_WEIGHT * reference.distiller_mlm(s, labels)


def ours_kl(s, t):
    return kl_div_loss(s, t, temperature=T)


def eager_kl(s, t):
    return reference.distiller_kl(s, t, T)


# The divergences in place of the forward KL (distil/_ops/divergence.py), at the defaults of the public
# functions: op name -> (divergence, its keyword arguments).
DIVERGENCE_OPS = {
    "reverse_kl": {"divergence": "reverse_kl"},
    "jsd": {"divergence": "jsd", "jsd_beta": 0.5},
    "skew_kl": {"divergence": "skew_kl", "skew_alpha": 0.1},
    "skew_reverse_kl": {"divergence": "skew_reverse_kl", "skew_alpha": 0.1},
    "tvd": {"divergence": "tvd"},
}


def ours_divergence(name):
    def ours(s, t):
        return kl_div_loss(s, t, temperature=T, **DIVERGENCE_OPS[name])
    return ours


def _mixture_log(log_a, log_b, weight_a):
    return torch.logsumexp(torch.stack([log_a + math.log(weight_a), log_b + math.log(1 - weight_a)]), dim=0)


def eager_divergence(name):
    """The eager formulas users run: TRL's GKDTrainer.generalized_jsd_loss (its beta = 1 branch is the
    reverse KL; the mixture by logsumexp of shifted log-probabilities, F.kl_div with log_target), DistiLLM's
    skew KLs in the same form, and ½|p - q| (Liger's TVD), times T² over the rows (batchmean)."""

    def eager(s, t):
        terms = eager_divergence_terms(name, F.log_softmax(t / T, -1), F.log_softmax(s / T, -1))
        return terms.sum() / s.shape[0] * T**2
    return eager


def eager_divergence_terms(name, lt, ls):
    """The per-entry terms of :func:`eager_divergence` from the teacher's and the student's log-probabilities."""
    kwargs = DIVERGENCE_OPS[name]
    if name == "reverse_kl":
        return F.kl_div(lt, ls, reduction="none", log_target=True)
    if name == "jsd":
        beta = kwargs["jsd_beta"]
        m = _mixture_log(lt, ls, beta)
        return (beta * F.kl_div(m, lt, reduction="none", log_target=True)
                + (1 - beta) * F.kl_div(m, ls, reduction="none", log_target=True))
    if name == "skew_kl":
        return F.kl_div(_mixture_log(lt, ls, kwargs["skew_alpha"]), lt, reduction="none", log_target=True)
    if name == "skew_reverse_kl":
        return F.kl_div(_mixture_log(ls, lt, kwargs["skew_alpha"]), ls, reduction="none", log_target=True)
    return 0.5 * (ls.exp() - lt.exp()).abs()


@functools.cache
def _liger_kl_module():
    from liger_kernel.transformers import LigerKLDIVLoss

    return LigerKLDIVLoss(reduction="batchmean", log_target=True)


def liger_kl(s, t):
    # LigerKLDIVLoss(y_pred, y_true) is nn.KLDivLoss on log-probabilities: the temperature and T² are ours to add.
    return _liger_kl_module()(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)) * T**2


@functools.cache
def _liger_divergence_module(name):
    from liger_kernel.transformers import LigerJSD, LigerTVDLoss

    return LigerJSD(beta=DIVERGENCE_OPS["jsd"]["jsd_beta"]) if name == "jsd" else LigerTVDLoss()


def liger_jsd(s, t):
    # LigerJSD(student log-probabilities, teacher log-probabilities), the same beta (tests/test_divergences.py).
    return _liger_divergence_module("jsd")(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)) * T**2


def liger_tvd(s, t):
    # LigerTVDLoss takes probabilities: the softmaxes are the caller's.
    return _liger_divergence_module("tvd")(F.softmax(s / T, -1), F.softmax(t / T, -1)) * T**2


# CE + TVD in one pass, as LigerFusedCETVDLoss computes them: T = 1, the TVD on the labelled rows, the sum
# of both means over those rows.
def ours_ce_tvd(s, t, labels):
    tvd, ce = kl_ce_loss(s, t, labels, temperature=1.0, kl_mask=labels != IGNORE, divergence="tvd")
    return tvd + ce


def eager_ce_tvd(s, t, labels):
    rows = labels != IGNORE
    tvd = 0.5 * (F.softmax(s[rows], -1) - F.softmax(t[rows], -1)).abs().sum() / rows.sum()
    return tvd + F.cross_entropy(s, labels, ignore_index=IGNORE)


def liger_ce_tvd(s, t, labels):
    from liger_kernel.transformers import LigerFusedCETVDLoss

    ce, tvd = LigerFusedCETVDLoss(ignore_index=IGNORE)(s, t, labels)
    return (ce.sum() + tvd.sum()) / (labels != IGNORE).sum()


def ours_cos(s, t):
    return cosine_loss(s, t)


def eager_cos(s, t):
    return reference.distiller_cos(s, t)


TOPK = 64  # teacher logits per token of a teacher cache (distil-cache-teacher's default)


def ours_topk(s, t, values, index, lse, labels):
    kl, ce = topk_kl_ce_loss(s, values, index, labels, teacher_lse=lse, temperature=T, kl_weight=KL_WEIGHT,
                             ce_weight=CE_WEIGHT)
    return KL_WEIGHT * kl + CE_WEIGHT * ce


def eager_topk(s, t, values, index, lse, labels):
    """The exact top-k KL (k entries + the tail bucket) and the CE in plain PyTorch."""
    log_p = F.log_softmax(s.float() / T, -1).gather(-1, index.long())
    log_q = values.float() / T - lse[:, None]
    q = log_q.exp()
    q_tail = (1 - q.sum(-1)).clamp_min(reference.TAIL_FLOOR)
    p_tail = (1 - log_p.exp().sum(-1)).clamp_min(reference.TAIL_FLOOR)
    kl = ((q * (log_q - log_p)).sum(-1) + q_tail * (q_tail.log() - p_tail.log())).mean() * T**2
    return KL_WEIGHT * kl + CE_WEIGHT * F.cross_entropy(s, labels, ignore_index=IGNORE)


def dense_topk(s, t, values, index, lse, labels):
    """The dense kl_ce_loss on the full teacher logits the top-k came from (timed in the same cell)."""
    return ours_kl_ce(s, t, labels)


HIDDEN = 768  # the triple loss's hidden size (BERT-base)
_TRIPLE = DistillationLoss(kl_weight=KL_WEIGHT, ce_weight=CE_WEIGHT, cos_weight=1.0, temperature=T)


def ours_triple(s, t, labels, sh, th, mask):
    return _TRIPLE(s, t, labels, sh, th, mask).total


def eager_triple(s, t, labels, sh, th, mask):
    """distiller.py's Distiller.step loss: masked_select copies, then the three PyTorch losses."""
    return reference.distiller_loss(s, t, labels, sh, th, mask, alpha_kl=KL_WEIGHT, alpha_mlm=CE_WEIGHT, alpha_cos=1.0,
                          temperature=T)[0]


# The LM head's hidden size H for each benchmarked V: DistilBERT (768 × 30522), LLaMA-3 (4096 × 128256),
# a small head for the CPU memory sweep over N, and a tiny one for --quick.
LINEAR_HIDDEN = {30522: 768, 128256: 4096, 8192: 256, 4096: 64}


def ours_linear(hs, w, b, ht, wt, bt, labels):
    kl, ce = linear_kl_ce_loss(hs, w, b, labels, teacher_head_input=ht, teacher_weight=wt, teacher_bias=bt,
                               temperature=T, kl_weight=KL_WEIGHT, ce_weight=CE_WEIGHT)
    return KL_WEIGHT * kl + CE_WEIGHT * ce


def _head_logits(hs, w, b, ht, wt, bt):
    with torch.no_grad():
        t = F.linear(ht, wt, bt)
    return F.linear(hs, w, b), t


def unfused_linear(hs, w, b, ht, wt, bt, labels):
    """ours without the fusion: both heads' full logits, then kl_ce_loss."""
    return ours_kl_ce(*_head_logits(hs, w, b, ht, wt, bt), labels)


def eager_linear(hs, w, b, ht, wt, bt, labels):
    """distiller.py's loss_ce and loss_mlm on the heads' full logits."""
    return eager_kl_ce(*_head_logits(hs, w, b, ht, wt, bt), labels)


def gemms_linear(hs, w, b, ht, wt, bt, labels):
    """The same four GEMMs alone (both heads forward, the student's two backward ones), no loss: the
    floor the fused path is measured against on the GPU."""
    s, t = _head_logits(hs, w, b, ht, wt, bt)
    return s.sum() + t.sum()


# The fused heads with another divergence: TRL's GKD loss (JSD, beta 0.5), against a teacher head and against a
# top-k teacher (the teacher cache's), beside the unfused path (the logits, then the loss op) in the same cell.
HEAD_DIVERGENCE = DIVERGENCE_OPS["jsd"]


def ours_linear_jsd(hs, w, b, ht, wt, bt, labels):
    kl, ce = linear_kl_ce_loss(hs, w, b, labels, teacher_head_input=ht, teacher_weight=wt, teacher_bias=bt,
                               temperature=T, kl_weight=KL_WEIGHT, ce_weight=CE_WEIGHT, **HEAD_DIVERGENCE)
    return KL_WEIGHT * kl + CE_WEIGHT * ce


def unfused_linear_jsd(hs, w, b, ht, wt, bt, labels):
    """ours without the fusion: both heads' full logits, then kl_ce_loss with the JSD."""
    kl, ce = kl_ce_loss(*_head_logits(hs, w, b, ht, wt, bt), labels, temperature=T, kl_weight=KL_WEIGHT,
                        ce_weight=CE_WEIGHT, **HEAD_DIVERGENCE)
    return KL_WEIGHT * kl + CE_WEIGHT * ce


def eager_linear_jsd(hs, w, b, ht, wt, bt, labels):
    """TRL's generalized_jsd_loss (eager_divergence) and the CE on the heads' full logits."""
    s, t = _head_logits(hs, w, b, ht, wt, bt)
    return KL_WEIGHT * eager_divergence("jsd")(s, t) + CE_WEIGHT * F.cross_entropy(s, labels, ignore_index=IGNORE)


def ours_linear_topk_jsd(hs, w, b, values, index, lse, labels):
    kl, ce = linear_kl_ce_loss(hs, w, b, labels, teacher_topk_logits=values, teacher_topk_index=index,
                               teacher_lse=lse, teacher_lse_temperature=T, temperature=T, kl_weight=KL_WEIGHT,
                               ce_weight=CE_WEIGHT, **HEAD_DIVERGENCE)
    return KL_WEIGHT * kl + CE_WEIGHT * ce


def unfused_linear_topk_jsd(hs, w, b, values, index, lse, labels):
    """ours without the fusion: the student head's full logits, then topk_kl_ce_loss with the JSD."""
    kl, ce = topk_kl_ce_loss(F.linear(hs, w, b), values, index, labels, teacher_lse=lse, temperature=T,
                             kl_weight=KL_WEIGHT, ce_weight=CE_WEIGHT, **HEAD_DIVERGENCE)
    return KL_WEIGHT * kl + CE_WEIGHT * ce


def eager_linear_topk_jsd(hs, w, b, values, index, lse, labels):
    """The JSD on the exact top-k buckets (the k tokens and the tail, as eager_topk) and the CE in plain PyTorch."""
    s = F.linear(hs, w, b)
    log_p = F.log_softmax(s.float() / T, -1).gather(-1, index.long())
    log_q = values.float() / T - lse[:, None]
    q_tail = (1 - log_q.exp().sum(-1)).clamp_min(reference.TAIL_FLOOR)
    p_tail = (1 - log_p.exp().sum(-1)).clamp_min(reference.TAIL_FLOOR)
    terms = eager_divergence_terms("jsd", torch.cat([log_q, q_tail.log()[:, None]], -1),
                                   torch.cat([log_p, p_tail.log()[:, None]], -1))
    kl = terms.sum() / s.shape[0] * T**2
    return KL_WEIGHT * kl + CE_WEIGHT * F.cross_entropy(s, labels, ignore_index=IGNORE)


def make_linear(n, v, dtype, device, *, seed=0):
    """[n, H] student and teacher rows, both heads [V, H] (+ bias), 15% MLM labels; H = LINEAR_HIDDEN[v]."""
    h = LINEAR_HIDDEN[v]
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, scale=1.0, grad=False):
        x = torch.randn(*shape, device=device, generator=gen).mul_(scale).to(dtype)
        return x.requires_grad_(grad)

    label_gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (n,), generator=label_gen)
    labels[torch.rand(n, generator=label_gen) >= LABELLED] = IGNORE
    return {"hs": rand(n, h, grad=True), "w": rand(v, h, scale=h**-0.5, grad=True), "b": rand(v, scale=0.1, grad=True),
            "ht": rand(n, h), "wt": rand(v, h, scale=h**-0.5), "bt": rand(v, scale=0.1), "labels": labels.to(device)}


def make_linear_topk(n, v, dtype, device, *, seed=0):
    """make_linear's student and labels with the teacher head's logits as a cache holds them (make_topk)."""
    inputs = make_linear(n, v, dtype, device, seed=seed)
    with torch.no_grad():
        t = F.linear(inputs.pop("ht"), inputs.pop("wt"), inputs.pop("bt")).float()
    values, index = t.topk(TOPK, -1)
    index = index.to(torch.int16 if v <= 32767 else torch.int32)
    return {**inputs, "values": values.half(), "index": index, "lse": torch.logsumexp(t / T, -1)}


def linear_param_grad_bytes(n, v, dtype):
    """The student head's weight and bias gradients: memory every variant must hold, left out of its peak."""
    return (LINEAR_HIDDEN[v] + 1) * v * dtype.itemsize


def make_logits(n, v, dtype, device, *, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    s = torch.randn(n, v, dtype=dtype, device=device, generator=gen).mul_(2).requires_grad_()
    t = torch.randn(n, v, dtype=dtype, device=device, generator=gen).mul_(2)
    return {"s": s, "t": t}


def make_logits_labels(n, v, dtype, device, *, seed=0):
    inputs = make_logits(n, v, dtype, device, seed=seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    labels = torch.randint(0, v, (n,), device=device, generator=gen)
    unlabelled = torch.rand(n, device=device, generator=gen) >= LABELLED
    return {**inputs, "labels": labels.masked_fill_(unlabelled, IGNORE)}


def make_topk(n, v, dtype, device, *, seed=0):
    """The inputs of kl_ce, and its teacher as a cache holds it: the TOPK largest logits (fp16) with
    int16 indices (int32 above 32767) and the lse at T (the full ``t`` stays for the dense variant)."""
    inputs = make_logits_labels(n, v, dtype, device, seed=seed)
    values, index = inputs["t"].float().topk(TOPK, -1)
    index = index.to(torch.int16 if v <= 32767 else torch.int32)
    return {**inputs, "values": values.half(), "index": index, "lse": torch.logsumexp(inputs["t"].float() / T, -1)}


def make_triple(n, v, dtype, device, *, seed=0):
    """[n, V] logits + [n, HIDDEN] last hidden states, 15% MLM labels, 10% padding rows."""
    inputs = make_logits_labels(n, v, dtype, device, seed=seed)
    gen = torch.Generator(device=device).manual_seed(seed + 2)
    sh = torch.randn(n, HIDDEN, dtype=dtype, device=device, generator=gen).requires_grad_()
    th = torch.randn(n, HIDDEN, dtype=dtype, device=device, generator=gen)
    mask = torch.rand(n, device=device, generator=gen) < 0.9
    inputs["labels"].masked_fill_(~mask, IGNORE)
    return {**inputs, "sh": sh, "th": th, "mask": mask}


def triple_bytes(n, v, dtype):
    return 3 * n * (v + HIDDEN) * dtype.itemsize


def topk_bytes(n, v, dtype):
    """Student read once and its gradient written once, plus the k teacher entries (fp16 + index)."""
    return n * (2 * v * dtype.itemsize + TOPK * (2 + (2 if v <= 32767 else 4)))


def logits_bytes(n, v, dtype):
    """Minimal traffic of a fused step: student and teacher read once, the gradient written once."""
    return 3 * n * v * dtype.itemsize


@dataclass(frozen=True)
class LossOp:
    ours: Callable
    eager: Callable
    make_inputs: Callable  # (n, v, dtype, device, *, seed) -> dict of keyword arguments
    bytes_moved: Callable  # (n, v, dtype) -> bytes a fused fwd+bwd must move
    liger: Optional[Callable] = None
    unfused: Optional[Callable] = None  # ours without the op's fusion (linear_kl_ce: logits + kl_ce_loss)
    gemms: Optional[Callable] = None  # CUDA: the op's GEMMs alone (linear_kl_ce)
    excluded_bytes: Callable = lambda n, v, dtype: 0  # noqa: E731  (memory left out of the peak)
    dense: Optional[Callable] = None  # the dense loss the op replaces, timed beside it


OPS = {
    "kl_ce": LossOp(ours_kl_ce, eager_kl_ce, make_logits_labels, logits_bytes),
    "kl": LossOp(ours_kl, eager_kl, make_logits, logits_bytes, liger=liger_kl),
    "cos": LossOp(ours_cos, eager_cos, make_logits, logits_bytes),  # "V" is the hidden size H here
    "triple": LossOp(ours_triple, eager_triple, make_triple, triple_bytes),
    # Liger's fused-linear KL (LigerFusedLinearKLDivLoss) is unreleased and has no CE, T² or bias: no
    # Liger variant here.
    "linear_kl_ce": LossOp(ours_linear, eager_linear, make_linear, logits_bytes, unfused=unfused_linear,
                           gemms=gemms_linear, excluded_bytes=linear_param_grad_bytes),
    "topk_kl_ce": LossOp(ours_topk, eager_topk, make_topk, topk_bytes, dense=dense_topk),  # k = TOPK, exact mode
    "linear_jsd": LossOp(ours_linear_jsd, eager_linear_jsd, make_linear, logits_bytes, unfused=unfused_linear_jsd,
                         excluded_bytes=linear_param_grad_bytes),
    "linear_topk_jsd": LossOp(ours_linear_topk_jsd, eager_linear_topk_jsd, make_linear_topk, topk_bytes,
                              unfused=unfused_linear_topk_jsd, excluded_bytes=linear_param_grad_bytes),
    **{name: LossOp(ours_divergence(name), eager_divergence(name), make_logits, logits_bytes,
                    liger={"jsd": liger_jsd, "tvd": liger_tvd}.get(name))
       for name in DIVERGENCE_OPS},
    "ce_tvd": LossOp(ours_ce_tvd, eager_ce_tvd, make_logits_labels, logits_bytes, liger=liger_ce_tvd),
}
# The divergence cells: the DIVERGENCE_OPS and the fused CE + TVD.
DIVERGENCE_CELL_OPS = (*DIVERGENCE_OPS, "ce_tvd")
LINEAR_OPS = ("linear_kl_ce", "linear_jsd", "linear_topk_jsd")  # the LM-head ops: GEMM-bound
MODES = ("fwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def variant_names(op, names, device):
    """The variants among ``names`` that this op has on ``device``, in run order (Liger: CUDA only)."""
    out = ["ours", "eager", "compile"]
    out += ["unfused"] if op.unfused is not None else []
    out += ["gemms"] if op.gemms is not None and device == "cuda" else []
    out += ["liger"] if op.liger is not None and device == "cuda" and liger_available() else []
    out += ["dense"] if op.dense is not None else []
    return [k for k in out if k in names]


def variants(op, names, device):
    """{variant: loss function} among ``names`` for this op on ``device``; ``compile`` is built only when
    asked for (torch.compile imports dynamo and inductor: 3-5 s of a fresh memory process on 2 cores)."""
    fns = {"ours": op.ours, "eager": op.eager, "unfused": op.unfused, "gemms": op.gemms, "liger": op.liger,
           "dense": op.dense}
    return {k: torch.compile(op.eager, dynamic=False) if k == "compile" else fns[k]
            for k in variant_names(op, names, device)}


def liger_available():
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------- plans
# Cells: (op, dtype, N, V, modes).
CPU_MAIN = (2048, 30522)
# The LM-head cells take minutes each on 2 CPU cores (GEMMs of N·H·V: the 128 × 4096 × 128256 LLM shape ran
# 5 min alone, its 2 GiB heads rebuilt in every fresh memory process): they and the memory sweep over N run
# with --full, or when --ops names linear_kl_ce.
CPU_FULL_ONLY = [("linear_kl_ce", "fp32", n, 30522, ("fwd+bwd",)) for n in (1024, 4096)]
CPU_FULL_ONLY += [("linear_kl_ce", "fp32", 128, 128256, ("fwd+bwd",))]
CPU_FULL_ONLY += [(op, "fp32", 4096, 30522, ("fwd+bwd",)) for op in ("linear_jsd", "linear_topk_jsd")]
# The divergences beside the forward KL at the main shape: with --full, or when --ops names one of them.
CPU_DIVERGENCE_CELLS = [(op, "fp32", *CPU_MAIN, ("fwd+bwd",)) for op in ("kl", *DIVERGENCE_CELL_OPS)]


def cpu_plan(quick, ops, full=False, explicit_ops=()):
    """The CPU cells of ``ops``: the default set (docs/benchmarks.md's CPU table, top-k beside kl_ce), plus
    CPU_FULL_ONLY with ``full`` or for an op named in ``explicit_ops`` that has no default cell."""
    if quick:
        cells = [(op, "fp32", 64, 256 if op == "cos" else 4096, MODES) for op in ops]
    else:
        cells = [("kl_ce", "fp32", *CPU_MAIN, MODES)]
        cells += [("kl_ce", "fp32", n, v, ("fwd+bwd",)) for n, v in ((256, 30522), (512, 50257))]
        cells += [("kl", "fp32", 512, 30522, ("fwd+bwd",))]
        cells += [("cos", "fp32", 16384, 768, MODES), ("triple", "fp32", 512, 30522, ("fwd+bwd",))]
        cells += [("topk_kl_ce", "fp32", *CPU_MAIN, MODES)]
        default_ops = {c[0] for c in cells}
        cells += [c for c in CPU_FULL_ONLY if full or (c[0] in explicit_ops and c[0] not in default_ops)]
        if full or set(explicit_ops) & set(DIVERGENCE_CELL_OPS):
            cells += CPU_DIVERGENCE_CELLS
    return [c for c in cells if c[0] in ops]


def cuda_plan(quick, full, ops):
    if quick:
        grid = [("bf16", 1024, 30522), ("fp32", 1024, 30522)]
    elif full:
        grid = list(itertools.product(("bf16", "fp32"), (2048, 8192, 16384), (30522, 50257, 128256)))
    else:
        grid = [("bf16", 8192, 30522), ("fp32", 8192, 30522), ("bf16", 2048, 30522), ("bf16", 16384, 30522),
                ("bf16", 8192, 50257), ("bf16", 8192, 128256), ("fp32", 8192, 128256)]
    cells = [(op, dt, n, v, MODES) for op in ops if op in ("kl_ce", "kl") for dt, n, v in grid]
    if "linear_kl_ce" in ops:
        linear = [("bf16", 1024, 30522)] if quick else [("bf16", 8192, 30522), ("bf16", 16384, 30522),
                                                         ("bf16", 8192, 128256)]
        cells += [("linear_kl_ce", dt, n, v, MODES) for dt, n, v in linear]
    cells += [(op, "bf16", 1024 if quick else 8192, 30522, MODES) for op in ("linear_jsd", "linear_topk_jsd")
              if op in ops]
    if "cos" in ops:  # (dtype, N, H)
        hidden = [("bf16", 1024, 768)] if quick else [("bf16", 16384, 768), ("fp32", 16384, 768), ("bf16", 16384, 4096)]
        cells += [("cos", dt, n, h, MODES) for dt, n, h in hidden]
    if "topk_kl_ce" in ops:  # beside kl_ce at the same shapes
        cells += [("topk_kl_ce", dt, n, v, MODES) for dt, n, v in
                  ([("bf16", 1024, 30522)] if quick else [("bf16", 16384, 30522), ("bf16", 8192, 30522)])]
    if "triple" in ops:  # beside kl_ce at the same shape: end to end vs the sum of its parts
        cells += [("triple", "bf16", *((1024, 30522) if quick else (16384, 30522)), MODES)]
    divergence_grid = [("bf16", 1024, 30522)] if quick else [("bf16", 8192, 128256)]  # the LLM shape
    cells += [(op, dt, n, v, MODES) for op in ops if op in DIVERGENCE_CELL_OPS for dt, n, v in divergence_grid]
    return cells


# ---------------------------------------------------------------- the CPU cost model (the ETA)
# A CPU cell's time is fixed costs (one fresh process per variant for the peak memory, torch.compile)
# plus work in proportion to its size: the steps the timing runs (a warm-up, then round-robin rounds
# until CPU_TIMING's budget; a forward each for the loss check; two in each memory process) and the
# set-up of its inputs (once here, once per memory process).  A step's seconds are its op's work units
# (bytes_moved for the memory-bound losses, the 2·N·H·V flops of one head GEMM for linear_kl_ce) times
# a per-(op, variant) constant, measured on the project's 2-core CPU machines.  A run rescales the
# constants by its own cells (CostModel.update): the work by the step times it measured, the fixed
# costs by what remains of the cells' wall time.  The mean of past cells is no such predictor: the
# 128 × 4096 × 128256 LM-head cell takes ten times the cells before it.
RECENCY = 0.7  # the calibration's weight of a task one task older
CPU_TIMING = {"min_repeats": 3, "max_repeats": 25, "budget_s": 4.0}
CPU_FIXED_S = {"cell": 0.5, "child": 4.0, "child_compile": 6.0, "compile": 4.0, "warmup": 20.0, "finish": 1.0}
INPUT_S_PER_BYTE = 1.0e-9  # building a cell's inputs (randn), per byte of them
# (op, variant): seconds of one fp32 fwd+bwd step per work unit (measured on a 2-core Xeon shared with
# other jobs, so slow, which the calibration absorbs), and the share of it that a fwd-only step takes.
STEP_S_PER_UNIT = {
    ("kl_ce", "ours"): 5.8e-10, ("kl_ce", "eager"): 5.8e-9, ("kl_ce", "compile"): 3.1e-9,
    ("kl", "ours"): 5.8e-10, ("kl", "eager"): 4.7e-9, ("kl", "compile"): 2.1e-9,
    ("cos", "ours"): 4.3e-10, ("cos", "eager"): 3.2e-9, ("cos", "compile"): 7.0e-10,
    ("triple", "ours"): 5.1e-10, ("triple", "eager"): 1.15e-8, ("triple", "compile"): 8.8e-9,
    ("topk_kl_ce", "ours"): 3.0e-10, ("topk_kl_ce", "eager"): 3.9e-9, ("topk_kl_ce", "compile"): 1.8e-9,
    ("topk_kl_ce", "dense"): 1.3e-9,
    ("linear_kl_ce", "ours"): 3.8e-11, ("linear_kl_ce", "eager"): 3.0e-11, ("linear_kl_ce", "compile"): 4.8e-11,
    ("linear_kl_ce", "unfused"): 3.8e-11,
}
# linear_kl_ce: seconds per logit (N·V) on top of the GEMMs (the loss itself, the logits' set-up).
LINEAR_S_PER_LOGIT = {"ours": 1.5e-8, "eager": 5.7e-8, "compile": 5.5e-9, "unfused": 2.3e-8}
FWD_SHARE = {
    ("kl_ce", "ours"): 0.8, ("kl_ce", "eager"): 0.48, ("kl_ce", "compile"): 0.39,
    ("cos", "ours"): 0.54, ("cos", "eager"): 0.27, ("cos", "compile"): 0.41,
    ("topk_kl_ce", "ours"): 0.94, ("topk_kl_ce", "eager"): 0.41, ("topk_kl_ce", "compile"): 0.37,
    ("topk_kl_ce", "dense"): 0.38,
}


def work_units(op_name, n, v):
    if op_name in LINEAR_OPS:
        return 2 * n * LINEAR_HIDDEN[v] * v
    return OPS[op_name].bytes_moved(n, v, torch.float32)


def input_bytes(op_name, n, v):
    """fp32 bytes of the tensors make_inputs builds (approximately)."""
    if op_name in LINEAR_OPS:
        h = LINEAR_HIDDEN[v]
        return 4 * 2 * (n * h + v * h + v)
    extra = 2 * n * HIDDEN if op_name == "triple" else 0
    return 4 * (2 * n * v + extra)


def timing_rounds(round_s, min_repeats=3, max_repeats=25, budget_s=4.0):
    """How many rounds median_ms_interleaved runs, its warm-up included, when a round takes round_s."""
    return 1 + max(min_repeats, min(max_repeats, int(budget_s / max(round_s, 1e-9)) + 1))


def step_class(op_name):
    return "gemm" if op_name in LINEAR_OPS else "bytes"


class CostModel:
    """Predicted seconds of each task of a CPU run (the compile warm-up, the cells, then the points of the
    memory sweep) and their calibration on the tasks done so far: ``eta(i)`` is the predicted time of
    tasks i.. and the finish.  Step times scale by class (GEMM-bound linear_kl_ce, memory-bound rest:
    each by its own measured steps, the other's scale until it has some); fixed costs by one factor.
    The memory processes run memory_processes() at a time: their fixed costs (imports, single-threaded)
    overlap, their steps (on every core) do not."""

    def __init__(self, tasks, names):
        self.tasks, self.names = tasks, names
        self.s_work = {"bytes": None, "gemm": None}
        self.s_fixed = 1.0
        self.done = []  # (task index, seconds it took)
        self.measured = {"bytes": [], "gemm": []}  # (task index, predicted ms at scale 1, measured ms)

    def scale(self, cls):
        other = self.s_work["gemm" if cls == "bytes" else "bytes"]
        return self.s_work[cls] or other or 1.0

    def step_s(self, op_name, variant, mode, n, v):
        if op_name in LINEAR_OPS:  # not measured apart: the forward KL head's constants
            op_name = "linear_kl_ce"
        s = STEP_S_PER_UNIT.get((op_name, variant), 1e-9) * work_units(op_name, n, v)
        if op_name == "linear_kl_ce":
            s += LINEAR_S_PER_LOGIT.get(variant, 2e-8) * n * v
        return s * (FWD_SHARE.get((op_name, variant), 0.5) if mode == "fwd" else 1.0)

    def parts(self, i, scaled=True):
        """(fixed seconds before scaling, work seconds, [(op, variant, mode, predicted ms at scale 1)])."""
        kind, spec = self.tasks[i]
        f = CPU_FIXED_S
        if kind == "warmup":
            return f["warmup"], 0.0, []
        if kind == "sweep":  # one fresh process per variant (ours, unfused) at (N, V)
            n, v = spec
            sw = self.scale("gemm") if scaled else 1.0
            work = sum(INPUT_S_PER_BYTE * input_bytes("linear_kl_ce", n, v) +
                       2 * self.step_s("linear_kl_ce", var, "fwd+bwd", n, v) for var in ("ours", "unfused"))
            return 2 * f["child"] / memory_processes("linear_kl_ce", n, v), sw * work, []
        op_name, _, n, v, modes = spec
        sw = self.scale(step_class(op_name)) if scaled else 1.0
        names = variant_names(OPS[op_name], self.names, "cpu")
        inputs_s = sw * INPUT_S_PER_BYTE * input_bytes(op_name, n, v)
        fixed, work, steps = f["cell"], inputs_s, []
        if "compile" in names:
            fixed += f["compile"]
        work += sw * sum(self.step_s(op_name, var, "fwd", n, v) for var in names if var != "dense")  # loss check
        for mode in modes:
            st = {var: self.step_s(op_name, var, mode, n, v) for var in names}
            steps += [(op_name, var, mode, 1e3 * s) for var, s in st.items()]
            round_s = sw * sum(st.values())
            work += timing_rounds(round_s, **CPU_TIMING) * round_s
            if mode == "fwd+bwd":  # the memory processes
                fixed += sum(f["child"] + (f["child_compile"] if var == "compile" else 0) for var in names) / \
                    min(memory_processes(op_name, n, v), len(names))
                work += len(names) * inputs_s + 2 * round_s
        return fixed, work, steps

    def predict(self, i):
        fixed, work, _ = self.parts(i)
        return self.s_fixed * fixed + work

    def eta(self, i):
        """Predicted seconds of tasks i.. plus the finish (tables, JSON, plots)."""
        return sum(self.predict(j) for j in range(i, len(self.tasks))) + self.s_fixed * CPU_FIXED_S["finish"]

    def update(self, i, seconds, records=()):
        """Task i took ``seconds`` and measured ``records``: rescale the step times by the measured ones
        (all tasks so far, weighted by time), then the fixed costs by what the work leaves of the wall
        time.  The warm-up (inductor's first use: 2 s with a warm cache, 30 s on a fresh machine) stays
        out of the calibration."""
        if self.tasks[i][0] == "warmup":
            return
        self.done.append((i, seconds))
        predicted = {(op, var, mode): ms for op, var, mode, ms in self.parts(i, scaled=False)[2]}
        for r in records:
            key = (r["op"], r["variant"], r["mode"])
            if r.get("ms") is not None and key in predicted:
                self.measured[step_class(r["op"])].append((i, predicted[key], r["ms"]))
        # Recent tasks weigh more (RECENCY per task of age): the load of a shared machine drifts.
        w = lambda j: RECENCY ** (i - j)  # noqa: E731
        for cls, pairs in self.measured.items():
            if pairs:
                self.s_work[cls] = sum(w(j) * m for j, _, m in pairs) / max(sum(w(j) * p for j, p, _ in pairs), 1e-9)
        fixed = sum(w(j) * self.parts(j)[0] for j, _ in self.done)
        left = sum(w(j) * (t - self.parts(j)[1]) for j, t in self.done)
        if fixed > 0:
            self.s_fixed = min(5.0, max(0.2, left / fixed))


def compile_warmup():
    """torch.compile of a small eager loss, so that inductor's first use (imports, its C++ toolchain
    checks and headers: ~30 s on a fresh 2-core machine) is not charged to the first cell."""
    torch._dynamo.reset()
    inputs = make_logits_labels(8, 256, torch.float32, "cpu")
    C.make_step(torch.compile(eager_kl_ce, dynamic=False), inputs, True)()
    torch._dynamo.reset()


# ---------------------------------------------------------------- measuring
def _short(exc):
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def loss_rel_err(fns, inputs, reference="eager"):
    """|loss - eager loss| / |eager loss| of each variant on the first input set (a sanity check
    that a fast number is not a wrong one); variants that fail here are left out."""
    values = {}
    for name, fn in fns.items():
        try:
            values[name] = fn(**inputs).detach().double()
        except Exception as exc:  # noqa: BLE001  (the timing below reports it in the table)
            print(f"  loss check, {name}: {_short(exc)}", file=sys.stderr)
    ref = values.get(reference)
    if ref is None:
        return {}
    return {name: ((v - ref).abs() / ref.abs().clamp_min(1e-30)).item() for name, v in values.items()}


def run_cell(op_name, dtype_name, n, v, modes, device, names, copy_gbs):
    """Records of every variant and mode at one shape: CUDA peak memory in both modes, CPU peak
    memory (one subprocess per variant) in fwd+bwd only."""
    op, dtype = OPS[op_name], DTYPES[dtype_name]
    torch._dynamo.reset()  # one static compile per cell, never the recompile limit
    base = dict(op=op_name, dtype=dtype_name, shape=[n, v], device=device)
    fns = variants(op, names, device)
    records = []
    try:
        n_sets = C.rotation_count(2 * n * v * dtype.itemsize, device)
        sets = [op.make_inputs(n, v, dtype, device, seed=i) for i in range(n_sets)]
    except Exception as exc:  # noqa: BLE001  (an input set that does not fit: every variant is oom)
        status = "oom" if C.is_oom(exc) else f"error: {type(exc).__name__}"
        C.free_memory(device)
        return [dict(base, mode=m, variant=k, ms=None, peak_bytes=None, status=status) for m in modes for k in fns]
    errs = loss_rel_err({k: f for k, f in fns.items() if k != "dense"}, sets[0])  # dense: another loss
    C.free_memory(device)
    for mode in modes:
        backward = mode == "fwd+bwd"
        for name, fn in fns.items():
            rec = dict(base, mode=mode, variant=name, ms=None, peak_bytes=None, status="ok")
            if name in errs:
                rec["loss_rel_err"] = errs[name]
            records.append(rec)
        if device == "cuda":
            _time_cuda(records[-len(fns):], fns, sets, backward, op.excluded_bytes(n, v, dtype) if backward else 0)
        else:
            _time_cpu(records[-len(fns):], fns, sets[0], backward)
            if backward:
                _rss_cpu(records[-len(fns):], op_name, dtype_name, n, v, mode)
        if backward:
            for rec in records[-len(fns):]:
                if rec["status"] == "ok":
                    rec["gbps"] = op.bytes_moved(n, v, dtype) / (rec["ms"] * 1e-3) / 1e9
                    rec["copy_share"] = rec["gbps"] / copy_gbs
    del sets
    C.free_memory(device)
    return records


def _time_cuda(records, fns, sets, backward, excluded):
    for rec, (name, fn) in zip(records, fns.items()):
        steps = [C.make_step(fn, inputs, backward, clear_grads=False) for inputs in sets]
        cycle = itertools.cycle(steps)
        leaves = [leaf for st in steps for leaf in st.leaves]
        try:
            steps[0]()  # compile / autotune outside the timed runs
            rec["ms"] = C.median_ms_cuda(lambda: next(cycle)(), grad_to_none=leaves)
            for leaf in leaves:
                leaf.grad = None
            rec["peak_bytes"] = C.cuda_peak_bytes(steps[0]) - excluded
        except Exception as exc:  # noqa: BLE001
            rec["status"] = "oom" if C.is_oom(exc) else f"error: {type(exc).__name__}"
            print(f"  {rec['op']} {name}: {_short(exc)}", file=sys.stderr)
        for leaf in leaves:
            leaf.grad = None
        C.free_memory("cuda")


def _time_cpu(records, fns, inputs, backward):
    steps = {name: C.make_step(fn, inputs, backward) for name, fn in fns.items()}
    try:
        ms = C.median_ms_interleaved(steps, **CPU_TIMING)
    except Exception as exc:  # noqa: BLE001  (one broken variant must not hide the others)
        print(f"  side-by-side timing failed ({_short(exc)}); timing one by one", file=sys.stderr)
        ms = {}
        for name, step in steps.items():
            try:
                ms.update(C.median_ms_interleaved({name: step}, **CPU_TIMING))
            except Exception as exc2:  # noqa: BLE001
                ms[name] = f"error: {type(exc2).__name__}"
    for rec in records:
        value = ms[rec["variant"]]
        if isinstance(value, str):
            rec["status"] = value
        else:
            rec["ms"] = value


def memory_processes(op_name, n, v):
    """How many memory processes to run at a time: two (their imports are single-threaded, so two
    overlap on 2 cores) where two copies of the inputs and a generous peak fit in the available
    memory, else one.  Each still measures its own peak in its own fresh process."""
    try:
        with open("/proc/meminfo") as f:
            available = int(re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024
    except (OSError, AttributeError):
        return 1
    need = 8 * input_bytes(op_name, n, v) + 2**30  # inputs, the eager peak (a few [N, V]), torch itself
    return 2 if (os.cpu_count() or 1) >= 2 and 2 * need < 0.8 * available else 1


def _rss_cpu(records, op_name, dtype_name, n, v, mode):
    todo = [rec for rec in records if rec["status"] == "ok"]

    def measure(rec):
        argv = [os.path.abspath(__file__), "--rss-child", op_name, rec["variant"], dtype_name, str(n), str(v), mode]
        try:
            rec["peak_bytes"] = C.peak_rss_subprocess(argv) - OPS[op_name].excluded_bytes(n, v, DTYPES[dtype_name])
        except RuntimeError as exc:
            print(f"  {op_name} {rec['variant']} memory: {exc}", file=sys.stderr)

    with ThreadPoolExecutor(memory_processes(op_name, n, v)) as pool:
        list(pool.map(measure, todo))


def rss_child(op_name, variant, dtype_name, n, v, mode):
    op = OPS[op_name]
    fn = variants(op, (variant,), "cpu")[variant]
    make = lambda: op.make_inputs(n, v, DTYPES[dtype_name], "cpu")  # noqa: E731
    C.rss_child_report(make, lambda inputs: C.make_step(fn, inputs, mode == "fwd+bwd")())


SWEEP_N, SWEEP_V = (1024, 2048, 4096, 8192, 16384), 8192  # H = LINEAR_HIDDEN[8192]


def sweep_points(quick):
    """The (N, V) points of the linear_kl_ce memory sweep (H = LINEAR_HIDDEN[V])."""
    ns, v = ((64, 128, 256), 4096) if quick else (SWEEP_N, SWEEP_V)
    return [(n, v) for n in ns]


def linear_memory_point(n, v):
    """CPU peak memory (fresh process each) of the fused and unfused linear_kl_ce at one N, fwd+bwd, above the
    inputs and the head's parameter gradients: over N (sweep_points) the fused path should grow only by the
    [N, H] hidden gradient, the unfused one by the [N, V] logits and their gradient."""
    def measure(variant):
        argv = [os.path.abspath(__file__), "--rss-child", "linear_kl_ce", variant, "fp32", str(n), str(v), "fwd+bwd"]
        peak = C.peak_rss_subprocess(argv) - linear_param_grad_bytes(n, v, torch.float32)
        return dict(variant=variant, n=n, h=LINEAR_HIDDEN[v], v=v, peak_bytes=peak)

    with ThreadPoolExecutor(memory_processes("linear_kl_ce", n, v)) as pool:
        return list(pool.map(measure, ("ours", "unfused")))


def sweep_table(rows):
    by = {(r["variant"], r["n"]): r["peak_bytes"] for r in rows}
    ns = sorted({r["n"] for r in rows})
    h, v = rows[0]["h"], rows[0]["v"]
    lines = [f"linear_kl_ce peak memory over N (fp32, H={h}, V={v}, fwd+bwd, MiB above inputs and parameter "
             "gradients)", "", "| N | ours (fused) | unfused | fused / unfused | [N, H] fp32 |",
             "|---|---|---|---|---|"]
    for n in ns:
        ours, unfused = by[("ours", n)], by[("unfused", n)]
        lines.append(f"| {n} | {ours / 2**20:.1f} | {unfused / 2**20:.1f} | {ours / unfused:.3f} | "
                     f"{n * h * 4 / 2**20:.1f} |")
    # Below the automatic chunk size the chunk is all N rows; from there on only [N, H] tensors grow.
    chunk = auto_chunk_rows(ns[-1], v, 4)
    full = [n for n in ns[:-1] if n >= chunk]
    first = min(full or ns[:1])
    state = "is full" if full else "is never full in this sweep"
    growth = by[("ours", ns[-1])] - by[("ours", first)]
    lines += ["", f"fused growth from N={first} (the automatic chunk, {chunk} rows, {state}) "
                  f"to N={ns[-1]}: {growth / 2**20:.1f} MiB = {growth / ((ns[-1] - first) * h * 4):.2f}× the "
                  "[ΔN, H] fp32 hidden gradient"]
    return "\n".join(lines)


def plot_sweep(stem, rows, title):
    """Peak memory over N, fused vs unfused: the PNG path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for variant, label in (("ours", "fused (linear_kl_ce_loss)"), ("unfused", "F.linear ×2 + kl_ce_loss")):
        pts = sorted((r["n"], r["peak_bytes"] / 2**20) for r in rows if r["variant"] == variant)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows N")
    ax.set_ylabel("peak MiB above inputs + param grads")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    path = C.RESULTS_DIR / f"{stem}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- targets
def _find(records, op, dtype, shape, variant, mode="fwd+bwd"):
    for r in records:
        if (r["op"], r["dtype"], tuple(r["shape"]), r["variant"], r["mode"]) == (op, dtype, shape, variant, mode):
            return r if r["status"] == "ok" else None
    return None


def targets(records, device):
    """(target, measured, met) rows for the figures the project has promised."""
    rows = []

    def ratio(op, dtype, shape, a, b, key="ms"):
        ra, rb = _find(records, op, dtype, shape, a), _find(records, op, dtype, shape, b)
        if ra is None or rb is None or not rb.get(key) or ra.get(key) is None:
            return None
        return rb[key] / ra[key] if key == "ms" else ra[key] / rb[key]

    def add(label, value, bound, higher_is_better, unit="×"):
        met = None if value is None else (value >= bound if higher_is_better else value <= bound)
        shown = "not measured" if value is None else f"{value:.2f}{unit}"
        rows.append((label, shown, {None: "–", True: "yes", False: "NO"}[met]))

    if device == "cpu":
        shape = CPU_MAIN
        add("CPU kl_ce fp32 2048×30522 fwd+bwd: ≥ 2× faster than eager",
            ratio("kl_ce", "fp32", shape, "ours", "eager"), 2.0, True)
        add("CPU kl_ce fp32 2048×30522 fwd+bwd: ≤ 0.5× eager's peak memory",
            ratio("kl_ce", "fp32", shape, "ours", "eager", key="peak_bytes"), 0.5, False)
        add("CPU cos fp32 16384×768 fwd+bwd: ≥ 2× faster than eager",
            ratio("cos", "fp32", (16384, 768), "ours", "eager"), 2.0, True)
        linear = (4096, 30522)
        add("CPU linear_kl_ce fp32 N=4096 H=768 V=30522 fwd+bwd: peak memory ≤ 0.2× ours-unfused",
            ratio("linear_kl_ce", "fp32", linear, "ours", "unfused", key="peak_bytes"), 0.2, False)
        add("CPU linear_kl_ce fp32 N=4096 H=768 V=30522 fwd+bwd: peak memory ≤ 0.1× eager",
            ratio("linear_kl_ce", "fp32", linear, "ours", "eager", key="peak_bytes"), 0.1, False)
        add("CPU linear_kl_ce fp32 N=4096 H=768 V=30522 fwd+bwd: time ≤ 1.0× ours-unfused",
            _inverse(ratio("linear_kl_ce", "fp32", linear, "ours", "unfused")), 1.0, False)
        add(f"CPU topk_kl_ce k={TOPK} fp32 2048×30522 fwd+bwd: ≥ 1.3× faster than dense kl_ce_loss",
            ratio("topk_kl_ce", "fp32", shape, "ours", "dense"), 1.3, True)
        for name in [name for name in DIVERGENCE_OPS if any(r["op"] == name for r in records)]:
            add(f"CPU {name} fp32 2048×30522 fwd+bwd: ≥ 3× faster than eager",
                ratio(name, "fp32", shape, "ours", "eager"), 3.0, True)
            add(f"CPU {name} fp32 2048×30522 fwd+bwd: ≥ 1.5× faster than torch.compile",
                ratio(name, "fp32", shape, "ours", "compile"), 1.5, True)
            add(f"CPU {name} fp32 2048×30522 fwd+bwd: ≤ 0.25× eager's peak memory",
                ratio(name, "fp32", shape, "ours", "eager", key="peak_bytes"), 0.25, False)
        for name in [name for name in ("linear_jsd", "linear_topk_jsd") if any(r["op"] == name for r in records)]:
            add(f"CPU {name} fp32 N=4096 H=768 V=30522 fwd+bwd: time ≤ 1.0× ours-unfused",
                _inverse(ratio(name, "fp32", linear, "ours", "unfused")), 1.0, False)
            add(f"CPU {name} fp32 N=4096 H=768 V=30522 fwd+bwd: peak memory ≤ 0.5× ours-unfused",
                ratio(name, "fp32", linear, "ours", "unfused", key="peak_bytes"), 0.5, False)
        jsd, kl = _find(records, "jsd", "fp32", shape, "ours"), _find(records, "kl", "fp32", shape, "ours")
        if any(r["op"] == "jsd" for r in records):
            add("CPU jsd fp32 2048×30522 fwd+bwd: ≤ 1.5× the forward KL's time (kl_div_loss)",
                None if jsd is None or kl is None else jsd["ms"] / kl["ms"], 1.5, False)
    else:
        shape = (8192, 30522)
        ours = _find(records, "kl_ce", "bf16", shape, "ours")
        add("H100 kl_ce bf16 8192×30522 fwd+bwd: ≥ 90% of copy bandwidth",
            None if ours is None else 100 * ours["copy_share"], 90.0, True, unit="%")
        add("H100 kl_ce bf16 8192×30522 fwd+bwd: ≥ 6× eager", ratio("kl_ce", "bf16", shape, "ours", "eager"), 6.0, True)
        add("H100 kl_ce bf16 8192×30522 fwd+bwd: ≥ 1.3× torch.compile",
            ratio("kl_ce", "bf16", shape, "ours", "compile"), 1.3, True)
        add("H100 kl (KL only, Liger has no CE) bf16 8192×30522 fwd+bwd: ≥ 2× Liger",
            ratio("kl", "bf16", shape, "ours", "liger"), 2.0, True)
        cos = _find(records, "cos", "bf16", (16384, 768), "ours")
        add("H100 cos bf16 16384×768 fwd+bwd: ≥ 85% of copy bandwidth",
            None if cos is None else 100 * cos["copy_share"], 85.0, True, unit="%")
        add("H100 cos bf16 16384×768 fwd+bwd: ≥ 4× eager", ratio("cos", "bf16", (16384, 768), "ours", "eager"),
            4.0, True)
        topk = _find(records, "topk_kl_ce", "bf16", (16384, 30522), "ours")
        add(f"GPU topk_kl_ce k={TOPK} bf16 16384×30522 fwd+bwd: ≥ 85% of copy bandwidth "
            "(2·V·e + k·(e+idx) per row)",
            None if topk is None else 100 * topk["copy_share"], 85.0, True, unit="%")
        triple = _find(records, "triple", "bf16", (16384, 30522), "ours")
        parts = [_find(records, op, dt, shp, "ours") for op, dt, shp in
                 (("kl_ce", "bf16", (16384, 30522)), ("cos", "bf16", (16384, 768)))]
        add("GPU linear_kl_ce bf16 16384×30522 (H=768) fwd+bwd: ≥ 1.2× faster than ours-unfused",
            ratio("linear_kl_ce", "bf16", (16384, 30522), "ours", "unfused"), 1.2, True)
        add("GPU linear_kl_ce bf16 16384×30522 (H=768) fwd+bwd: ≤ 0.25× ours-unfused's peak memory",
            ratio("linear_kl_ce", "bf16", (16384, 30522), "ours", "unfused", key="peak_bytes"), 0.25, False)
        add("GPU linear_kl_ce bf16 8192×128256 (H=4096) fwd+bwd: ≤ 1.2× the same four GEMMs alone",
            _inverse(ratio("linear_kl_ce", "bf16", (8192, 128256), "ours", "gemms")), 1.2, False)
        for name in [name for name in ("linear_jsd", "linear_topk_jsd") if any(r["op"] == name for r in records)]:
            add(f"GPU {name} bf16 8192×30522 (H=768) fwd+bwd: ≥ 1.0× ours-unfused's speed",
                ratio(name, "bf16", (8192, 30522), "ours", "unfused"), 1.0, True)
            add(f"GPU {name} bf16 8192×30522 (H=768) fwd+bwd: ≤ 0.5× ours-unfused's peak memory",
                ratio(name, "bf16", (8192, 30522), "ours", "unfused", key="peak_bytes"), 0.5, False)
        add("H100 triple bf16 16384×30522 (+H=768) fwd+bwd: ≤ 1.0× the sum of its fused parts",
            None if triple is None or None in parts else triple["ms"] / sum(p["ms"] for p in parts), 1.0, False)
        llm = (8192, 128256)
        jsd = _find(records, "jsd", "bf16", llm, "ours")
        add("GPU jsd bf16 8192×128256 fwd+bwd: ≥ 2× Liger (LigerJSD)", ratio("jsd", "bf16", llm, "ours", "liger"),
            2.0, True)
        add("GPU jsd bf16 8192×128256 fwd+bwd: ≥ 70% of copy bandwidth",
            None if jsd is None else 100 * jsd["copy_share"], 70.0, True, unit="%")
        add("GPU ce_tvd bf16 8192×128256 fwd+bwd: faster than Liger (LigerFusedCETVDLoss)",
            ratio("ce_tvd", "bf16", llm, "ours", "liger"), 1.0, True)
    return rows


def _inverse(x):
    return None if x is None else 1.0 / x


def targets_table(rows):
    lines = ["| target | measured | met |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- main
def eta_table(eta_log):
    lines = ["| after cell | took | predicted | ETA | actually left | ETA error |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(eta_log):
        if r["eta_s"] is None:
            continue
        diff = r["eta_s"] - r["actual_s"]
        err = f"{diff:+.1f}s" if r["actual_s"] < 20 else f"{100 * diff / r['actual_s']:+.0f}% ({diff:+.0f}s)"
        pred = "–" if r["predicted_s"] is None else C.format_seconds(r["predicted_s"])
        lines.append(f"| {i + 1} {r['task']} | {C.format_seconds(r['took_s'])} | {pred} | "
                     f"{C.format_seconds(r['eta_s'])} | {C.format_seconds(r['actual_s'])} | {err} |")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--quick", action="store_true", help="tiny shapes (CI smoke run); results get a _quick suffix")
    p.add_argument("--full", action="store_true",
                   help="the whole set. CPU: adds the LM-head cells (linear_kl_ce, N x H x V = 1024 x 768 x 30522,\n"
                        "4096 x 768 x 30522, 128 x 4096 x 128256; linear_jsd and linear_topk_jsd at\n"
                        "4096 x 768 x 30522) and its memory sweep over N "
                        "(~15 min more on 2 cores)\n"
                        "CUDA: N in {2048,8192,16384} x V in {30522,50257,128256} x {fp32,bf16}")
    p.add_argument("--ops", default=None, help=f"comma-separated subset of {','.join(OPS)} (default: all; an op named\n"
                                               "here whose cells are all --full ones, linear_*, runs them)")
    p.add_argument("--variants", default="ours,unfused,gemms,eager,compile,liger,dense", help="comma-separated subset")
    C.add_output_args(p)
    p.add_argument("--rss-child", nargs=6, metavar=("OP", "VARIANT", "DTYPE", "N", "V", "MODE"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.explicit_ops = () if args.ops is None else tuple(o for o in args.ops.split(",") if o)
    args.ops = list(args.explicit_ops or OPS)
    unknown = [o for o in args.ops if o not in OPS]
    if unknown:
        p.error(f"--ops: unknown op(s) {unknown}; known: {list(OPS)}")
    args.variants = tuple(v for v in args.variants.split(",") if v)
    args.device = C.resolve_device(p, args.device)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.rss_child:
        op, variant, dtype, n, v, mode = args.rss_child
        return rss_child(op, variant, dtype, int(n), int(v), mode)

    device = args.device
    machine = C.machine_info(device)
    copy_gbs = C.copy_bandwidth_gbs(device, 2**30 if device == "cuda" else 2**28)
    plan = (cpu_plan(args.quick, args.ops, args.full, args.explicit_ops) if device == "cpu"
            else cuda_plan(args.quick, args.full, args.ops))
    print(f"# distil loss benchmark: {device}, {machine.get('gpu', machine['cpu'])}, torch {machine['torch']}, "
          f"triton {machine['triton']}; copy bandwidth {copy_gbs:.0f} GB/s (read+write); {len(plan)} cells",
          flush=True)
    tasks = [("cell", c) for c in plan]
    linear_cells = any(c[0] == "linear_kl_ce" for c in plan)
    if device == "cpu" and linear_cells:
        tasks += [("sweep", p) for p in sweep_points(args.quick)]
    if device == "cpu" and tasks and "compile" in args.variants:
        tasks.insert(0, ("warmup", None))
    model = CostModel(tasks, args.variants) if device == "cpu" else None
    if model is not None:
        print(f"# predicted: {C.format_seconds(model.eta(0))} (cost model of the cells' shapes before calibration; "
              f"--full for the whole set)" if not args.full and not args.quick else
              f"# predicted: {C.format_seconds(model.eta(0))} (cost model before calibration)", flush=True)
    records, sweep, eta_log = [], [], []
    start = time.perf_counter()
    for i, (kind, spec) in enumerate(tasks):
        label = {"cell": lambda: f"{spec[0]} {spec[1]} {spec[2]}×{spec[3]}",
                 "sweep": lambda: f"linear_kl_ce memory sweep N={spec[0]} (ours, unfused)",
                 "warmup": lambda: "torch.compile warm-up"}[kind]()
        predicted = None if model is None else model.predict(i)
        print(f"  [{i + 1}/{len(tasks)}] {label} ...", end="", flush=True)
        task_start = time.perf_counter()
        if kind == "cell":
            op, dtype, n, v, modes = spec
            new = run_cell(op, dtype, n, v, modes, device, args.variants, copy_gbs)
            records += new
        elif kind == "sweep":
            new = []
            sweep += linear_memory_point(*spec)
        else:
            new = []
            compile_warmup()
        now = time.perf_counter()
        took = now - task_start
        if model is not None:
            model.update(i, took, new)
            # The warm-up measures nothing the cells share: no ETA until the first cell has calibrated it.
            eta = None if kind == "warmup" else model.eta(i + 1)
        else:  # CUDA: the mean of the cells so far (no cost model there yet)
            eta = (now - start) / (i + 1) * (len(tasks) - i - 1)
        eta_log.append(dict(task=label, took_s=round(took, 1),
                            predicted_s=None if predicted is None else round(predicted, 1),
                            elapsed_s=round(now - start, 1), eta_s=None if eta is None else round(eta, 1)))
        shown = "" if predicted is None else f", predicted {C.format_seconds(predicted)}"
        eta_text = "ETA after the first cell" if eta is None else f"ETA {C.format_seconds(eta)}"
        print(f" {C.format_seconds(took)}{shown} (elapsed {C.format_seconds(now - start)}, {eta_text})", flush=True)
    C.add_ratios(records)
    method = C.CUDA_MEMORY_METHOD if device == "cuda" else C.CPU_MEMORY_METHOD
    timing = ("triton.testing.do_bench median (L2 flushed between runs)" if device == "cuda" else
              "perf_counter median over round-robin repeats of all variants side by side")
    goal_rows = targets(records, device)
    print()
    print(C.markdown_table(records))
    print()
    print(targets_table(goal_rows))
    print()
    if sweep:
        print(sweep_table(sweep))
        print()
    print(f"Timing: {timing}. GB/s = 3·N·V·bytes / time (student and teacher read once, gradient written "
          f"once), fwd+bwd rows only; % of a {copy_gbs:.0f} GB/s copy measured in this run. {method}. "
          f"fwd = forward with student.requires_grad=True. Loss values checked against eager: "
          f"max rel. err {max((r.get('loss_rel_err', 0) for r in records), default=0):.1e}.")
    stem = f"loss_{device}_{C.machine_tag(device)}"
    if list(args.ops) != list(OPS):  # a subset run does not overwrite the whole table
        stem += "_" + "-".join(args.ops)
    stem = C.result_stem(stem, args)
    memory_note = "peak memory above the inputs" + (", fresh process per variant" if device == "cpu" else "")
    png = C.plot_records(stem, records, f"distil loss, {machine.get('gpu', machine['cpu'])}", memory_note=memory_note)
    sweep_png = sweep and plot_sweep(f"{stem}_linear_memory", sweep,
                                     f"linear_kl_ce peak memory over N, {machine.get('gpu', machine['cpu'])}")
    end = time.perf_counter() - start
    for row in eta_log:
        row["actual_s"] = round(end - row["elapsed_s"], 1)
    path = C.write_json(stem, machine, records, copy_gbs=copy_gbs, timing=timing, memory_method=method,
                        targets=[dict(target=a, measured=b, met=c) for a, b, c in goal_rows],
                        linear_kl_ce_memory_sweep=sweep, wall_s=round(end, 1), eta=eta_log)
    print(f"\nwrote {path}" + (f" and {png}" if png else " (no matplotlib: no plot)"))
    if sweep:
        print(f"wrote {sweep_png}" if sweep_png else "(no matplotlib: no sweep plot)")
    print(f"\n{len(tasks)} tasks in {C.format_seconds(end)} (their own times: "
          f"{C.format_seconds(sum(r['took_s'] for r in eta_log))}). The ETA printed after each cell against "
          "the time that was in fact left (the finish: tables, JSON, plots):")
    print(eta_table(eta_log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
