"""distil::topk_kl_ce_rows: the C++ CPU kernel and the Triton kernel (interpreter here, CUDA on a GPU run)
against the float64 reference (distil.reference.topk_kl_ce_rows) in both teacher modes on one set of
``sample_inputs()``; k = V in exact mode against the dense kl_ce_loss; invalid indices; the public
topk_kl_ce_loss; opcheck; sm_80/sm_90 builds."""
import itertools
from typing import NamedTuple, Optional

import pytest
import torch

from distil import fused_loss, reference
from distil._ops.kl_ce import loss_coef
from distil.kernels import topk_kl_ce as K

from aot import compile_reports, launch_spec, main_loop_widths
from helpers import API_DEVICES, GPU_RUN, TOL, nan_empty, poison_heap, relative_error, upstream_row_grads

NEG_INF = float("-inf")
topk_rows = torch.ops.distil.topk_kl_ce_rows
topk_rows_backward = torch.ops.distil.topk_kl_ce_rows_backward


class Sample(NamedTuple):
    name: str
    s: torch.Tensor
    values: torch.Tensor
    index: torch.Tensor
    lse: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    kl_mask: Optional[torch.Tensor]
    temperature: float = 2.0
    ignore_index: int = -100

    def args(self):
        return self.s, self.values, self.index, self.lse, self.labels, self.kl_mask


def teacher_topk(t, k, temperature, exact, v_dtype=torch.float32, i_dtype=torch.int64, shuffle=True):
    """(values, index, lse) of full teacher logits t: its k largest, in a shuffled order (nothing may
    depend on sorted entries), and its full-vocabulary lse at T in exact mode."""
    values, index = t.float().topk(k, dim=-1)
    if shuffle:
        perm = torch.argsort(torch.rand(values.shape, device=t.device), dim=-1)
        values, index = values.gather(-1, perm), index.gather(-1, perm)
    lse = torch.logsumexp(t.double() / temperature, -1).float() if exact else None
    return values.to(v_dtype), index.to(i_dtype), lse


def make_sample(name, shape, vocab, k, exact, s_dtype=torch.float32, v_dtype=torch.float32, i_dtype=torch.int64,
                device="cpu", temperature=2.0, label_frac=0.6, mask_frac=0.7, scale=3.0):
    s = (torch.randn(*shape, vocab, device=device) * scale).to(s_dtype)
    t = torch.randn(*shape, vocab, device=device) * scale
    values, index, lse = teacher_topk(t, k, temperature, exact, v_dtype, i_dtype)
    labels = torch.randint(0, vocab, shape, device=device)
    labels[torch.rand(shape, device=device) > label_frac] = -100
    mask = torch.rand(shape, device=device) < mask_frac
    return Sample(name, s, values, index, lse, labels, mask, temperature)


def sample_inputs(device="cpu"):
    """Both modes over: k in {1, 8, 64, 256}; every dtype of student, teacher values and indices; a
    chunked V = 30522 row; [B, S, .] strided views; no labels / mask; ties and -inf among the top-k;
    the -inf policy; a k = V row."""
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    out = []
    for exact in (False, True):
        mode = "exact" if exact else "renorm"
        for k, vocab, s_dt, v_dt, i_dt in ((1, 50, f32, f32, torch.int64), (8, 100, bf16, f16, torch.int16),
                                           (64, 300, f16, bf16, torch.int32), (256, 300, f32, f16, torch.int16)):
            out.append(make_sample(f"{mode} k={k} V={vocab} {str(s_dt)[6:]}", (6,), vocab, k, exact, s_dt, v_dt,
                                   i_dt, device))
        out.append(make_sample(f"{mode} k=64 V=30522 bf16", (2,), 30522, 64, exact, bf16, f16, torch.int16, device))
        out.append(make_sample(f"{mode} k=V=40", (5,), 40, 40, exact, device=device))
        B, S, V, k = 2, 3, 37, 5
        s = torch.randn(S * 2, B, V + 9, device=device)[::2, :, :V].transpose(0, 1)
        t = torch.randn(B, S, V, device=device) * 2
        values, index, lse = teacher_topk(t, k, 2.0, exact)
        values = torch.cat([values, values], -1)[..., :k]  # a view of a wider tensor
        wide = torch.zeros(B, S, k + 3, dtype=torch.int64, device=device)
        wide[..., :k] = index
        index = wide[..., :k]
        labels = torch.randint(0, V, (B, 2 * S), device=device)[:, 1::2]
        labels[0, 1] = -100
        mask = (torch.rand(S, B, device=device) < 0.6).t()
        out.append(Sample(f"{mode} 3-D strided", s, values, index, lse, labels, mask))
        sample = make_sample(f"{mode} no labels, no mask", (4,), 33, 6, exact, device=device, temperature=1.5)
        out.append(sample._replace(labels=None, kl_mask=None))
        # Ties: integer-valued teacher logits, many equal among the top-k (and at its edge).
        t = torch.randint(-2, 3, (5, 60), device=device).float()
        values, index, lse = teacher_topk(t, 16, 2.0, exact)
        s = torch.randn(5, 60, device=device) * 2
        out.append(Sample(f"{mode} ties", s, values, index, lse, torch.randint(0, 60, (5,), device=device),
                          None, 2.0))
        # -inf policy: -inf teacher entries among the top-k, student -inf only where q = 0, whole rows.
        s = torch.randn(6, 40, device=device) * 2
        t = torch.randn(6, 40, device=device) * 2
        t[0, 3:] = NEG_INF  # row 0: 3 finite teacher logits, k = 8 includes 5 -inf ones
        t[1, :] = NEG_INF  # row 1: teacher -inf everywhere: KL 0
        s[2, :] = NEG_INF  # row 2: student -inf everywhere: KL, CE, gradient 0
        values, index, lse = teacher_topk(t, 8, 2.0, exact)
        finite_rows = torch.isfinite(values[0])
        s[0, index[0][~finite_rows]] = NEG_INF  # the student -inf exactly where q = 0
        labels = torch.tensor([1, 2, 3, 4, -100, 5], device=device)
        out.append(Sample(f"{mode} -inf policy", s, values, index, lse, labels, None))
    return out


SAMPLE_NAMES = [x.name for x in sample_inputs()]


def expected(sample, g_kl, g_ce):
    """float64 per-row (kl, ce) and the gradient of sum(g_kl * kl + g_ce * ce) w.r.t. the student."""
    s = sample.s.detach().double().requires_grad_()
    lse = None if sample.lse is None else sample.lse.double()
    kl, ce = reference.topk_kl_ce_rows(s, sample.values.double(), sample.index, lse, sample.labels, sample.kl_mask,
                                       sample.temperature, sample.ignore_index)
    (kl * torch.as_tensor(g_kl).double() + ce * torch.as_tensor(g_ce).double()).sum().backward()
    return kl.detach(), ce.detach(), s.grad


def _contiguous(x):
    return None if x is None else x.contiguous()


def _blocks(impl, sample):
    """"triton_chunked": small blocks, so that short rows and small k take the streamed paths."""
    if impl != "triton_chunked":
        return {}
    return {"block_v": 16 if sample.s.shape[-1] <= 512 else None, "block_k": 16}


def forward(impl, sample, coef, compute_grad=True):
    s, values, index, lse, labels, kl_mask = sample.args()
    if impl == "cpu":
        poison_heap(s, s[..., 0].float(), s[..., 0].float())
        return topk_rows(*sample.args(), coef, sample.temperature, sample.ignore_index, compute_grad)
    kl, ce = nan_empty(s.shape[:-1], torch.float32, s.device), nan_empty(s.shape[:-1], torch.float32, s.device)
    grad = nan_empty(s.shape, s.dtype, s.device) if compute_grad else None
    K.topk_kl_ce_rows(s, values, index, _contiguous(lse), _contiguous(labels), _contiguous(kl_mask), coef,
                      sample.temperature, sample.ignore_index, kl, ce, grad, **_blocks(impl, sample))
    return kl, ce, grad


def backward(impl, sample, grad, g_kl, g_ce, coef):
    s, values, index, lse, labels, kl_mask = sample.args()
    if impl == "cpu":
        topk_rows_backward(grad, g_kl, g_ce, *sample.args(), coef, sample.temperature, sample.ignore_index)
    else:
        K.topk_kl_ce_rows_backward(grad, g_kl.contiguous(), g_ce.contiguous(), s, values, index, _contiguous(lse),
                                   _contiguous(labels), _contiguous(kl_mask), coef, sample.temperature,
                                   sample.ignore_index, **_blocks(impl, sample))


IMPLS = ["cpu", "triton", "triton_chunked"]


def impl_device(impl, triton_device):
    return "cpu" if impl == "cpu" else triton_device


# ----------------------------------------------------------------------------------------------
# Every sample through both kernels: forward (with the gradient it writes), backward, opcheck
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("index", range(len(SAMPLE_NAMES)), ids=SAMPLE_NAMES)
def test_forward_matches_float64(triton_device, impl, index):
    sample = sample_inputs(impl_device(impl, triton_device))[index]
    s = sample.s
    coef = torch.tensor([0.7, 1.3], device=s.device)
    kl, ce, grad = forward(impl, sample, coef)
    ref_kl, ref_ce, ref_grad = expected(sample, 0.7, 1.3)
    assert kl.dtype == ce.dtype == torch.float32 and kl.shape == ce.shape == s.shape[:-1]
    assert grad.dtype == s.dtype and grad.shape == s.shape and grad.is_contiguous()
    tol = max(TOL[s.dtype], TOL[sample.values.dtype])
    assert relative_error(kl, ref_kl) <= tol and relative_error(ce, ref_ce) <= tol
    assert relative_error(grad, ref_grad) <= tol
    assert torch.isfinite(kl).all() and torch.isfinite(ce).all() and torch.isfinite(grad).all()
    mask, labels = sample.kl_mask, sample.labels
    no_kl = torch.zeros(kl.shape, dtype=torch.bool, device=s.device) if mask is None else ~mask
    off = no_kl if labels is None else no_kl & (labels == sample.ignore_index)
    assert (kl[no_kl] == 0).all() and (grad[off] == 0).all()
    _, _, no_grad = forward(impl, sample, coef, compute_grad=False)
    assert no_grad is None or no_grad.numel() == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("upstream", ["coef", "proportional", "arbitrary"])
@pytest.mark.parametrize("index", range(len(SAMPLE_NAMES)), ids=SAMPLE_NAMES)
def test_backward_matches_float64(triton_device, impl, upstream, index):
    sample = sample_inputs(impl_device(impl, triton_device))[index]
    if (sample.s.shape[-1] > 1000 or impl == "triton_chunked") and upstream != "arbitrary":
        pytest.skip("chunked and long rows exercise the recomputing branch only (interpreter time)")
    device, rows = sample.s.device, sample.s.shape[:-1]
    coef = torch.tensor([0.25, 4.0], device=device)
    _, _, grad = forward(impl, sample, coef)
    g_kl, g_ce = upstream_row_grads(upstream, coef, rows)
    before = grad.clone()
    backward(impl, sample, grad, g_kl, g_ce, coef)
    if upstream == "coef":
        assert torch.equal(grad, before)
    *_, ref = expected(sample, g_kl, g_ce)
    assert relative_error(grad, ref) <= max(TOL[sample.s.dtype], TOL[sample.values.dtype])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("exact", [False, True])
def test_nan_in_a_selected_row_is_nan(triton_device, impl, exact):
    """A NaN anywhere in a student row gives NaN (never the 0 of an all -inf row), as kl_ce_rows."""
    sample = make_sample("nan", (4,), 60, 8, exact, device=impl_device(impl, triton_device))
    sample.s[0] = float("nan")
    sample.s[1, 17] = float("nan")
    labels = torch.tensor([3, 4, 5, 6], device=sample.s.device)
    sample = sample._replace(labels=labels, kl_mask=None)
    kl, ce, grad = forward(impl, sample, torch.tensor([0.7, 1.3], device=sample.s.device))
    assert kl[:2].isnan().all() and ce[:2].isnan().all() and grad[:2].isnan().any(-1).all()
    assert torch.isfinite(kl[2:]).all() and torch.isfinite(ce[2:]).all() and torch.isfinite(grad[2:]).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_cross_entropy_is_exact_at_large_logits(triton_device, impl, offset):
    """log z + (max - s[y]), the difference first: as exact as eager fp32, as kl_ce_rows."""
    sample = make_sample("large", (8,), 100, 8, True, device=impl_device(impl, triton_device), scale=1.0)
    sample = sample._replace(s=sample.s + offset, labels=torch.randint(0, 100, (8,), device=sample.s.device),
                             kl_mask=None)
    _, ce, _ = forward(impl, sample, torch.tensor([0.0, 1.0], device=sample.s.device))
    _, ref_ce = reference.topk_kl_ce_rows(sample.s.double(), sample.values.double(), sample.index,
                                          sample.lse.double(), sample.labels, None, 2.0, -100)
    assert (ce.double() - ref_ce).abs().max() <= 2e-6


@pytest.mark.parametrize("index", [i for i, n in enumerate(SAMPLE_NAMES) if "30522" not in n],
                         ids=[n for n in SAMPLE_NAMES if "30522" not in n])
def test_opcheck(index):
    sample = sample_inputs()[index]
    rest = (torch.tensor([0.5, 0.5]), sample.temperature, sample.ignore_index)
    torch.library.opcheck(topk_rows.default, (*sample.args(), *rest, False))
    # As for kl_ce_rows: the backward rewrites the third output in place, which opcheck's AOT
    # comparison after backward cannot model.
    s, *teacher = sample.args()
    torch.library.opcheck(topk_rows.default, (s.clone().requires_grad_(), *teacher, *rest, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    grad = topk_rows(*sample.args(), *rest, True)[2]
    g = torch.rand(s.shape[:-1])
    torch.library.opcheck(topk_rows_backward.default, (grad, g, g, *sample.args(), *rest))


# ----------------------------------------------------------------------------------------------
# k = V in exact mode is the dense loss
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["cpu", "triton"])
@pytest.mark.parametrize("vocab", [64, 300])
def test_k_equals_v_exact_mode_is_dense_kl_ce(triton_device, impl, vocab):
    device = impl_device(impl, triton_device)
    s = torch.randn(16, vocab, device=device) * 3
    t = torch.randn(16, vocab, device=device) * 3
    labels = torch.randint(0, vocab, (16,), device=device)
    labels[::3] = -100
    mask = torch.rand(16, device=device) < 0.8
    values, index, lse = teacher_topk(t, vocab, 2.0, exact=True)
    coef = torch.tensor([5.0 / 13, 2.0 / 11], device=device)
    sample = Sample("k=V", s, values, index, lse, labels, mask)
    kl, ce, grad = forward(impl, sample, coef)
    dense_kl, dense_ce, dense_grad = torch.ops.distil.kl_ce_rows(s.cpu(), t.cpu(), labels.cpu(), mask.cpu(),
                                                                  coef.cpu(), 2.0, -100, True)
    assert relative_error(kl, dense_kl) <= 1e-6 and relative_error(ce, dense_ce) <= 1e-6
    assert relative_error(grad, dense_grad) <= 1e-6
    # Through the public functions, with the batchmean and the gradient that lands in .grad.
    s1, s2 = s.cpu().clone().requires_grad_(), s.cpu().clone().requires_grad_()
    args = dict(temperature=2.0, kl_mask=mask.cpu(), kl_weight=5.0, ce_weight=2.0)
    a_kl, a_ce = fused_loss.topk_kl_ce_loss(s1, values.cpu(), index.cpu(), labels.cpu(), teacher_lse=lse.cpu(), **args)
    b_kl, b_ce = fused_loss.kl_ce_loss(s2, t.cpu(), labels.cpu(), **args)
    (5 * a_kl + 2 * a_ce).backward()
    (5 * b_kl + 2 * b_ce).backward()
    assert (abs(a_kl.item() - b_kl.item()) <= 1e-6 * abs(b_kl.item())
            and a_ce.item() == pytest.approx(b_ce.item(), rel=1e-6))
    assert relative_error(s1.grad, s2.grad) <= 1e-6


# ----------------------------------------------------------------------------------------------
# Invalid indices
# ----------------------------------------------------------------------------------------------
def test_cpu_invalid_indices_raise():
    sample = make_sample("k=4", (3,), 20, 4, exact=False, label_frac=0.0)
    args = (torch.ones(2), 2.0, -100, True)
    s, values, index, lse, labels, mask = sample.args()
    for bad, message in ((20, "outside"), (-1, "outside"), (int(index[1, 0]), "twice")):
        broken = index.clone()
        broken[1, 2] = bad
        with pytest.raises(IndexError, match=message):
            topk_rows(s, values, broken, lse, labels, None, *args)
        # Rows outside kl_mask never read their indices.
        keep = torch.tensor([True, False, True])
        topk_rows(s, values, broken, lse, labels, keep, *args)


def test_triton_out_of_range_index_is_skipped(triton_device):
    """CUDA does not check (documented): an index outside [0, V) is never read or written."""
    sample = make_sample("k=4", (3,), 20, 4, exact=True, device=triton_device)
    index = sample.index.clone()
    index[1, 2] = 1000
    kl, ce, grad = forward("triton", sample._replace(index=index), torch.tensor([1.0, 1.0], device=triton_device))
    assert torch.isfinite(kl).all() and torch.isfinite(grad).all()


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", API_DEVICES)
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("weights", [(5.0, 2.0), (0.3, -2.0)])
def test_topk_kl_ce_loss_matches_float64(device, exact, weights):
    sample = make_sample("api", (2, 5), 70, 8, exact, torch.bfloat16, torch.float16, torch.int16, device)
    s = sample.s.clone().requires_grad_()
    kl, ce = fused_loss.topk_kl_ce_loss(s, sample.values, sample.index, sample.labels, teacher_lse=sample.lse,
                                        kl_mask=sample.kl_mask, kl_weight=5.0, ce_weight=2.0)
    (weights[0] * kl + weights[1] * ce).backward()
    ref_kl, ref_ce, ref_grad = expected(sample, weights[0] / sample.kl_mask.sum(),
                                        weights[1] / (sample.labels != -100).sum())
    assert kl.item() == pytest.approx((ref_kl.sum() / sample.kl_mask.sum()).item(), rel=1e-2)
    assert ce.item() == pytest.approx((ref_ce.sum() / (sample.labels != -100).sum()).item(), rel=1e-2)
    assert relative_error(s.grad, ref_grad) <= 1e-2


def test_backward_of_the_announced_combination_is_free():
    sample = make_sample("api", (12,), 50, 8, exact=True)
    s = sample.s.clone().requires_grad_()
    kl, ce = fused_loss.topk_kl_ce_loss(s, sample.values, sample.index, sample.labels, teacher_lse=sample.lse,
                                        kl_mask=sample.kl_mask, kl_weight=5.0, ce_weight=2.0)
    (5.0 * kl + 2.0 * ce).backward()
    coef = loss_coef(5.0, sample.kl_mask.sum(), 2.0, (sample.labels != -100).sum(), "cpu")
    _, _, forward_grad = topk_rows(*sample.args(), coef, 2.0, -100, True)
    assert torch.equal(s.grad, forward_grad)


def test_no_selected_rows_gives_exact_zeros():
    sample = make_sample("api", (4,), 20, 3, exact=True)
    s = sample.s.clone().requires_grad_()
    labels = torch.full((4,), -100)
    kl, ce = fused_loss.topk_kl_ce_loss(s, sample.values, sample.index, labels, teacher_lse=sample.lse,
                                        kl_mask=torch.zeros(4, dtype=torch.bool))
    (kl + ce).backward()
    assert kl.item() == 0.0 and ce.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


def test_bad_inputs_name_the_argument():
    sample = make_sample("api", (4,), 20, 3, exact=True)
    s, values, index, lse, labels, mask = sample.args()
    loss = fused_loss.topk_kl_ce_loss
    with pytest.raises(ValueError, match="teacher_topk_logits"):
        loss(s, values[:3], index[:3], labels)
    with pytest.raises(TypeError, match="teacher_topk_index"):
        loss(s, values, index.float(), labels)
    with pytest.raises(ValueError, match="teacher_topk_index"):
        loss(s, values, index[:, :2], labels)
    with pytest.raises(ValueError, match="teacher_lse"):
        loss(s, values, index, labels, teacher_lse=lse[:2])
    with pytest.raises(TypeError, match="student_logits"):
        loss(s.long(), values, index, labels)
    with pytest.raises(ValueError, match="temperature"):
        loss(s, values, index, labels, temperature=0.0)
    with pytest.raises(ValueError, match="contiguous"):
        loss(s, values.t().contiguous().t(), index, labels)
    with pytest.raises(ValueError, match="labels"):
        loss(s, values, index, torch.full((4,), 20))
    with pytest.raises(IndexError, match="teacher_index"):
        loss(s, values, torch.zeros_like(index), labels)


def test_torch_compile_fullgraph():
    sample = make_sample("api", (6,), 40, 8, exact=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(s):
        kl, ce = fused_loss.topk_kl_ce_loss(s, sample.values, sample.index, sample.labels, teacher_lse=sample.lse,
                                            kl_mask=sample.kl_mask, kl_weight=5.0, ce_weight=2.0)
        return 5.0 * kl + 2.0 * ce

    s1, s2 = sample.s.clone().requires_grad_(), sample.s.clone().requires_grad_()
    step(s1).backward()
    kl, ce = fused_loss.topk_kl_ce_loss(s2, sample.values, sample.index, sample.labels, teacher_lse=sample.lse,
                                        kl_mask=sample.kl_mask)
    (5.0 * kl + 2.0 * ce).backward()
    assert relative_error(s1.grad, s2.grad) <= 1e-6


# ----------------------------------------------------------------------------------------------
# Real GPU builds: both modes, every dtype, sm_80 and sm_90, zero spills
# ----------------------------------------------------------------------------------------------
def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _launch_specs(vocab, k, s_dt, v_dt, i_dt, exact, cc, has_labels=True, has_mask=True, write_grad=True,
                  rows=8192):
    """(forward, backward) specs of a launch on [rows, vocab] logits, from the launchers themselves
    (specialised as Triton specialises a real launch: tests/aot.py)."""
    s, values, index = _meta(rows, vocab, dtype=s_dt), _meta(rows, k, dtype=v_dt), _meta(rows, k, dtype=i_dt)
    lse = _meta(rows) if exact else None
    labels = _meta(rows, dtype=torch.int64) if has_labels else None
    mask = _meta(rows, dtype=torch.bool) if has_mask else None
    coef, kl, ce, grad = _meta(2), _meta(rows), _meta(rows), _meta(rows, vocab, dtype=s_dt)
    fwd = K.fwd_launch(s, values, index, lse, labels, mask, coef, 2.0, -100, kl, ce, grad if write_grad else None)
    bwd = K.bwd_launch(grad, kl, ce, s, values, index, lse, labels, mask, coef, 2.0, -100)
    return [launch_spec(kernel, "distil.kernels.topk_kl_ce", args, cc=cc, **options)
            for kernel, (_, args, options) in ((K.topk_kl_ce_fwd_kernel, fwd), (K.topk_kl_ce_bwd_kernel, bwd))]


VOCABS = (30522, 50257, 32000, 128256)


@pytest.mark.skipif(GPU_RUN, reason="ahead-of-time builds are checked on the CPU machine")
def test_sm80_sm90_builds_have_128_bit_main_loops_and_no_spills():
    # The student row and its gradient stream through 128-bit main loops at every vocabulary, every
    # student dtype, both modes, both architectures (the k teacher entries are a gather: scalar, outside).
    vector_specs = [spec for vocab in VOCABS for s_dt in (torch.float32, torch.bfloat16, torch.float16)
                    for exact, cc in itertools.product((False, True), (80, 90))
                    for spec in _launch_specs(vocab, 64, s_dt, torch.float16, torch.int32, exact, cc)]
    # The rest: one-block rows, k streamed in blocks, other teacher dtypes, the optional inputs.
    other_specs = [spec for (vocab, k), cc in itertools.product(((512, 8), (30522, 256), (50257, 1024)), (80, 90))
                   for spec in _launch_specs(vocab, k, torch.bfloat16, torch.float16, torch.int32, True, cc)]
    other_specs += [spec for v_dt, i_dt in ((torch.float32, torch.int64), (torch.bfloat16, torch.int16))
                    for spec in _launch_specs(30522, 64, torch.float32, v_dt, i_dt, True, 90)]
    other_specs += [_launch_specs(30522, 64, torch.bfloat16, torch.float16, torch.int16, True, 90, *flags)[0]
                    for flags in itertools.product((False, True), repeat=3) if flags != (True, True, True)]
    reports = compile_reports(vector_specs + other_specs)
    spilled = [(s["kernel"], s["constexprs"], s["signature"]["s_ptr"], s["cc"], r)
               for s, r in zip(vector_specs + other_specs, reports) if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, spilled
    assert {r["arch"] for r in reports} == {"sm_80", "sm_90a"}
    for spec, report in zip(vector_specs, reports):
        in_loop, outside = main_loop_widths(report)
        where = (spec["kernel"], spec["signature"]["s_ptr"], spec["signature"]["V"], spec["cc"])
        # k = 64 is one teacher block (no loop): the loops are the student / gradient streams.
        assert in_loop and set(in_loop) == {128}, (where, in_loop)
        assert set(outside) - {128}, where  # the head / tail chunks: masked, scalar


# ----------------------------------------------------------------------------------------------
# What the numbers cannot say: an impossible lse, an lse of another temperature
# ----------------------------------------------------------------------------------------------
def test_impossible_lse_raises_on_cpu_and_is_nan_on_the_device_path(monkeypatch):
    """An lse below the log-sum-exp of the row's own top-k logits (top-k mass > 1) is refused on CPU;
    where raising would need a host sync (CUDA, torch.compile) the KL is NaN instead."""
    from distil._ops import topk_kl_ce as ops

    sample = make_sample("api", (6,), 40, 8, exact=True)
    s, values, index, lse, labels, mask = sample.args()
    bad_lse = lse.clone()
    bad_lse[2] = torch.logsumexp(values[2] / 2.0, -1) - 1.0  # top-k mass e > 1
    mask = torch.ones(6, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"teacher_lse at row 2 .*top-k mass 2\.718"):
        fused_loss.topk_kl_ce_loss(s, values, index, labels, teacher_lse=bad_lse, kl_mask=mask)
    # outside kl_mask the row is never read, so it is not an error
    mask[2] = False
    fused_loss.topk_kl_ce_loss(s, values, index, labels, teacher_lse=bad_lse, kl_mask=mask)
    # the device path: that row's KL, hence the loss, becomes NaN; the gradient is the kernel's
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    poison = ops._refuse_impossible_lse(values, bad_lse, 2.0, None)
    assert poison[2].isnan() and (poison[torch.arange(6) != 2] == 0).all()
    s = s.clone().requires_grad_()
    kl, ce = fused_loss.topk_kl_ce_loss(s, values, index, labels, teacher_lse=bad_lse)
    assert kl.isnan() and ce.isfinite()
    (kl + ce).backward()
    assert s.grad.isfinite().all()
    # rounding of 16-bit values at k = V (Q a hair above 1) is no error
    t = torch.randn(6, 40) * 8
    v16, idx = t.topk(40, dim=-1)
    monkeypatch.undo()
    fused_loss.topk_kl_ce_loss(s, v16.half(), idx, labels, teacher_lse=torch.logsumexp(t / 2.0, -1))


def test_lse_of_another_temperature_is_refused():
    """An lse taken at another T cannot be told from the numbers: the temperature travels with it
    (TopKLogits.temperature, teacher_lse_temperature) and must be the loss's."""
    from distil.fused_loss import DistillationLoss, TopKLogits

    sample = make_sample("api", (6,), 40, 8, exact=True)
    s, values, index, lse, labels, _ = sample.args()
    with pytest.raises(ValueError, match="teacher_lse was taken at T = 1.0 but temperature is 2.0"):
        fused_loss.topk_kl_ce_loss(s, values, index, labels, teacher_lse=lse, teacher_lse_temperature=1.0)
    with pytest.raises(ValueError, match="teacher_lse_temperature"):
        fused_loss.topk_kl_ce_loss(s, values, index, labels, teacher_lse=lse, teacher_lse_temperature=-1.0)
    fused_loss.topk_kl_ce_loss(s, values, index, labels, teacher_lse=lse, teacher_lse_temperature=2.0)
    loss = DistillationLoss(cos_weight=0.0, temperature=2.0)
    with pytest.raises(ValueError, match="temperature it was taken at"):
        loss(s, TopKLogits(values, index, lse), labels)
    with pytest.raises(ValueError, match="T = 1.0"):
        loss(s, TopKLogits(values, index, lse, temperature=1.0), labels)
    loss(s, TopKLogits(values, index, lse, temperature=2.0), labels)
    loss(s, TopKLogits(values, index), labels)  # renormalised: no lse, no temperature needed
