"""distil::kl_ce_rows beyond the generic families of tests/test_ops.py (samples in tests/opinfo.py): a -inf
student under a finite teacher, large vocabularies, int64 row offsets, the caller-buffer entry
kl_ce_rows_into, the C++ backward's branches row by row, the op entries' checks; then the public
kl_div_loss / kl_ce_loss against distiller.py."""
import pytest
import torch

from distil import fused_loss, reference
from distil._ops.common import loss_coef
from distil.kernels import kl_ce as K

from helpers import API_DEVICES, GPU_RUN, TOL, RecordOps, nan_empty, relative_error, rows_past_int32
from opinfo import KL_CE, impl_device, kl_ce_sample, kl_ce_samples
from opinfo import expected as op_expected
from opinfo import forward as op_forward
from opinfo import kl_ce_inputs as make_inputs

NEG_INF = float("-inf")
kl_ce_rows = torch.ops.distil.kl_ce_rows
kl_ce_rows_backward = torch.ops.distil.kl_ce_rows_backward
SAMPLE_NAMES = [x.name for x in kl_ce_samples()]


def forward(impl, sample, coef):
    return op_forward(KL_CE, impl, sample, coef)


def expected(sample, g_kl, g_ce):
    """float64 per-row (kl, ce) and the gradient of sum(g_kl * kl + g_ce * ce) w.r.t. the student."""
    (kl, ce), grad = op_expected(KL_CE, sample, (g_kl, g_ce))
    return kl, ce, grad


# ----------------------------------------------------------------------------------------------
# Kernel-specific cases
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["cpu", "triton"])
def test_student_neg_inf_where_the_teacher_is_not_gives_inf(triton_device, impl):
    """KL = +inf, as in PyTorch, with a finite gradient."""
    sample = kl_ce_samples(impl_device(impl, triton_device))[SAMPLE_NAMES.index("-inf policy")]
    sample.student[5, 30] = NEG_INF
    kl, ce, grad = forward(impl, sample, torch.tensor([0.5, 2.0], device=sample.student.device))
    assert kl[5] == float("inf") and torch.isfinite(grad).all() and torch.isfinite(ce).all()


@pytest.mark.parametrize("vocab", [50257, 131073])
def test_triton_large_vocabularies(triton_device, vocab):
    s, t, labels, mask = make_inputs((2,), vocab, torch.bfloat16, torch.float32, triton_device, label_frac=1.0)
    sample = kl_ce_sample("large", s, t, labels, mask)
    kl, ce, grad = forward("triton", sample, torch.tensor([0.5, 2.0], device=triton_device))
    ref_kl, ref_ce, ref_grad = expected(sample, 0.5, 2.0)
    assert relative_error(kl, ref_kl) <= 1e-2 and relative_error(ce, ref_ce) <= 1e-2
    assert relative_error(grad, ref_grad) <= 1e-2


def test_triton_int64_row_offsets(triton_device):
    """Row 1 starts past element 2**31 (int64 offsets)."""
    s = rows_past_int32(64, torch.bfloat16, triton_device)
    sample = kl_ce_sample("past 2**31", s, torch.randn(2, 64, device=triton_device),
                          torch.tensor([3, 60], device=triton_device), None)
    kl, ce, grad = forward("triton", sample, torch.tensor([1.0, 1.0], device=triton_device))
    ref_kl, ref_ce, ref_grad = expected(sample, 1.0, 1.0)
    assert relative_error(kl, ref_kl) <= 1e-2 and relative_error(ce, ref_ce) <= 1e-2
    assert relative_error(grad, ref_grad) <= 1e-2


def test_triton_writes_row_slices_of_caller_buffers(triton_device):
    """The launcher writes into slices of preallocated outputs, as a caller producing the logits in row
    chunks (the fused LM-head loss) does; nothing outside the slice is touched."""
    s, t, labels, mask = make_inputs((6,), 40, device=triton_device)
    coef = torch.tensor([0.7, 1.3], device=triton_device)
    kl, ce = nan_empty((6,), torch.float32, triton_device), nan_empty((6,), torch.float32, triton_device)
    grad = nan_empty((6, 40), torch.float32, triton_device)
    for lo, hi in ((0, 4), (4, 6)):
        K.kl_ce_rows(s[lo:hi], t[lo:hi], labels[lo:hi], mask[lo:hi], coef, 2.0, -100, kl[lo:hi], ce[lo:hi],
                     grad[lo:hi])
    ref_kl, ref_ce, ref_grad = expected(kl_ce_sample("", s, t, labels, mask), 0.7, 1.3)
    assert relative_error(kl, ref_kl) <= 1e-5 and relative_error(ce, ref_ce) <= 1e-5
    assert relative_error(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("impl", ["cpu", "triton", "triton_chunked"])
@pytest.mark.parametrize("index", [0, 1, 2, 3, 5, 6, 8, 9], ids=lambda i: SAMPLE_NAMES[i])
def test_into_writes_the_callers_buffers_and_may_overwrite_the_student(triton_device, impl, index):
    """kl_ce_rows_into (C++ op on CPU; its CUDA entry is the Triton launcher) equals kl_ce_rows, also with
    grad = the student itself, as the fused LM-head loss calls it (one [rows, V] buffer per chunk)."""
    sample = kl_ce_samples(impl_device(impl, triton_device))[index]
    coef = torch.tensor([0.7, 1.3], device=sample.student.device)
    s = sample.student.contiguous()
    sample = sample.replace_student(s)
    want = forward(impl, sample, coef)
    _, t, labels, kl_mask = sample.args
    rows = s.shape[:-1]
    for aliased in (False, True):
        kl, ce = nan_empty(rows, torch.float32, s.device), nan_empty(rows, torch.float32, s.device)
        student = s.clone()
        grad = student if aliased else nan_empty(s.shape, s.dtype, s.device)
        args = (student, t, None if labels is None else labels.contiguous(),
                None if kl_mask is None else kl_mask.contiguous(), coef, *sample.scalars, kl, ce, grad)
        if impl == "cpu":
            torch.ops.distil.kl_ce_rows_into(*args)
        else:
            K.kl_ce_rows(*args, **(KL_CE.chunked(sample) if impl == "triton_chunked" else {}))
        for got, ref in zip((kl, ce, grad), want):
            torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)


def test_into_opcheck():
    sample = kl_ce_samples()[1]
    s = sample.student.contiguous()
    rows = s.shape[:-1]
    args = (s, *sample.args[1:], torch.tensor([0.5, 0.5]), *sample.scalars, torch.empty(rows), torch.empty(rows))
    torch.library.opcheck(torch.ops.distil.kl_ce_rows_into.default, (*args, torch.empty_like(s)))
    torch.library.opcheck(torch.ops.distil.kl_ce_rows_into.default, (*args, None))


def test_cpu_forward_many_rows_across_threads():
    # 32K logits per task at V=7: several parallel_for tasks, each with several rows.
    s, t, labels, mask = make_inputs((12000,), 7)
    sample = kl_ce_sample("many rows", s, t, labels, mask)
    kl, ce, grad = forward("cpu", sample, torch.tensor([0.7, 1.3]))
    ref_kl, ref_ce, ref_grad = expected(sample, 0.7, 1.3)
    assert relative_error(kl, ref_kl) <= 1e-5 and relative_error(ce, ref_ce) <= 1e-5
    assert relative_error(grad, ref_grad) <= 1e-5




def cpu_reference(s, t, labels, mask, temperature, w_kl, w_ce):
    *_, grad = expected(kl_ce_sample("", s, t, labels, mask, temperature), w_kl, w_ce)
    return None, None, grad


# Backward: the forward's grad is turned into Σ g_kl·dKL + g_ce·dCE in place.  The student passed to
# the backward differs from the forward's, so a row that was scaled keeps the forward's gradient shape
# while a recomputed row follows the new student: this pins down which branch each row took.
def backward_case(s_dtype=torch.float32, coef=(0.25, 4.0), shape=(10,), vocab=33):
    s, t, labels, mask = make_inputs(shape, vocab, s_dtype, label_frac=0.6)
    _, _, grad = kl_ce_rows(s, t, labels, mask, torch.tensor(coef), 2.0, -100, True)
    s_new = (s.float() + torch.randn(s.shape)).to(s_dtype)
    return s, s_new, t, labels, mask, grad


@pytest.mark.parametrize("s_dtype", [torch.float32, torch.bfloat16])
def test_cpu_backward_unit_factor_leaves_grad_untouched(s_dtype):
    s, s_new, t, labels, mask, grad = backward_case(s_dtype)
    before = grad.clone()
    g_kl, g_ce = torch.tensor(0.25).expand(10), torch.tensor(4.0).expand(10)
    kl_ce_rows_backward(grad, g_kl, g_ce, s_new, t, labels, mask, torch.tensor([0.25, 4.0]), 2.0, -100)
    assert torch.equal(grad, before)


@pytest.mark.parametrize("s_dtype", [torch.float32, torch.float16])
def test_cpu_backward_proportional_rows_scale(s_dtype):
    s, s_new, t, labels, mask, grad = backward_case(s_dtype)
    ratio = torch.rand(10) + 0.5  # per row: g = ratio · coef
    g_kl, g_ce = 0.25 * ratio, 4.0 * ratio
    kl_ce_rows_backward(grad, g_kl, g_ce, s_new, t, labels, mask, torch.tensor([0.25, 4.0]), 2.0, -100)
    *_, ref = cpu_reference(s, t, labels, mask, 2.0, g_kl.double(), g_ce.double())
    assert relative_error(grad, ref) <= TOL[s_dtype]


def test_cpu_backward_single_term_rows_scale_by_their_own_ratio():
    s, s_new, t, labels, mask, grad = backward_case()
    labels[:5] = -100  # rows 0-4: KL only (where masked)
    mask[5:] = False  # rows 5-9: CE only (where labelled)
    _, _, grad = kl_ce_rows(s, t, labels, mask, torch.tensor([0.25, 4.0]), 2.0, -100, True)
    g_kl, g_ce = torch.rand(10) + 0.1, torch.rand(10) + 0.1  # not proportional to coef, yet one term per row
    kl_ce_rows_backward(grad, g_kl, g_ce, s_new, t, labels, mask, torch.tensor([0.25, 4.0]), 2.0, -100)
    *_, ref = cpu_reference(s, t, labels, mask, 2.0, g_kl.double(), g_ce.double())
    assert relative_error(grad, ref) <= 1e-5


@pytest.mark.parametrize("s_dtype", [torch.float32, torch.bfloat16])
def test_cpu_backward_recomputes_other_rows(s_dtype):
    s, s_new, t, labels, mask, grad = backward_case(s_dtype, shape=(2, 5))
    # Factors within [1/2, 2] of coef, which a 16-bit buffer may be rescaled by (farther: recomputed).
    g_kl, g_ce = 0.25 * (torch.rand(2, 5) + 0.6), 4.0 * (torch.rand(2, 5) + 0.6)
    g_kl[0, 0], g_ce[0, 0] = 0.25 * 1.5, 4.0 * 1.5  # one proportional row stays a scale of the old gradient
    kl_ce_rows_backward(grad, g_kl, g_ce, s_new, t, labels, mask, torch.tensor([0.25, 4.0]), 2.0, -100)
    both = mask & (labels != -100)
    assert both.sum() >= 2
    *_, ref_new = cpu_reference(s_new, t, labels, mask, 2.0, g_kl.double(), g_ce.double())
    *_, ref_old = cpu_reference(s, t, labels, mask, 2.0, g_kl.double(), g_ce.double())
    ref = torch.where(both[..., None], ref_new, ref_old)  # single-term rows are scaled
    ref[0, 0] = ref_old[0, 0]
    assert relative_error(grad, ref) <= TOL[s_dtype]


def test_cpu_backward_zero_coef_with_nonzero_gradient_recomputes():
    s, s_new, t, labels, mask, grad = backward_case(coef=(0.0, 1.0))
    mask[:] = True
    _, _, grad = kl_ce_rows(s, t, labels, mask, torch.tensor([0.0, 1.0]), 2.0, -100, True)
    g_kl, g_ce = torch.tensor(0.5).expand(10), torch.tensor(1.0).expand(10)
    kl_ce_rows_backward(grad, g_kl, g_ce, s_new, t, labels, mask, torch.tensor([0.0, 1.0]), 2.0, -100)
    *_, ref = cpu_reference(s_new, t, labels, mask, 2.0, 0.5, 1.0)
    assert relative_error(grad, ref) <= 1e-5


def test_cpu_backward_3d_expanded_gradients():
    B, S, V = 2, 4, 21
    s = torch.randn(B, S, V + 5)[..., :V]
    t = torch.randn(B, S, V)
    labels = torch.randint(0, V, (B, S))
    mask = torch.rand(B, S) < 0.8
    _, _, grad = kl_ce_rows(s, t, labels, mask, torch.tensor([0.5, 0.5]), 2.0, -100, True)
    g_kl = torch.rand(S).expand(B, S)  # stride-0 batch dim, not proportional to coef
    g_ce = torch.tensor(0.3).expand(B, S)
    kl_ce_rows_backward(grad, g_kl, g_ce, s, t, labels, mask, torch.tensor([0.5, 0.5]), 2.0, -100)
    *_, ref = cpu_reference(s, t, labels, mask, 2.0, g_kl.double(), g_ce.double())
    assert relative_error(grad, ref) <= 1e-5


def test_cpu_op_arguments_name_the_argument():
    s, t, labels, mask = make_inputs((4,), 6)
    coef = torch.tensor([1.0, 1.0])
    cases = [
        (TypeError, "student", (s.double(), t, labels, mask, coef, 2.0)),
        (TypeError, "teacher", (s, t.int(), labels, mask, coef, 2.0)),
        (ValueError, "teacher", (s, t[:3], labels, mask, coef, 2.0)),
        (ValueError, "student", (s[:, ::2], t[:, ::2], labels, mask, coef, 2.0)),
        (ValueError, "student", (s[0], t[0], labels, mask, coef, 2.0)),
        (TypeError, "labels", (s, t, labels.int(), mask, coef, 2.0)),
        (ValueError, "kl_mask", (s, t, labels, mask[:3], coef, 2.0)),
        (TypeError, "kl_mask", (s, t, labels, mask.float(), coef, 2.0)),
        (ValueError, "coef", (s, t, labels, mask, torch.ones(3), 2.0)),
        (TypeError, "coef", (s, t, labels, mask, coef.double(), 2.0)),
        (ValueError, "temperature", (s, t, labels, mask, coef, 0.0)),
        (ValueError, "label", (s, t, torch.full((4,), 6), mask, coef, 2.0)),
    ]
    for exc, name, args in cases:
        with pytest.raises(exc, match=name):
            kl_ce_rows(*args, -100, True)
    _, _, grad = kl_ce_rows(s, t, labels, mask, coef, 2.0, -100, True)
    g = torch.ones(4)
    with pytest.raises(TypeError, match="grad"):
        kl_ce_rows_backward(grad.half(), g, g, s, t, labels, mask, coef, 2.0, -100)
    with pytest.raises(ValueError, match="grad"):
        kl_ce_rows_backward(grad.t(), g, g, s, t, labels, mask, coef, 2.0, -100)
    with pytest.raises(ValueError, match="grad_ce_rows"):
        kl_ce_rows_backward(grad, g, g[:2], s, t, labels, mask, coef, 2.0, -100)


def distiller_losses(s, t, labels, mask, temperature):
    """distiller.py's (kl, mlm) in float64: KL on the mask rows (all rows without one), CE(ignore -100)."""
    s, t = s.double(), t.double()
    rows = torch.ones(s.shape[:-1], dtype=torch.bool, device=s.device) if mask is None else mask
    kl = reference.distiller_kl(reference.select_rows(s, rows), reference.select_rows(t, rows), temperature)
    return kl, reference.distiller_mlm(s, labels)


# ----------------------------------------------------------------------------------------------
# Public API (CPU C++ kernel here; CUDA Triton kernel on a GPU run)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", API_DEVICES)
@pytest.mark.parametrize("three_d", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_mask", [False, True])
def test_kl_ce_loss_matches_distiller(device, three_d, dtype, use_mask):
    s, t, labels, mask = make_inputs((2, 4) if three_d else (8,), 301, dtype, dtype, device, pad=5)
    s.requires_grad_()
    kl, ce = fused_loss.kl_ce_loss(s, t, labels, temperature=2.0, kl_mask=mask if use_mask else None,
                                   kl_weight=5.0, ce_weight=2.0)
    (5.0 * kl + 2.0 * ce).backward()
    sd = s.detach().double().requires_grad_()
    ref_kl, ref_ce = distiller_losses(sd, t, labels, mask if use_mask else None, 2.0)
    (5.0 * ref_kl + 2.0 * ref_ce).backward()
    assert kl.dtype == torch.float32 and kl.dim() == 0
    assert relative_error(kl, ref_kl) <= TOL[dtype]
    assert relative_error(ce, ref_ce) <= TOL[dtype]
    assert relative_error(s.grad, sd.grad) <= TOL[dtype]
    assert t.grad is None


@pytest.mark.parametrize("device", API_DEVICES)
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.3, -2.0), (0.0, 1.0)])
def test_kl_ce_loss_any_combination_is_exact(device, weights):
    s, t, labels, mask = make_inputs((6,), 50, device=device)
    s.requires_grad_()
    kl, ce = fused_loss.kl_ce_loss(s, t, labels, kl_mask=mask, kl_weight=5.0, ce_weight=2.0)
    (weights[0] * kl + weights[1] * ce).backward()
    sd = s.detach().double().requires_grad_()
    ref_kl, ref_ce = distiller_losses(sd, t, labels, mask, 2.0)
    (weights[0] * ref_kl + weights[1] * ref_ce).backward()
    assert relative_error(s.grad, sd.grad) <= 1e-5


@pytest.mark.parametrize("device", API_DEVICES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_kl_div_loss_reductions(device, reduction):
    s, t, _, mask = make_inputs((2, 3), 33, torch.float16, torch.float32, device)
    s.requires_grad_()
    out = fused_loss.kl_div_loss(s, t, temperature=3.0, mask=mask, reduction=reduction)
    sd = s.detach().double().requires_grad_()
    rows, _ = reference.kl_ce_rows(sd, t.double(), None, mask, 3.0)
    ref = {"batchmean": rows.sum() / mask.sum(), "sum": rows.sum(), "none": rows}[reduction]
    weights = torch.rand(ref.shape, device=device, dtype=torch.float64)  # non-uniform g for "none"
    (out * weights.float()).sum().backward()
    (ref * weights).sum().backward()
    assert out.shape == ref.shape
    assert relative_error(out, ref) <= 1e-2
    assert relative_error(s.grad, sd.grad) <= 1e-2


@pytest.mark.parametrize("device", API_DEVICES)
def test_no_selected_rows_gives_exact_zeros(device):
    s, t, _, _ = make_inputs((4,), 20, device=device)
    s.requires_grad_()
    labels = torch.full((4,), -100, device=device)
    none = torch.zeros(4, dtype=torch.bool, device=device)
    kl, ce = fused_loss.kl_ce_loss(s, t, labels, kl_mask=none)
    (kl + ce).backward()
    assert kl.item() == 0.0 and ce.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))
    empty = torch.randn(0, 20, device=device, requires_grad=True)
    kl = fused_loss.kl_div_loss(empty, torch.randn(0, 20, device=device))
    kl.backward()
    assert kl.item() == 0.0 and empty.grad.shape == (0, 20)


@pytest.mark.parametrize("device", API_DEVICES)
def test_forward_buffer_becomes_the_gradient_without_a_copy(device):
    """The gradient written in the forward is what lands in .grad (AccumulateGrad steals it): no
    second [N, V] buffer, no copy pass."""
    s, t, labels, _ = make_inputs((4,), 20, device=device)
    s.requires_grad_()
    kl, ce, grad = torch.ops.distil.kl_ce_rows(s, t, labels, None, torch.ones(2, device=device), 2.0, -100, True)
    buffer = grad.data_ptr()
    del grad
    (kl.sum() + ce.sum()).backward()
    assert s.grad.data_ptr() == buffer


@pytest.mark.parametrize("device", API_DEVICES)
@pytest.mark.parametrize("use_mask", [False, True])
def test_backward_of_the_announced_combination_is_free(device, use_mask):
    """For kl_weight * kl + ce_weight * ce, .grad is bit for bit the buffer the forward wrote: the
    coef matches autograd's per-row gradients exactly, so the backward rewrites nothing."""
    s, t, labels, mask = make_inputs((64,), 33, device=device)
    mask = mask if use_mask else None
    s.requires_grad_()
    kl, ce = fused_loss.kl_ce_loss(s, t, labels, kl_mask=mask, kl_weight=5.0, ce_weight=2.0)
    (5.0 * kl + 2.0 * ce).backward()
    kl_count = 64 if mask is None else mask.sum()
    coef = loss_coef(5.0, kl_count, 2.0, (labels != -100).sum(), device)
    _, _, forward_grad = torch.ops.distil.kl_ce_rows(s.detach(), t, labels, mask, coef, 2.0, -100, True)
    assert torch.equal(s.grad, forward_grad)


def test_second_backward_raises():
    s, t, labels, _ = make_inputs((4,), 20)
    s.requires_grad_()
    kl, ce = fused_loss.kl_ce_loss(s, t, labels)
    loss = kl + ce
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated once"):
        loss.backward()


@pytest.mark.skipif(not GPU_RUN, reason="the CUDA entry of the op runs on a GPU")
def test_cuda_op_entry_checks_what_the_kernel_assumes():
    """Direct torch.ops calls skip the public functions; the Triton path's entry checks in Python."""
    s, t, labels, mask = make_inputs((3,), 5, device="cuda")
    coef = torch.ones(2, device="cuda")
    bad = [(s, t[:, :4], labels, mask, coef), (s.t().contiguous().t(), t, labels, mask, coef),
           (s, t, labels.int(), mask, coef), (s, t, labels, mask.int(), coef), (s, t, labels, mask, coef[:1])]
    for args in bad:
        with pytest.raises(ValueError, match="kl_ce_rows"):
            kl_ce_rows(*args, 2.0, -100, True)


def test_no_grad_skips_the_gradient():
    """Under no_grad the op is asked for no gradient and writes none (an empty buffer)."""
    s, t, labels, _ = make_inputs((4,), 20)
    s.requires_grad_()
    with torch.no_grad(), RecordOps() as ops:
        kl, ce = fused_loss.kl_ce_loss(s, t, labels)
    ((args, out),) = ops.of(kl_ce_rows.default)
    assert args[7] is False and out[2].numel() == 0
    ref_kl, ref_ce = distiller_losses(s.detach(), t, labels, None, 2.0)
    assert relative_error(kl, ref_kl) <= 1e-5 and relative_error(ce, ref_ce) <= 1e-5
    assert kl.grad_fn is None and ce.grad_fn is None


def test_bad_inputs_name_the_argument():
    s, t, labels, mask = make_inputs((4,), 10)
    with pytest.raises(ValueError, match="teacher_logits"):
        fused_loss.kl_ce_loss(s, t[:, :9], labels)
    with pytest.raises(TypeError, match="student_logits"):
        fused_loss.kl_div_loss(s.long(), t)
    with pytest.raises(ValueError, match="student_logits"):
        fused_loss.kl_div_loss(s[0], t[0])
    with pytest.raises(ValueError, match="temperature"):
        fused_loss.kl_div_loss(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        fused_loss.kl_div_loss(s, t, temperature=float("nan"))
    with pytest.raises(TypeError, match="mask"):
        fused_loss.kl_div_loss(s, t, mask=mask.float())  # integer masks are accepted, float ones not
    with pytest.raises(ValueError, match="mask"):
        fused_loss.kl_div_loss(s, t, mask=mask[:3])
    with pytest.raises(ValueError, match="labels"):
        fused_loss.kl_ce_loss(s, t, torch.full((4,), 10))
    with pytest.raises(ValueError, match="labels"):
        fused_loss.kl_ce_loss(s, t, labels[:2])
    with pytest.raises(TypeError, match="labels"):
        fused_loss.kl_ce_loss(s, t, labels.float())
    with pytest.raises(ValueError, match="reduction"):
        fused_loss.kl_div_loss(s, t, reduction="mean")
    with pytest.raises(ValueError, match="kl_weight"):
        fused_loss.kl_ce_loss(s, t, labels, kl_weight=-1.0)
    with pytest.raises(ValueError, match="contiguous"):
        fused_loss.kl_div_loss(s.t().contiguous().t(), t)
