"""The C++ CPU kernels of distil::kl_ce_rows / kl_ce_rows_backward (csrc/kl_ce_cpu.cpp), called
directly through torch.ops on CPU tensors and checked against float64 PyTorch references."""
import pytest
import torch
import torch.nn.functional as F
from conftest import relative_error

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
NEG_INF = float("-inf")
kl_ce_rows = torch.ops.distil.kl_ce_rows
kl_ce_rows_backward = torch.ops.distil.kl_ce_rows_backward


def reference(s, t, labels, mask, temperature, w_kl, w_ce, ignore_index=-100):
    """float64 per-row ``T²·nn.KLDivLoss(reduction="none")(log_softmax(s/T), softmax(t/T)).sum(-1)`` (terms
    with q = 0 taken as 0, i.e. xlogy) and ``F.cross_entropy(s, y, reduction="none")``, with the -inf
    policy (rows -inf everywhere give 0), and d(Σ w_kl·kl + w_ce·ce)/ds by autograd."""
    s_dead, t_dead = s.isneginf().all(-1), t.isneginf().all(-1)
    # Dead rows are replaced by zeros so that autograd through them stays finite; they are masked below.
    s = torch.where(s_dead[..., None], 0.0, s.double()).requires_grad_()
    t = torch.where(t_dead[..., None], 0.0, t.double())
    log_p, q = F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1)
    kl = torch.where(q > 0, q * (q.log() - log_p), 0.0).sum(-1) * temperature**2
    kl_on = ~s_dead & ~t_dead
    if mask is not None:
        kl_on &= mask
    kl = torch.where(kl_on, kl, 0.0)
    if labels is None:
        ce = torch.zeros_like(kl)
    else:
        flat = F.cross_entropy(s.flatten(0, -2), labels.flatten(), ignore_index=ignore_index, reduction="none")
        ce = torch.where(s_dead, 0.0, flat.view(kl.shape))
    (w_kl * kl + w_ce * ce).sum().backward()
    return kl.detach(), ce.detach(), s.grad


def poison_heap(*like):
    """Allocate and free NaN tensors the size of the op's outputs, so that an output the kernel fails to
    write reads back as NaN rather than as a lucky zero."""
    for x in like:
        torch.full((max(x.numel(), 1),), float("nan"), dtype=x.dtype)


def make_inputs(shape, vocab, s_dtype=torch.float32, t_dtype=torch.float32, scale=3.0):
    s = (torch.randn(*shape, vocab) * scale).to(s_dtype)
    t = (torch.randn(*shape, vocab) * scale).to(t_dtype)
    labels = torch.randint(0, max(vocab, 1), shape)
    labels[torch.rand(shape) < 0.4] = -100
    mask = torch.rand(shape) < 0.7
    return s, t, labels, mask


def check_forward(s, t, labels, mask, temperature, coef=(0.7, 1.3), ignore_index=-100):
    """Runs the forward op and checks rows and gradient against the float64 reference; returns grad."""
    poison_heap(s, s[..., 0].float(), s[..., 0].float())
    kl, ce, grad = kl_ce_rows(s, t, labels, mask, torch.tensor(coef), temperature, ignore_index, True)
    ref_kl, ref_ce, ref_grad = reference(s, t, labels, mask, temperature, coef[0], coef[1], ignore_index)
    assert kl.dtype == ce.dtype == torch.float32 and kl.shape == ce.shape == s.shape[:-1]
    assert grad.dtype == s.dtype and grad.shape == s.shape and grad.is_contiguous()
    assert relative_error(kl, ref_kl) <= 1e-5
    assert relative_error(ce, ref_ce) <= 1e-5
    assert relative_error(grad, ref_grad) <= TOL[s.dtype]
    # Rows with neither term are exact zeros.
    no_kl = torch.zeros(kl.shape, dtype=torch.bool) if mask is None else ~mask
    off = no_kl if labels is None else no_kl & (labels == ignore_index)
    assert (kl[no_kl] == 0).all() and (grad[off] == 0).all()
    if labels is not None:
        assert (ce[labels == ignore_index] == 0).all()
    return grad


DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.bfloat16, torch.bfloat16),
]


@pytest.mark.parametrize("s_dtype,t_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("vocab", [1, 7, 300])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_dtypes_and_vocab(s_dtype, t_dtype, vocab, temperature):
    check_forward(*make_inputs((24,), vocab, s_dtype, t_dtype), temperature)


@pytest.mark.parametrize("s_dtype,t_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float16)])
def test_forward_full_vocab(s_dtype, t_dtype):
    s, t, labels, mask = make_inputs((3,), 30522, s_dtype, t_dtype)
    labels[:] = torch.tensor([5, -100, 30521])
    mask[:] = torch.tensor([True, True, False])
    check_forward(s, t, labels, mask, 2.0)


def test_forward_many_rows_across_threads():
    # 32K logits per task at V=7: several parallel_for tasks, each with several rows.
    check_forward(*make_inputs((12000,), 7), 2.0)


def test_forward_3d_strided_rows():
    """[B, S, V] slices of bigger tensors: padded vocab, every other position, B and S transposed,
    with student and teacher (and labels, mask) laid out differently."""
    B, S, V = 3, 5, 37
    s = torch.randn(S * 2, B, V + 9)[::2, :, :V].transpose(0, 1)
    t = torch.randn(B, S, V + 3)[..., :V]
    labels = torch.randint(0, V, (B, 2 * S))[:, 1::2]
    labels[0, 1] = -100
    mask = (torch.rand(S, B) < 0.6).t()
    assert s.stride(0) < s.stride(1) and not labels.is_contiguous() and not mask.is_contiguous()
    check_forward(s, t, labels, mask, 2.0)
    check_forward(s, t, None, None, 0.5)


def test_forward_optional_labels_mask_and_custom_ignore_index():
    s, t, labels, mask = make_inputs((16,), 11)
    check_forward(s, t, None, mask, 2.0)
    check_forward(s, t, labels, None, 2.0)
    labels[labels == -100] = 3  # an in-range ignore_index
    check_forward(s, t, labels, mask, 2.0, ignore_index=3)


def test_forward_neg_inf_policy():
    s, t, labels, mask = make_inputs((8,), 40)
    mask[:] = True
    labels[:] = 7
    s[0, :5] = t[0, :5] = NEG_INF  # excluded in both: finite
    t[1, 10:] = NEG_INF  # teacher-only: q = 0 there, finite
    s[2, 20:30] = NEG_INF  # student -inf only where q = 0: finite
    t[2, 20:] = NEG_INF
    s[3] = NEG_INF  # whole student row: KL, CE and gradient 0
    t[4] = NEG_INF  # whole teacher row: KL 0, CE still counts
    s[5, 30] = NEG_INF  # student -inf where q > 0: KL = +inf, gradient finite
    kl, ce, grad = kl_ce_rows(s, t, labels, mask, torch.tensor([0.5, 2.0]), 2.0, -100, True)
    ref_kl, ref_ce, ref_grad = reference(s, t, labels, mask, 2.0, 0.5, 2.0)
    assert kl[3] == 0 and ce[3] == 0 and (grad[3] == 0).all() and kl[4] == 0
    assert kl[5] == float("inf") and ref_kl[5] == float("inf")
    finite = torch.arange(8) != 5
    assert torch.isfinite(kl[finite]).all() and torch.isfinite(grad).all()
    assert relative_error(kl[finite], ref_kl[finite]) <= 1e-5
    assert relative_error(ce, ref_ce) <= 1e-5
    assert relative_error(grad, ref_grad) <= 1e-5


def test_forward_extreme_logits():
    s, t, labels, mask = make_inputs((12,), 50, scale=1.0)
    s = torch.where(torch.rand(s.shape) < 0.5, 1e4, -1e4) + s
    t = torch.where(torch.rand(t.shape) < 0.5, 1e4, -1e4) + t
    check_forward(s, t, labels, mask, 2.0)
    check_forward(s.bfloat16(), t.half(), labels, mask, 1.0)


def test_forward_without_grad():
    s, t, labels, mask = make_inputs((2, 3), 9, torch.bfloat16)
    kl, ce, grad = kl_ce_rows(s, t, labels, mask, torch.tensor([1.0, 1.0]), 2.0, -100, False)
    ref_kl, ref_ce, _ = reference(s, t, labels, mask, 2.0, 1.0, 1.0)
    assert grad.shape == (0,) and grad.dtype == torch.bfloat16
    assert relative_error(kl, ref_kl) <= 1e-5 and relative_error(ce, ref_ce) <= 1e-5


@pytest.mark.parametrize("shape", [(0, 13), (2, 0, 13), (4, 0)])
def test_empty(shape):
    s, t = torch.randn(shape), torch.randn(shape)
    labels = torch.full(shape[:-1], -100)
    kl, ce, grad = kl_ce_rows(s, t, labels, None, torch.tensor([1.0, 1.0]), 2.0, -100, True)
    assert kl.shape == ce.shape == shape[:-1] and grad.shape == shape
    assert (kl == 0).all() and (ce == 0).all()
    kl_ce_rows_backward(grad, kl, ce, s, t, labels, None, torch.tensor([1.0, 1.0]), 2.0, -100)


# Backward: the forward's grad is turned into Σ g_kl·dKL + g_ce·dCE in place.  The student passed to
# the backward differs from the forward's, so a row that was scaled keeps the forward's gradient shape
# while a recomputed row follows the new student: this pins down which branch each row took.
def backward_case(s_dtype=torch.float32, coef=(0.25, 4.0), shape=(10,), vocab=33):
    s, t, labels, mask = make_inputs(shape, vocab, s_dtype)
    _, _, grad = kl_ce_rows(s, t, labels, mask, torch.tensor(coef), 2.0, -100, True)
    s_new = (s.float() + torch.randn(s.shape)).to(s_dtype)
    return s, s_new, t, labels, mask, grad


@pytest.mark.parametrize("s_dtype", [torch.float32, torch.bfloat16])
def test_backward_unit_factor_leaves_grad_untouched(s_dtype):
    s, s_new, t, labels, mask, grad = backward_case(s_dtype)
    before = grad.clone()
    g_kl, g_ce = torch.tensor(0.25).expand(10), torch.tensor(4.0).expand(10)
    kl_ce_rows_backward(grad, g_kl, g_ce, s_new, t, labels, mask, torch.tensor([0.25, 4.0]), 2.0, -100)
    assert torch.equal(grad, before)


@pytest.mark.parametrize("s_dtype", [torch.float32, torch.float16])
def test_backward_proportional_rows_scale(s_dtype):
    s, s_new, t, labels, mask, grad = backward_case(s_dtype)
    ratio = torch.rand(10) + 0.5  # per row: g = ratio · coef
    g_kl, g_ce = 0.25 * ratio, 4.0 * ratio
    kl_ce_rows_backward(grad, g_kl, g_ce, s_new, t, labels, mask, torch.tensor([0.25, 4.0]), 2.0, -100)
    *_, ref = reference(s, t, labels, mask, 2.0, g_kl.double(), g_ce.double())
    assert relative_error(grad, ref) <= TOL[s_dtype]


def test_backward_single_term_rows_scale_by_their_own_ratio():
    s, s_new, t, labels, mask, grad = backward_case()
    labels[:5] = -100  # rows 0-4: KL only (where masked)
    mask[5:] = False  # rows 5-9: CE only (where labelled)
    _, _, grad = kl_ce_rows(s, t, labels, mask, torch.tensor([0.25, 4.0]), 2.0, -100, True)
    g_kl, g_ce = torch.rand(10) + 0.1, torch.rand(10) + 0.1  # not proportional to coef, yet one term per row
    kl_ce_rows_backward(grad, g_kl, g_ce, s_new, t, labels, mask, torch.tensor([0.25, 4.0]), 2.0, -100)
    *_, ref = reference(s, t, labels, mask, 2.0, g_kl.double(), g_ce.double())
    assert relative_error(grad, ref) <= 1e-5


@pytest.mark.parametrize("s_dtype", [torch.float32, torch.bfloat16])
def test_backward_recomputes_other_rows(s_dtype):
    s, s_new, t, labels, mask, grad = backward_case(s_dtype, shape=(2, 5))
    g_kl, g_ce = torch.rand(2, 5) + 0.1, torch.rand(2, 5) + 0.1
    g_kl[0, 0], g_ce[0, 0] = 0.25 * 3, 4.0 * 3  # one proportional row stays a scale of the old gradient
    kl_ce_rows_backward(grad, g_kl, g_ce, s_new, t, labels, mask, torch.tensor([0.25, 4.0]), 2.0, -100)
    both = mask & (labels != -100)
    assert both.sum() >= 2
    *_, ref_new = reference(s_new, t, labels, mask, 2.0, g_kl.double(), g_ce.double())
    *_, ref_old = reference(s, t, labels, mask, 2.0, g_kl.double(), g_ce.double())
    ref = torch.where(both[..., None], ref_new, ref_old)  # single-term rows are scaled
    ref[0, 0] = ref_old[0, 0]
    assert relative_error(grad, ref) <= TOL[s_dtype]


def test_backward_zero_coef_with_nonzero_gradient_recomputes():
    s, s_new, t, labels, mask, grad = backward_case(coef=(0.0, 1.0))
    mask[:] = True
    _, _, grad = kl_ce_rows(s, t, labels, mask, torch.tensor([0.0, 1.0]), 2.0, -100, True)
    g_kl, g_ce = torch.tensor(0.5).expand(10), torch.tensor(1.0).expand(10)
    kl_ce_rows_backward(grad, g_kl, g_ce, s_new, t, labels, mask, torch.tensor([0.0, 1.0]), 2.0, -100)
    *_, ref = reference(s_new, t, labels, mask, 2.0, 0.5, 1.0)
    assert relative_error(grad, ref) <= 1e-5


def test_backward_3d_expanded_gradients():
    B, S, V = 2, 4, 21
    s = torch.randn(B, S, V + 5)[..., :V]
    t = torch.randn(B, S, V)
    labels = torch.randint(0, V, (B, S))
    mask = torch.rand(B, S) < 0.8
    _, _, grad = kl_ce_rows(s, t, labels, mask, torch.tensor([0.5, 0.5]), 2.0, -100, True)
    g_kl = torch.rand(S).expand(B, S)  # stride-0 batch dim, not proportional to coef
    g_ce = torch.tensor(0.3).expand(B, S)
    kl_ce_rows_backward(grad, g_kl, g_ce, s, t, labels, mask, torch.tensor([0.5, 0.5]), 2.0, -100)
    *_, ref = reference(s, t, labels, mask, 2.0, g_kl.double(), g_ce.double())
    assert relative_error(grad, ref) <= 1e-5


def test_invalid_arguments_name_the_argument():
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
        (IndexError, "label", (s, t, torch.full((4,), 6), mask, coef, 2.0)),
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
