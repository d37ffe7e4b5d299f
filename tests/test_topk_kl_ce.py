"""distil::topk_kl_ce_rows beyond the generic families of tests/test_ops.py (samples in tests/opinfo.py):
k = V in exact mode against the dense kl_ce, invalid indices, large logits; the public topk_kl_ce_loss,
an impossible lse and an lse of another temperature."""
import pytest
import torch

from distil import fused_loss, reference
from distil._ops.common import loss_coef

from helpers import API_DEVICES, relative_error
from opinfo import TOPK_KL_CE, expected, forward, impl_device, make_topk_sample, teacher_topk, topk_sample

topk_rows = torch.ops.distil.topk_kl_ce_rows


@pytest.mark.parametrize("impl", TOPK_KL_CE.impls)
@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_cross_entropy_is_exact_at_large_logits(triton_device, impl, offset):
    """log z + (max - s[y]), the difference first: as exact as eager fp32, as kl_ce_rows."""
    sample = make_topk_sample("large", (8,), 100, 8, True, device=impl_device(impl, triton_device), scale=1.0)
    s, values, index, lse, _, _ = sample.args
    labels = torch.randint(0, 100, (8,), device=s.device)
    sample = topk_sample("large", s + offset, values, index, lse, labels, None)
    _, ce, _ = forward(TOPK_KL_CE, impl, sample, torch.tensor([0.0, 1.0], device=s.device))
    _, ref_ce = reference.topk_kl_ce_rows((s + offset).double(), values.double(), index, lse.double(), labels, None,
                                          2.0, -100)
    assert (ce.double() - ref_ce).abs().max() <= 2e-6


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
    sample = topk_sample("k=V", s, values, index, lse, labels, mask)
    kl, ce, grad = forward(TOPK_KL_CE, impl, sample, coef)
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
    sample = make_topk_sample("k=4", (3,), 20, 4, exact=False, label_frac=0.0)
    args = (torch.ones(2), 2.0, -100, True)
    s, values, index, lse, labels, mask = sample.args
    for bad, message in ((20, "outside"), (-1, "outside"), (int(index[1, 0]), "twice")):
        broken = index.clone()
        broken[1, 2] = bad
        with pytest.raises(ValueError, match=message):
            topk_rows(s, values, broken, lse, labels, None, *args)
        # Rows outside kl_mask never read their indices.
        keep = torch.tensor([True, False, True])
        topk_rows(s, values, broken, lse, labels, keep, *args)


def test_triton_out_of_range_index_is_skipped(triton_device):
    """CUDA does not check (documented): an index outside [0, V) is never read or written."""
    sample = make_topk_sample("k=4", (3,), 20, 4, exact=True, device=triton_device)
    s, values, index, lse, labels, mask = sample.args
    index = index.clone()
    index[1, 2] = 1000
    sample = topk_sample("k=4", s, values, index, lse, labels, mask)
    kl, ce, grad = forward(TOPK_KL_CE, "triton", sample, torch.tensor([1.0, 1.0], device=triton_device))
    assert torch.isfinite(kl).all() and torch.isfinite(grad).all()


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", API_DEVICES)
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("weights", [(5.0, 2.0), (0.3, -2.0)])
def test_topk_kl_ce_loss_matches_float64(device, exact, weights):
    sample = make_topk_sample("api", (2, 5), 70, 8, exact, torch.bfloat16, torch.float16, torch.int16, device)
    s, values, index, lse, labels, mask = sample.args
    s = s.clone().requires_grad_()
    kl, ce = fused_loss.topk_kl_ce_loss(s, values, index, labels, teacher_lse=lse, kl_mask=mask, kl_weight=5.0,
                                        ce_weight=2.0)
    (weights[0] * kl + weights[1] * ce).backward()
    (ref_kl, ref_ce), ref_grad = expected(TOPK_KL_CE, sample, (weights[0] / mask.sum(),
                                                               weights[1] / (labels != -100).sum()))
    assert kl.item() == pytest.approx((ref_kl.sum() / mask.sum()).item(), rel=1e-2)
    assert ce.item() == pytest.approx((ref_ce.sum() / (labels != -100).sum()).item(), rel=1e-2)
    assert relative_error(s.grad, ref_grad) <= 1e-2


def test_backward_of_the_announced_combination_is_free():
    sample = make_topk_sample("api", (12,), 50, 8, exact=True)
    s, values, index, lse, labels, mask = sample.args
    x = s.clone().requires_grad_()
    kl, ce = fused_loss.topk_kl_ce_loss(x, values, index, labels, teacher_lse=lse, kl_mask=mask, kl_weight=5.0,
                                        ce_weight=2.0)
    (5.0 * kl + 2.0 * ce).backward()
    coef = loss_coef(5.0, mask.sum(), 2.0, (labels != -100).sum(), "cpu")
    _, _, forward_grad = topk_rows(*sample.args, coef, 2.0, -100, True)
    assert torch.equal(x.grad, forward_grad)


def test_no_selected_rows_gives_exact_zeros():
    s, values, index, lse, _, _ = make_topk_sample("api", (4,), 20, 3, exact=True).args
    s = s.clone().requires_grad_()
    labels = torch.full((4,), -100)
    kl, ce = fused_loss.topk_kl_ce_loss(s, values, index, labels, teacher_lse=lse,
                                        kl_mask=torch.zeros(4, dtype=torch.bool))
    (kl + ce).backward()
    assert kl.item() == 0.0 and ce.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


def test_bad_inputs_name_the_argument():
    s, values, index, lse, labels, mask = make_topk_sample("api", (4,), 20, 3, exact=True).args
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
    with pytest.raises(ValueError, match="teacher_index"):
        loss(s, values, torch.zeros_like(index), labels)


# ----------------------------------------------------------------------------------------------
# What the numbers cannot say: an impossible lse, an lse of another temperature
# ----------------------------------------------------------------------------------------------
def test_impossible_lse_raises_on_cpu_and_is_nan_on_the_device_path(monkeypatch):
    """An lse below the log-sum-exp of the row's own top-k logits (top-k mass > 1) is refused on CPU;
    where raising would need a host sync (CUDA, torch.compile) the KL is NaN instead."""
    from distil._ops import topk_kl_ce as ops

    sample = make_topk_sample("api", (6,), 40, 8, exact=True)
    s, values, index, lse, labels, mask = sample.args
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

    sample = make_topk_sample("api", (6,), 40, 8, exact=True)
    s, values, index, lse, labels, _ = sample.args
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
