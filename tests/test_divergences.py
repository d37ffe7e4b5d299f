"""What only the divergences of distil::kl_ce_rows other than the forward KL have (reverse KL, JSD, skew
KLs, TVD: csrc/divergence.h, kernels/divergence.py, distil/_ops/divergence.py): a zero probability on one
side, a NaN teacher row, the parameters at their limits; the public functions, their checks and
torch.compile; TRL's and Liger's formulas, restated from their code; the sm_80 / sm_90 builds of every new
specialisation; the top-k teacher's divergences. The generic families (forward and every backward mode
against float64 on both kernels, opcheck) run each divergence as samples of the kl_ce OpInfo
(tests/opinfo.py, tests/test_ops.py). The forward KL's own tests are tests/test_kl_ce.py."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from distil import fused_loss, reference
from distil.kernels import kl_ce as K
from distil.kernels import topk_kl_ce as topk_kernels

from aot import compile_reports, launch_spec, main_loop_widths
from helpers import API_DEVICES, GPU_RUN, nan_empty, poison_heap, relative_error
from opinfo import (
    DIVERGENCE_IDS,
    DIVERGENCES,
    KL_CE,
    expected,
    forward,
    impl_device,
    kl_ce_inputs,
    kl_ce_sample,
)

NEG_INF = float("-inf")
kl_ce_rows = torch.ops.distil.kl_ce_rows


def with_divergence(sample, divergence, param):
    return sample._replace(variant=(divergence, param))


# ----------------------------------------------------------------------------------------------
# -inf and NaN
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["cpu", "triton"])
@pytest.mark.parametrize("divergence,param", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_a_zero_on_one_side_only(triton_device, impl, divergence, param):
    """A token of probability 0 for one model only: +inf for the divergences that are infinite there
    (the reverse KL where the teacher's is 0; the forward KL's twin is in tests/test_kl_ce.py), the
    float64 definition (finite) for the others."""
    device = impl_device(impl, triton_device)
    s, t, labels, _ = kl_ce_inputs((4,), 40, device=device)
    t[0, 3] = NEG_INF  # p = 0 < q
    s[1, 5] = NEG_INF  # q = 0 < p
    sample = with_divergence(kl_ce_sample("", s, t, labels, None), divergence, param)
    kl, ce, grad = forward(KL_CE, impl, sample, torch.tensor([1.0, 1.0], device=device))
    (ref_kl, ref_ce), ref_grad = expected(KL_CE, sample, (1.0, 1.0))
    finite = [1, 2, 3] if divergence == "reverse_kl" else [0, 1, 2, 3]
    if divergence == "reverse_kl":
        assert kl[0] == float("inf")
    assert relative_error(kl[finite], ref_kl[finite]) <= 1e-5 and relative_error(ce, ref_ce) <= 1e-5
    assert relative_error(grad[finite], ref_grad[finite]) <= 1e-5 and torch.isfinite(grad[finite]).all()


@pytest.mark.parametrize("impl", ["cpu", "triton"])
@pytest.mark.parametrize("divergence,param", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_nan_rows_give_nan(triton_device, impl, divergence, param):
    device = impl_device(impl, triton_device)
    s, t, labels, _ = kl_ce_inputs((4,), 40, device=device)
    s[0, 3] = float("nan")
    t[1, 4] = float("nan")
    mask = torch.tensor([True, True, True, False], device=device)
    t[3, 0] = float("nan")  # a row without the divergence: its teacher is not read
    labels[3] = 2
    sample = with_divergence(kl_ce_sample("", s, t, labels, mask), divergence, param)
    kl, ce, grad = forward(KL_CE, impl, sample, torch.tensor([1.0, 1.0], device=device))
    assert kl[:2].isnan().all() and grad[:2].isnan().all()
    assert torch.isfinite(kl[2:]).all() and torch.isfinite(grad[2:]).all() and kl[3] == 0


# ----------------------------------------------------------------------------------------------
# The public functions
# ----------------------------------------------------------------------------------------------
def _public(divergence, param):
    """The keyword arguments of the public functions for an op-level (divergence, param)."""
    if divergence == "jsd":
        return {"divergence": "jsd", "jsd_beta": param}
    if divergence.startswith("skew"):
        return {"divergence": divergence, "skew_alpha": param}
    return {"divergence": divergence}


@pytest.mark.parametrize("device", API_DEVICES)
@pytest.mark.parametrize("divergence,param", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_kl_ce_loss_matches_the_definitions(device, divergence, param):
    s, t, labels, mask = kl_ce_inputs((12,), 50, device=device)
    s1 = s.clone().requires_grad_()
    kl, ce = fused_loss.kl_ce_loss(s1, t, labels, temperature=1.5, kl_mask=mask, kl_weight=3.0, ce_weight=0.5,
                                   **_public(divergence, param))
    (3.0 * kl + 0.5 * ce).backward()
    s2 = s.double().requires_grad_()
    ref_rows = reference.divergence_rows(F.log_softmax(t.double()[mask] / 1.5, -1),
                                         F.log_softmax(s2[mask] / 1.5, -1), divergence, param) * 1.5**2
    ref_kl = ref_rows.sum() / mask.sum()
    ref_ce = F.cross_entropy(s2, labels)
    (3.0 * ref_kl + 0.5 * ref_ce).backward()
    assert relative_error(kl, ref_kl) <= 1e-5 and relative_error(ce, ref_ce) <= 1e-5
    assert relative_error(s1.grad, s2.grad) <= 1e-5


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_kl_div_loss_reductions(reduction):
    s, t, _, mask = kl_ce_inputs((8,), 30)
    out = fused_loss.kl_div_loss(s, t, mask=mask, reduction=reduction, divergence="tvd")
    rows = torch.where(mask, reference.divergence_rows(F.log_softmax(t.double() / 2, -1),
                                                       F.log_softmax(s.double() / 2, -1), "tvd") * 4, 0.0)
    ref = {"batchmean": rows.sum() / mask.sum(), "sum": rows.sum(), "none": rows}[reduction]
    assert relative_error(out, ref) <= 1e-5


@pytest.mark.parametrize("public,plain", [({"divergence": "jsd", "jsd_beta": 0.0}, "forward_kl"),
                                          ({"divergence": "jsd", "jsd_beta": 1}, "reverse_kl"),
                                          ({"divergence": "skew_kl", "skew_alpha": 0.0}, "forward_kl"),
                                          ({"divergence": "skew_reverse_kl", "skew_alpha": 0}, "reverse_kl")])
def test_the_ends_of_the_parameters_are_the_plain_kls(public, plain):
    """β = 0 / 1 (as TRL and Liger special-case them: the mixture formula vanishes there) and α = 0."""
    s, t, labels, mask = kl_ce_inputs((6,), 30)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    kl1, _ = fused_loss.kl_ce_loss(s1, t, labels, kl_mask=mask, **public)
    kl2, _ = fused_loss.kl_ce_loss(s2, t, labels, kl_mask=mask, divergence=plain)
    kl1.backward()
    kl2.backward()
    assert torch.equal(kl1, kl2) and torch.equal(s1.grad, s2.grad)


@pytest.mark.parametrize("divergence,param", [("jsd", 1e-4), ("jsd", 1 - 1e-4), ("skew_kl", 1e-4),
                                              ("skew_kl", 0.99), ("skew_reverse_kl", 1e-4),
                                              ("skew_reverse_kl", 0.99)])
@pytest.mark.parametrize("impl", ["cpu", "triton"])
def test_parameters_near_their_limits(triton_device, impl, divergence, param):
    """Near beta = 0 / 1 the JSD is O(beta^2) from terms of O(beta) that cancel (the skew KLs alike): fp32
    keeps ~1e-7 / beta of relative accuracy there (distil/_ops/divergence.py)."""
    sample = kl_ce_sample("", *kl_ce_inputs((6,), 37, device=impl_device(impl, triton_device)))
    sample = with_divergence(sample, divergence, param)
    kl, _, grad = forward(KL_CE, impl, sample, torch.tensor([1.0, 0.0], device=sample.student.device))
    (ref_kl, _), ref_grad = expected(KL_CE, sample, (1.0, 0.0))
    tol = 3e-6 / min(param, 1 - param)
    assert relative_error(kl, ref_kl) <= tol and relative_error(grad, ref_grad) <= tol


def test_bad_divergence_arguments_name_the_argument():
    s, t, labels, _ = kl_ce_inputs((4,), 10)
    with pytest.raises(ValueError, match="divergence must be one of"):
        fused_loss.kl_div_loss(s, t, divergence="kl")
    with pytest.raises(ValueError, match="jsd_beta must be in"):
        fused_loss.kl_ce_loss(s, t, labels, divergence="jsd", jsd_beta=1.5)
    with pytest.raises(ValueError, match="jsd_beta must be in"):
        fused_loss.kl_ce_loss(s, t, labels, divergence="jsd", jsd_beta=float("nan"))
    with pytest.raises(ValueError, match="skew_alpha must be in"):
        fused_loss.kl_div_loss(s, t, divergence="skew_kl", skew_alpha=1.0)
    with pytest.raises(TypeError, match="jsd_beta must be a float"):
        fused_loss.kl_div_loss(s, t, divergence="jsd", jsd_beta=True)
    with pytest.raises(ValueError, match="jsd_beta is a parameter of divergence='jsd'"):
        fused_loss.kl_div_loss(s, t, divergence="reverse_kl", jsd_beta=0.2)
    with pytest.raises(ValueError, match="skew_alpha is a parameter"):
        fused_loss.kl_ce_loss(s, t, labels, divergence="jsd", skew_alpha=0.2)
    # The op entry checks the name and the parameter's range itself (direct torch.ops calls).
    coef = torch.tensor([1.0, 1.0])
    with pytest.raises(ValueError, match="unknown divergence"):
        kl_ce_rows(s, t, None, None, coef, 2.0, -100, False, "kl", 0.0)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        kl_ce_rows(s, t, None, None, coef, 2.0, -100, False, "jsd", 1.0)
    with pytest.raises(ValueError, match="takes no divergence_param"):
        kl_ce_rows(s, t, None, None, coef, 2.0, -100, False, "tvd", 0.5)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    s, t, labels, mask = kl_ce_inputs((6,), 40)

    @torch.compile(fullgraph=True, backend=backend)
    def step(s, t, labels, mask):
        kl, ce = fused_loss.kl_ce_loss(s, t, labels, kl_mask=mask, kl_weight=5.0, ce_weight=2.0, divergence="jsd",
                                       jsd_beta=0.3)
        return 5.0 * kl + 2.0 * ce

    s1 = s.clone().requires_grad_()
    step(s1, t, labels, mask).backward()
    s2 = s.clone().requires_grad_()
    kl, ce = fused_loss.kl_ce_loss(s2, t, labels, kl_mask=mask, divergence="jsd", jsd_beta=0.3)
    (5.0 * kl + 2.0 * ce).backward()
    assert relative_error(s1.grad, s2.grad) <= 1e-6


# ----------------------------------------------------------------------------------------------
# TRL's and Liger's formulas, restated from their code (neither is a dependency)
# ----------------------------------------------------------------------------------------------
def trl_generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature):
    """trl/trainer/gkd_trainer.py, GKDTrainer.generalized_jsd_loss with reduction="batchmean": log-softmax at
    T, the mixture's log by logsumexp of the log-probabilities shifted by log(1 - beta) / log(beta), F.kl_div
    with log_target, beta = 0 / 1 special-cased as the plain KLs, the sum over the labelled rows divided by
    their count (no T²)."""
    s = F.log_softmax(student_logits / temperature, -1)
    t = F.log_softmax(teacher_logits / temperature, -1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s.dtype)
        m = torch.logsumexp(torch.stack([s + torch.log(1 - b), t + torch.log(b)]), dim=0)
        jsd = (b * F.kl_div(m, t, reduction="none", log_target=True)
               + (1 - b) * F.kl_div(m, s, reduction="none", log_target=True))
    rows = labels != -100
    return jsd[rows].sum() / rows.sum()


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_is_trls_generalized_jsd_times_t_squared(beta):
    s, t, labels, _ = kl_ce_inputs((10,), 60)
    s1, s2 = s.clone().requires_grad_(), s.double().requires_grad_()
    ours = fused_loss.kl_div_loss(s1, t, temperature=2.0, mask=labels != -100, divergence="jsd", jsd_beta=beta)
    trl = trl_generalized_jsd_loss(s2, t.double(), labels, beta, 2.0) * 4.0
    ours.backward()
    trl.backward()
    assert relative_error(ours, trl) <= 1e-5 and relative_error(s1.grad, s2.grad) <= 1e-5


def test_jsd_is_ligers_jsd():
    """liger_kernel/ops/jsd.py, _jsd_kernel for 0 < beta < 1, on log-probabilities X = log Q (student) and
    Y = log P (teacher): loss = sum(beta P Y + (1 - beta) Q X - M log M), M = beta P + (1 - beta) Q, divided
    by the rows; dX = (1 - beta) Q (X - log M), the gradient w.r.t. X, taken here to the logits through
    log_softmax."""
    beta = 0.3
    s, t, _, _ = kl_ce_inputs((8,), 50)
    s1 = s.clone().requires_grad_()
    ours = fused_loss.kl_div_loss(s1, t, temperature=1.0, divergence="jsd", jsd_beta=beta)
    ours.backward()
    X, Y = F.log_softmax(s.double(), -1), F.log_softmax(t.double(), -1)
    Q, P = X.exp(), Y.exp()
    M = beta * P + (1 - beta) * Q
    liger = (beta * P * Y + (1 - beta) * Q * X - M * M.log()).sum() / s.shape[0]
    dX = (1 - beta) * Q * (X - M.log()) / s.shape[0]
    d_logits = dX - Q * dX.sum(-1, keepdim=True)  # d/ds of sum(dX * log_softmax(s))
    assert relative_error(ours, liger) <= 1e-5 and relative_error(s1.grad, d_logits) <= 1e-5


def test_tvd_is_ligers_tvd():
    """liger_kernel/ops/tvd.py, _tv_distance_kernel with reduction="batchmean": loss = sum(0.5 |p - q|) / rows
    and the gradient w.r.t. its first distribution where(p > q, 0.5, -0.5) / rows (ties, -0.5 there, do not
    occur here), taken to the student's logits through softmax."""
    s, t, _, _ = kl_ce_inputs((8,), 50)
    s1 = s.clone().requires_grad_()
    ours = fused_loss.kl_div_loss(s1, t, temperature=1.0, divergence="tvd")
    ours.backward()
    q, p = F.softmax(s.double(), -1), F.softmax(t.double(), -1)
    liger = (0.5 * (q - p).abs()).sum() / s.shape[0]
    dq = torch.where(q > p, 0.5, -0.5) / s.shape[0]
    d_logits = q * (dq - (q * dq).sum(-1, keepdim=True))
    assert relative_error(ours, liger) <= 1e-5 and relative_error(s1.grad, d_logits) <= 1e-5


def test_trl_itself_where_it_imports():
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")  # trl 1.16: experimental
    s, t, labels, _ = kl_ce_inputs((6,), 40)
    ours = fused_loss.kl_div_loss(s, t, temperature=2.0, mask=labels != -100, divergence="jsd", jsd_beta=0.4)
    theirs = gkd.GKDTrainer.generalized_jsd_loss(s[None].double(), t[None].double(), labels=labels[None], beta=0.4,
                                                 temperature=2.0)
    assert relative_error(ours / 4.0, theirs) <= 1e-5


def test_liger_itself_where_it_imports():
    """Liger-Kernel's own kernels (on CUDA; on CPU through the Triton interpreter, which the test session
    runs under): ``LigerJSD``, ``LigerTVDLoss`` and ``LigerFusedCETVDLoss`` (per-token CE and TVD, T = 1,
    unreduced; a row whose label is ignore_index gives 0 for both, so its TVD is our ``kl_mask = labels !=
    ignore_index``, and the batchmean is their sum over those rows) equal ours, values and gradients."""
    ops = pytest.importorskip("liger_kernel.ops")
    device = "cuda" if GPU_RUN else "cpu"
    s, t, labels, _ = kl_ce_inputs((6,), 4000 if GPU_RUN else 300, device=device)
    ours = fused_loss.kl_div_loss(s, t, temperature=1.0, divergence="jsd", jsd_beta=0.3)
    theirs = ops.LigerJSDFunction.apply(F.log_softmax(s, -1), F.log_softmax(t, -1), None, 0.3)
    assert relative_error(ours, theirs) <= 1e-4
    if GPU_RUN:  # its TVD kernel casts a Python float with .to(), which the interpreter cannot run
        ours = fused_loss.kl_div_loss(s, t, temperature=1.0, divergence="tvd")
        theirs = ops.LigerTVDLossFunction.apply(F.softmax(s, -1), F.softmax(t, -1), None, "batchmean")
        assert relative_error(ours, theirs) <= 1e-4

    rows = labels != -100
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    tvd, ce = fused_loss.kl_ce_loss(s1, t, labels, temperature=1.0, kl_mask=rows, divergence="tvd")
    their_ce, their_tvd = ops.LigerFusedCETVDFunction.apply(s2, t, labels, -100)
    their_tvd, their_ce = their_tvd.sum() / rows.sum(), their_ce.sum() / rows.sum()
    assert relative_error(tvd, their_tvd) <= 1e-5 and relative_error(ce, their_ce) <= 1e-5
    (tvd + ce).backward()
    (their_tvd + their_ce).backward()
    assert relative_error(s1.grad, s2.grad) <= 1e-5


# ----------------------------------------------------------------------------------------------
# sm_80 / sm_90 builds of every new specialisation (tests/aot.py): 0 spills, 128-bit main loops
# ----------------------------------------------------------------------------------------------
def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


@pytest.mark.skipif(GPU_RUN, reason="ahead-of-time builds are checked on the CPU machine")
def test_sm80_sm90_builds_have_128_bit_main_loops_and_no_spills():
    specs = []
    for divergence, param in DIVERGENCES[:1] + DIVERGENCES[2:]:  # one JSD: beta is a runtime argument
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            s, t, grad = (_meta(8192, 30522, dtype=dtype) for _ in range(3))
            labels, mask = _meta(8192, dtype=torch.int64), _meta(8192, dtype=torch.bool)
            coef, kl, ce = _meta(2), _meta(8192), _meta(8192)
            fwd = K.fwd_launch(s, t, labels, mask, coef, 2.0, -100, kl, ce, grad, divergence, param)
            bwd = K.bwd_launch(grad, kl, ce, s, t, labels, mask, coef, 2.0, -100, divergence, param)
            specs += [launch_spec(kernel, "distil.kernels.kl_ce", args, cc=cc, **options)
                      for kernel, (_, args, options) in ((K.kl_ce_fwd_kernel, fwd), (K.kl_ce_bwd_kernel, bwd))
                      for cc in (80, 90)]
    reports = compile_reports(specs)
    spilled = [(s["kernel"], s["constexprs"]["DIVERGENCE"], s["signature"]["s_ptr"], s["cc"], r["spill_stores"])
               for s, r in zip(specs, reports) if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, spilled
    for spec, report in zip(specs, reports):
        in_loop, _ = main_loop_widths(report)
        where = (spec["kernel"], spec["constexprs"]["DIVERGENCE"], spec["signature"]["s_ptr"], spec["cc"])
        assert in_loop and set(in_loop) == {128}, (where, in_loop)


# ----------------------------------------------------------------------------------------------
# The top-k teacher (distil::topk_kl_ce_rows, both kernels): what its OpInfo samples cannot say
# ----------------------------------------------------------------------------------------------
topk_rows = torch.ops.distil.topk_kl_ce_rows
topk_rows_backward = torch.ops.distil.topk_kl_ce_rows_backward
# "triton_chunked": the student row in chunks of 16 and the k entries in blocks of 4.
TOPK_CHUNKS = {"triton": {}, "triton_chunked": {"block_v": 16, "block_k": 4}}


def topk_sample(rows, vocab, k, exact, s_dtype=torch.float32, temperature=2.0, device="cpu"):
    """(t, (s, values, index, lse, labels, kl_mask)) with the teacher's k largest logits in a shuffled order."""
    s = (torch.randn(rows, vocab) * 3).to(s_dtype)
    t = torch.randn(rows, vocab) * 3
    values, index = t.topk(k, dim=-1)
    perm = torch.argsort(torch.rand(values.shape), dim=-1)
    values, index = values.gather(-1, perm), index.gather(-1, perm)
    lse = torch.logsumexp(t.double() / temperature, -1).float() if exact else None
    labels = torch.randint(0, vocab, (rows,))
    labels[::3] = -100
    mask = torch.rand(rows) < 0.8
    return t.to(device), tuple(None if x is None else x.to(device) for x in (s, values, index, lse, labels, mask))


def topk_forward(impl, args, coef, temperature, divergence, param, compute_grad=True):
    """(kl_rows, ce_rows, grad) of the C++ kernel ("cpu") or the Triton launcher into NaN-poisoned outputs."""
    if impl == "cpu":
        poison_heap(args[0], args[0][..., 0].float(), args[0][..., 0].float())
        return topk_rows(*args, coef, temperature, -100, compute_grad, divergence, param)
    s = args[0]
    kl, ce = nan_empty(s.shape[:-1], torch.float32, s.device), nan_empty(s.shape[:-1], torch.float32, s.device)
    grad = nan_empty(s.shape, s.dtype, s.device) if compute_grad else None
    topk_kernels.topk_kl_ce_rows(*args, coef, temperature, -100, kl, ce, grad, divergence, param,
                                 **TOPK_CHUNKS[impl])
    return kl, ce, grad


def topk_expected(args, temperature, divergence, param, g_kl, g_ce):
    s, values, index, lse, labels, mask = (None if x is None else x.cpu() for x in args)
    sd = s.detach().double().requires_grad_()
    kl, ce = reference.topk_divergence_rows(sd, values.double(), index, None if lse is None else lse.double(), labels,
                                            mask, temperature, divergence, param)
    (kl * torch.as_tensor(g_kl).cpu() + ce * torch.as_tensor(g_ce).cpu()).sum().backward()
    return kl.detach(), ce.detach(), sd.grad


@pytest.mark.parametrize("impl", ["cpu", "triton"])
@pytest.mark.parametrize("exact", [False, True], ids=["renorm", "exact"])
@pytest.mark.parametrize("temperature", [0.5, 2.0, 8.0])
@pytest.mark.parametrize("divergence,param", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_topk_at_k_equal_v_is_the_dense_divergence(triton_device, divergence, param, temperature, exact, impl):
    t, args = topk_sample(5, 300, 300, exact, temperature=temperature, device=impl_device(impl, triton_device))
    s, labels, mask = args[0], args[4], args[5]
    coef = torch.tensor([0.7, 1.3], device=s.device)
    kl, ce, grad = topk_forward(impl, args, coef, temperature, divergence, param)
    dense_kl, dense_ce, dense_grad = kl_ce_rows(s, t, labels, mask, coef, temperature, -100, True, divergence, param)
    assert relative_error(kl, dense_kl) <= 1e-5 and relative_error(ce, dense_ce) <= 1e-5
    assert relative_error(grad, dense_grad) <= 1e-5


@pytest.mark.parametrize("impl", KL_CE.impls)
@pytest.mark.parametrize("exact", [False, True], ids=["renorm", "exact"])
@pytest.mark.parametrize("divergence,param", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_topk_inf_and_nan_rows(triton_device, divergence, param, exact, impl):
    """A row -inf everywhere (student; teacher) has loss 0 and gradient 0; a NaN in the student row, a teacher
    value or the lse gives NaN; a -inf among the k on one side only is the definition's (finite but the
    reverse KL where the teacher's is 0)."""
    _, (s, values, index, lse, labels, mask) = topk_sample(7, 30, 6, exact)
    s[0] = NEG_INF
    values[1] = NEG_INF
    if lse is not None:
        lse[1] = NEG_INF
        lse[6] = float("nan")
    else:
        values[6, 1] = float("nan")
    s[2, 5] = float("nan")
    values[4, 2] = NEG_INF  # a teacher probability 0 among the k
    s[5, index[5, 3]] = NEG_INF  # a student probability 0 at an index
    labels, mask = torch.full((7,), -100), None
    args = tuple(None if x is None else x.to(impl_device(impl, triton_device))
                 for x in (s, values, index, lse, labels, mask))
    kl, _, grad = topk_forward(impl, args, torch.tensor([1.0, 0.0], device=args[0].device), 2.0, divergence, param)
    kl, grad = kl.cpu(), grad.cpu()
    assert kl[0] == 0 and kl[1] == 0 and (grad[:2] == 0).all()
    assert kl[2].isnan() and grad[2].isnan().any() and kl[6].isnan() and grad[6].isnan().any()
    ref_kl, _, ref_grad = topk_expected(args, 2.0, divergence, param, 1.0, 0.0)
    finite = [3, 5] if divergence == "reverse_kl" else [3, 4, 5]
    if divergence == "reverse_kl":
        assert kl[4] == float("inf")
    assert torch.isfinite(kl[finite]).all() and torch.isfinite(grad[finite]).all()
    assert relative_error(kl[finite], ref_kl[finite]) <= 1e-5 and relative_error(grad[finite], ref_grad[finite]) <= 1e-5


@pytest.mark.parametrize("impl", ["triton", "triton_chunked"])
@pytest.mark.parametrize("exact", [False, True], ids=["renorm", "exact"])
@pytest.mark.parametrize("divergence,param", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_topk_triton_matches_the_cpp_kernel(triton_device, divergence, param, exact, impl):
    """The same definition on both kernels (csrc/topk_kl_ce.cpp is the reference): loss, gradient, and which
    entries are NaN or infinite, on rows with -inf and NaN entries, bf16 teacher values and a [B, S, V] layout."""
    _, (s, values, index, lse, labels, mask) = topk_sample(12, 53, 9, exact, temperature=1.5)
    values = values.bfloat16()
    values[0, :3] = NEG_INF
    s[1, index[1, :2]] = NEG_INF
    s[2, 7] = float("nan")
    values[3] = NEG_INF
    args = tuple(None if x is None else x.reshape(3, 4, *x.shape[1:]) for x in (s, values, index, lse, labels, mask))
    coef = torch.tensor([0.6, 1.7])
    cpp = topk_forward("cpu", args, coef, 1.5, divergence, param)
    dev = tuple(None if x is None else x.to(impl_device(impl, triton_device)) for x in args)
    ours = topk_forward(impl, dev, coef.to(dev[0].device), 1.5, divergence, param)
    for a, b in zip(ours, cpp):
        a = a.cpu()
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
        both = torch.isfinite(b)
        assert relative_error(a[both], b[both]) <= 1e-5


@pytest.mark.parametrize("divergence,param", [("jsd", 1e-4), ("jsd", 1 - 1e-4), ("skew_kl", 1e-4),
                                              ("skew_kl", 0.99), ("skew_reverse_kl", 1e-4),
                                              ("skew_reverse_kl", 0.99)])
@pytest.mark.parametrize("exact", [False, True], ids=["renorm", "exact"])
@pytest.mark.parametrize("impl", ["cpu", "triton"])
def test_topk_parameters_near_their_limits(triton_device, impl, exact, divergence, param):
    """As test_parameters_near_their_limits, on the buckets."""
    _, args = topk_sample(6, 37, 8, exact, device=impl_device(impl, triton_device))
    coef = torch.tensor([1.0, 0.0], device=args[0].device)
    kl, _, grad = topk_forward(impl, args, coef, 2.0, divergence, param)
    ref_kl, _, ref_grad = topk_expected(args, 2.0, divergence, param, 1.0, 0.0)
    tol = 3e-6 / min(param, 1 - param)
    assert relative_error(kl, ref_kl) <= tol and relative_error(grad, ref_grad) <= tol


@pytest.mark.skipif(GPU_RUN, reason="ahead-of-time builds are checked on the CPU machine")
def test_topk_sm80_sm90_builds_have_128_bit_main_loops_and_no_spills():
    """Every divergence of the top-k kernel in both modes, fp32 and 16-bit students (fp16 builds as bf16 does),
    under its register cap: 0 spills, and the student row and its gradient through 128-bit main loops."""
    specs = []
    for divergence, param in DIVERGENCES[:1] + DIVERGENCES[2:]:  # one JSD: beta is a runtime argument
        for dtype, exact in itertools.product((torch.float32, torch.bfloat16), (False, True)):
            s, grad = _meta(8192, 30522, dtype=dtype), _meta(8192, 30522, dtype=dtype)
            values, index = _meta(8192, 64, dtype=torch.float16), _meta(8192, 64, dtype=torch.int32)
            lse = _meta(8192) if exact else None
            labels, mask = _meta(8192, dtype=torch.int64), _meta(8192, dtype=torch.bool)
            coef, kl, ce = _meta(2), _meta(8192), _meta(8192)
            fwd = topk_kernels.fwd_launch(s, values, index, lse, labels, mask, coef, 2.0, -100, kl, ce, grad,
                                          divergence, param)
            bwd = topk_kernels.bwd_launch(grad, kl, ce, s, values, index, lse, labels, mask, coef, 2.0, -100,
                                          divergence, param)
            specs += [launch_spec(kernel, "distil.kernels.topk_kl_ce", args, cc=cc, **options)
                      for kernel, (_, args, options) in ((topk_kernels.topk_kl_ce_fwd_kernel, fwd),
                                                         (topk_kernels.topk_kl_ce_bwd_kernel, bwd))
                      for cc in (80, 90)]
    reports = compile_reports(specs)
    for spec, report in zip(specs, reports):
        where = (spec["kernel"], spec["constexprs"]["DIVERGENCE"], spec["constexprs"]["EXACT"],
                 spec["signature"]["s_ptr"], spec["cc"])
        assert report["spill_stores"] == report["spill_loads"] == 0, (where, report["spill_stores"])
        in_loop, _ = main_loop_widths(report)
        assert in_loop and set(in_loop) == {128}, (where, in_loop)


@pytest.mark.parametrize("public,plain", [({"divergence": "jsd", "jsd_beta": 0.0}, "forward_kl"),
                                          ({"divergence": "jsd", "jsd_beta": 1.0}, "reverse_kl"),
                                          ({"divergence": "skew_kl", "skew_alpha": 0.0}, "forward_kl")])
def test_topk_loss_takes_the_divergence_arguments(public, plain):
    _, (s, values, index, lse, labels, _) = topk_sample(4, 30, 6, True)
    ours = fused_loss.topk_kl_ce_loss(s, values, index, labels, teacher_lse=lse, **public)
    assert torch.equal(torch.stack(ours), torch.stack(fused_loss.topk_kl_ce_loss(
        s, values, index, labels, teacher_lse=lse, divergence=plain)))
    with pytest.raises(ValueError, match="jsd_beta"):
        fused_loss.topk_kl_ce_loss(s, values, index, labels, divergence="tvd", jsd_beta=0.2)
