"""The loss contract at its edges, through the public API (distil.fused_loss, distil.ops), on both
backends: the C++ CPU kernels and the Triton kernels (interpreter on CPU tensors here, CUDA on a GPU
run). Each test pins one defect of issue 9: NaN rows, 16-bit gradients under an upstream loss scale,
create_graph, torch.compile with changing floats, precision at large logits and temperatures,
temperatures outside float32, and inputs as the ecosystem builds them (integer masks, NumPy scalars).
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distil import reference
from distil._ops.registry import TRITON_IMPLS
from distil.fused_loss import DistillationLoss, cosine_loss, kl_ce_loss, kl_div_loss, topk_kl_ce_loss
from distil.ops import masked_gather

from helpers import GPU_RUN, relative_error

NAN = float("nan")


@pytest.fixture(params=["C++", "Triton"])
def backend(request):
    return request.param


@pytest.fixture
def device(request, backend):
    """The device whose kernels the public functions run: C++ on CPU tensors; Triton on CUDA in a GPU
    run, else on CPU tensors with the ops' Triton implementations registered for CPU for this test."""
    if backend == "C++":
        return "cpu"
    if GPU_RUN:
        return "cuda"
    lib = torch.library.Library("distil", "IMPL")
    for name, impl in TRITON_IMPLS.items():
        lib.impl(name, impl, "CPU")
    request.addfinalizer(lib._destroy)
    return "cpu"


def topk_kl_ce_as_dense(s, t, labels, *, temperature=2.0, **kwargs):
    """topk_kl_ce_loss with k = V in exact mode, which is the dense kl_ce_loss: every contract of kl_ce_loss
    below holds for it as well."""
    values, index = t.topk(t.shape[-1], dim=-1)
    lse = torch.logsumexp(t.float() / temperature, -1)
    return topk_kl_ce_loss(s, values, index, labels, teacher_lse=lse, temperature=temperature, **kwargs)


TWO_PART_LOSSES = {"kl_ce": kl_ce_loss, "topk_kl_ce": topk_kl_ce_as_dense}
two_part_losses = pytest.mark.parametrize("two_part", TWO_PART_LOSSES.values(), ids=TWO_PART_LOSSES.keys())


def logits(rows, vocab, device, scale=3.0, dtype=torch.float32):
    return (torch.randn(rows, vocab, device=device) * scale).to(dtype)


def reference_grad(s, t, labels, kl_mask, temperature, kl_weight, ce_weight, scale):
    """float64 d/ds of ``scale * (kl_weight * kl + ce_weight * ce)`` (batchmean KL, mean CE)."""
    sd = s.detach().double().requires_grad_()
    kl, ce = reference.kl_ce_rows(sd, t.double(), labels, kl_mask, temperature)
    n_kl = sd.shape[0] if kl_mask is None else kl_mask.sum()
    (scale * (kl_weight * kl.sum() / n_kl + ce_weight * ce.sum() / (labels != -100).sum())).backward()
    return sd.grad


def element_errors(grad, ref):
    """(fraction of entries that are exactly 0 where the reference is not, median relative error)."""
    nonzero = ref != 0
    rel = (grad.double() - ref).abs()[nonzero] / ref.abs()[nonzero]
    return (grad[nonzero] == 0).double().mean().item(), rel.median().item()


# ------------------------------------------------------------------------------------------------
# 1. NaN: a NaN anywhere in a selected row gives a NaN loss (and gradient) for that row
# ------------------------------------------------------------------------------------------------
def test_nan_in_a_selected_row_is_nan_on_every_backend(device):
    s, t = logits(7, 40, device), logits(7, 40, device)
    s[0] = NAN  # whole student row (the C++ row maximum used to skip it: an "all -inf" row, loss 0)
    t[1] = NAN  # whole teacher row
    s[2, 7] = NAN  # one student logit
    t[3, 9] = NAN  # one teacher logit
    s[4, :20] = float("-inf")  # NaN among -inf
    s[4, 20:] = NAN
    s[5] = NAN  # not selected: no effect
    mask = torch.ones(7, dtype=torch.bool, device=device)
    mask[5] = False
    s.requires_grad_()
    rows = kl_div_loss(s, t, mask=mask, reduction="none")
    rows.sum().backward()
    assert rows[:5].isnan().all(), rows
    assert rows[5] == 0 and torch.equal(s.grad[5], torch.zeros_like(s.grad[5]))
    assert s.grad[:5].isnan().any(-1).all()
    ref, _ = reference.kl_ce_rows(s[6:].detach().double(), t[6:].double(), None, None, 2.0)
    assert relative_error(rows[6:], ref) <= 1e-5 and torch.isfinite(s.grad[6]).all()


@two_part_losses
def test_nan_student_row_makes_kl_and_ce_nan(device, two_part):
    """The issue's case: kl_ce_loss(torch.full((3, 8), nan), t, labels) returned (0, 0)."""
    s = torch.full((3, 8), NAN, device=device)
    kl, ce = two_part(s, logits(3, 8, device), torch.tensor([1, 2, -100], device=device))
    assert kl.isnan() and ce.isnan()
    if two_part is kl_ce_loss:  # (a NaN top-k teacher is refused by its lse check instead)
        # A NaN teacher row spoils only the KL: the cross-entropy reads the student alone.
        t = logits(3, 8, device)
        t[0] = NAN
        kl, ce = two_part(logits(3, 8, device), t, torch.tensor([1, 2, -100], device=device))
        assert kl.isnan() and torch.isfinite(ce)


def test_nan_hidden_row_makes_cosine_nan(device):
    x, y = torch.randn(4, 16, device=device), torch.randn(4, 16, device=device)
    x[1] = NAN
    x[2, 3] = NAN
    x[3] = NAN  # not selected
    mask = torch.tensor([True, True, True, False], device=device)
    x.requires_grad_()
    loss = cosine_loss(x, y, mask=mask)
    loss.backward()
    assert loss.isnan()
    assert x.grad[1:3].isnan().any(-1).all() and torch.equal(x.grad[3], torch.zeros_like(x.grad[3]))


def test_nan_student_makes_the_triple_loss_nan(device):
    """What the trainer's non-finite check relies on (distil-train --alpha-cos 0 used to log 0.0)."""
    s = torch.full((4, 30), NAN, device=device)
    labels = torch.tensor([3, -100, 7, -100], device=device)
    out = DistillationLoss(cos_weight=0.0)(s, logits(4, 30, device), labels)
    assert out.total.isnan() and out.kl.isnan() and out.ce.isnan()


# ------------------------------------------------------------------------------------------------
# 2. 16-bit gradients under an upstream scale (GradScaler, 1 / grad_accum)
# ------------------------------------------------------------------------------------------------
@two_part_losses
@pytest.mark.parametrize("dtype,scale", [(torch.float16, 65536.0), (torch.float16, 1 / 64),
                                         (torch.bfloat16, 65536.0)])
def test_16bit_gradient_under_an_unannounced_scale(backend, device, dtype, scale, two_part):
    """kl_weight / ce_weight announced, then the loss multiplied by a loss scale the forward was not
    told about: the gradient must be as accurate as one rounding to the dtype (eager's autocast
    result), not the forward's tiny fp16 values rescaled (16% zeros, 8% median error before)."""
    n, vocab = 64, 1000
    s, t = logits(n, vocab, device), logits(n, vocab, device)
    labels = torch.randint(0, vocab, (n,), device=device)
    labels[torch.rand(n, device=device) > 0.15] = -100
    s16 = s.to(dtype).requires_grad_()
    kl, ce = two_part(s16, t.to(dtype), labels, kl_weight=5.0, ce_weight=2.0)
    (scale * (5.0 * kl + 2.0 * ce)).backward()
    ref = reference_grad(s.to(dtype), t.to(dtype), labels, None, 2.0, 5.0, 2.0, scale)
    zeros, median = element_errors(s16.grad, ref)
    one_rounding = element_errors(ref.to(dtype), ref)
    assert zeros <= one_rounding[0] + 1e-4
    assert median <= 1.5 * one_rounding[1], (median, one_rounding)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_cosine_gradient_under_an_unannounced_scale(backend, device, dtype):
    x, y = torch.randn(512, 64, device=device), torch.randn(512, 64, device=device)
    x16 = x.to(dtype).requires_grad_()
    (65536.0 * cosine_loss(x16, y.to(dtype))).backward()
    xd = x.to(dtype).double().requires_grad_()
    (65536.0 * reference.cosine_rows(xd, y.to(dtype).double()).mean()).backward()
    zeros, median = element_errors(x16.grad, xd.grad)
    one_rounding = element_errors(xd.grad.to(dtype), xd.grad)
    assert zeros <= one_rounding[0] + 1e-4
    assert median <= 1.5 * one_rounding[1], (median, one_rounding)


@two_part_losses
def test_announced_weights_may_be_device_tensors(device, two_part):
    """GradScaler's scale and 1/grad_accum as 0-d device tensors (no host sync): announced exactly,
    the backward leaves the forward's gradient as it is, and it equals the Python-float announcement."""
    s, t = logits(16, 50, device, dtype=torch.float16), logits(16, 50, device, dtype=torch.float16)
    labels = torch.randint(0, 50, (16,), device=device)
    scale = torch.full((), 65536.0, device=device) / 4
    grads = []
    for kl_w, ce_w in ((scale * 5.0, scale * 2.0), (65536.0 / 4 * 5.0, 65536.0 / 4 * 2.0)):
        x = s.clone().requires_grad_()
        kl, ce = two_part(x, t, labels, kl_weight=kl_w, ce_weight=ce_w)
        (scale * (5.0 * kl + 2.0 * ce)).backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])
    ref = reference_grad(s, t, labels, None, 2.0, 5.0, 2.0, 65536.0 / 4)
    assert element_errors(grads[0], ref)[1] <= 1.5 * element_errors(ref.half(), ref)[1]
    for bad in (torch.ones(2, device=device), torch.ones((), dtype=torch.int64, device=device)):
        with pytest.raises((TypeError, ValueError), match="kl_weight"):
            two_part(s, t, labels, kl_weight=bad)


def test_distillation_loss_announces_a_grad_scale(device):
    """DistillationLoss(..., grad_scale=g) prepares the gradient of g * total: exact, and the backward
    of exactly that product is free (the trainer announces GradScaler's scale / grad_accum so)."""
    s, t = logits(12, 40, device, dtype=torch.float16), logits(12, 40, device, dtype=torch.float16)
    h, ht = torch.randn(12, 16, device=device).half(), torch.randn(12, 16, device=device).half()
    labels = torch.randint(0, 40, (12,), device=device)
    labels[::3] = -100
    g = torch.full((), 65536.0, device=device) * (1 / 8)
    x, hx = s.clone().requires_grad_(), h.clone().requires_grad_()
    out = DistillationLoss()(x, t, labels, hx, ht, grad_scale=g)
    (out.total * g).backward()
    sd, hd = s.double().requires_grad_(), h.double().requires_grad_()
    total, _, _, _ = reference.distiller_loss(sd, t.double(), labels, hd, ht.double(), None)
    (total * 65536.0 / 8).backward()
    assert element_errors(x.grad, sd.grad)[1] <= 1.5 * element_errors(sd.grad.half(), sd.grad)[1]
    assert element_errors(hx.grad, hd.grad)[1] <= 1.5 * element_errors(hd.grad.half(), hd.grad)[1]


# ------------------------------------------------------------------------------------------------
# 3. create_graph=True: no silent first-order-only gradient
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["kl_div", "kl_ce", "topk_kl_ce", "cosine", "triple"])
def test_create_graph_raises(loss):
    s = logits(4, 12, "cpu").requires_grad_()
    t = logits(4, 12, "cpu")
    labels = torch.tensor([1, -100, 3, 4])
    value = {"kl_div": lambda: kl_div_loss(s, t),
             "kl_ce": lambda: sum(kl_ce_loss(s, t, labels)),
             "topk_kl_ce": lambda: sum(topk_kl_ce_as_dense(s, t, labels)),
             "cosine": lambda: cosine_loss(s, t),
             "triple": lambda: DistillationLoss()(s, t, labels, s, t).total}[loss]()
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(value, s, create_graph=True)


# ------------------------------------------------------------------------------------------------
# 4. torch.compile(fullgraph=True) when a float argument changes (and with dynamic=True)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dynamic", [None, True])
def test_compile_with_changing_floats(dynamic):
    s, t = logits(6, 40, "cpu"), logits(6, 40, "cpu")
    labels = torch.randint(0, 40, (6,))
    loss_fn = DistillationLoss(cos_weight=0.0)

    @torch.compile(fullgraph=True, backend="aot_eager", dynamic=dynamic)
    def module_step(s):
        return loss_fn(s, t, labels).total

    @torch.compile(fullgraph=True, backend="aot_eager", dynamic=dynamic)
    def function_step(s, kl_weight, temperature):
        kl, ce = kl_ce_loss(s, t, labels, temperature=temperature, kl_weight=kl_weight, ce_weight=2.0)
        return kl_weight * kl + 2.0 * ce

    @torch.compile(fullgraph=True, backend="aot_eager", dynamic=dynamic)
    def topk_step(s, kl_weight, temperature):
        kl, ce = topk_kl_ce_as_dense(s, t, labels, temperature=temperature, kl_weight=kl_weight, ce_weight=2.0)
        return kl_weight * kl + 2.0 * ce

    for temperature, kl_weight in ((2.0, 5.0), (3.0, 5.0), (3.0, 4.0)):
        loss_fn.temperature = temperature
        x, y, z = s.clone().requires_grad_(), s.clone().requires_grad_(), s.clone().requires_grad_()
        module_step(x).backward()
        function_step(y, kl_weight, temperature).backward()
        topk_step(z, kl_weight, temperature).backward()
        sd = s.double().requires_grad_()
        kl, ce = reference.kl_ce_rows(sd, t.double(), labels, None, temperature)
        (5.0 * kl.mean() + 2.0 * ce.mean()).backward()
        assert relative_error(x.grad, sd.grad) <= 1e-5
        sd.grad = None
        kl, ce = reference.kl_ce_rows(sd, t.double(), labels, None, temperature)
        (kl_weight * kl.mean() + 2.0 * ce.mean()).backward()
        assert relative_error(y.grad, sd.grad) <= 1e-5
        assert relative_error(z.grad, sd.grad) <= 1e-5


# ------------------------------------------------------------------------------------------------
# 5. Cross-entropy (and KL) at large logits
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("two_part", [kl_ce_loss, topk_kl_ce_as_dense], ids=TWO_PART_LOSSES.keys())
@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_large_logits_are_exact(device, offset, two_part):
    """log z + (max - s[y]), and the KL from logit differences: as exact as eager fp32 (3e-7)."""
    s = logits(8, 100, device, scale=1.0) + offset
    t = logits(8, 100, device, scale=1.0) + offset
    labels = torch.randint(0, 100, (8,), device=device)
    kl, ce = two_part(s, t, labels)
    ref_kl, ref_ce = reference.kl_ce_rows(s.double(), t.double(), labels, None, 2.0)
    assert abs(ce.item() - ref_ce.mean().item()) <= 2e-6
    assert abs(kl.item() - ref_kl.mean().item()) <= 2e-6 * max(ref_kl.mean().item(), 1.0)


# ------------------------------------------------------------------------------------------------
# 6. Large temperatures: never negative, at least eager fp32's accuracy up to T = 1000
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [10.0, 100.0, 1000.0])
def test_large_temperatures_are_as_accurate_as_eager(device, temperature):
    vocab = 4096
    s, t = logits(4, vocab, device), logits(4, vocab, device)
    rows = kl_div_loss(s, t, temperature=temperature, reduction="none")
    ref, _ = reference.kl_ce_rows(s.double(), t.double(), None, None, temperature)
    eager = F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1),
                     reduction="none").sum(-1) * temperature**2
    ours_err = ((rows.double() - ref).abs() / ref).max().item()
    eager_err = ((eager.double() - ref).abs() / ref).max().item()
    assert ours_err <= max(eager_err, 1e-5), (ours_err, eager_err)


@pytest.mark.parametrize("temperature", [1e4, 1e6])
def test_huge_temperatures_never_give_a_negative_kl(device, temperature):
    s, t = logits(4, 4096, device), logits(4, 4096, device)
    rows = kl_div_loss(s, t, temperature=temperature, reduction="none")
    assert (rows >= 0).all() and torch.isfinite(rows).all(), rows


@pytest.mark.parametrize("temperature", [1e4, 1e6])
def test_huge_temperatures_top_k_at_k_equal_v_is_the_dense_kl(device, temperature):
    s, t = logits(4, 4096, device), logits(4, 4096, device)
    dense = kl_div_loss(s, t, temperature=temperature)
    labels = torch.full((4,), -100, device=device)
    values, index = t.topk(4096, dim=-1)
    for lse in (None, torch.logsumexp(t.double() / temperature, -1).float()):
        kl, _ = topk_kl_ce_loss(s, values, index, labels, teacher_lse=lse, temperature=temperature)
        assert kl >= 0 and abs(kl - dense) <= 1e-2 * dense, (lse is None, kl, dense)


# ------------------------------------------------------------------------------------------------
# 7. Temperatures outside float32 (the kernels' precision) are rejected
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e39, 1e30])
def test_temperature_outside_float32_is_rejected(temperature):
    s, t = logits(2, 8, "cpu"), logits(2, 8, "cpu")
    with pytest.raises(ValueError, match="temperature"):
        kl_div_loss(s, t, temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        topk_kl_ce_loss(s, *t.topk(3, dim=-1), torch.tensor([1, 2]), temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(temperature=temperature)


# ------------------------------------------------------------------------------------------------
# 8. Inputs as the ecosystem builds them
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_masks_select_like_bool(device, mask_dtype):
    """Hugging Face's attention_mask is int64 0/1: nonzero = selected, everywhere a mask is taken."""
    s, t = logits(2 * 5, 30, device).view(2, 5, 30), logits(2 * 5, 30, device).view(2, 5, 30)
    h, ht = torch.randn(2, 5, 8, device=device), torch.randn(2, 5, 8, device=device)
    labels = torch.randint(0, 30, (2, 5), device=device)
    labels[:, ::2] = -100
    attention = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], device=device)
    as_int, as_bool = attention.to(mask_dtype), attention.bool()
    assert torch.equal(kl_div_loss(s, t, mask=as_int), kl_div_loss(s, t, mask=as_bool))
    for two_part in TWO_PART_LOSSES.values():
        assert torch.equal(torch.stack(two_part(s, t, labels, kl_mask=as_int)),
                           torch.stack(two_part(s, t, labels, kl_mask=as_bool)))
    assert torch.equal(cosine_loss(h, ht, mask=as_int), cosine_loss(h, ht, mask=as_bool))
    loss_fn = DistillationLoss()
    assert torch.equal(torch.stack(loss_fn(s, t, labels, h, ht, as_int)),
                       torch.stack(loss_fn(s, t, labels, h, ht, as_bool)))
    rows, index, count = masked_gather(h, as_int)
    ref_rows, ref_index, ref_count = masked_gather(h, as_bool)
    assert torch.equal(rows, ref_rows) and torch.equal(index, ref_index) and count == ref_count


def test_float_masks_are_rejected():
    s, t = logits(4, 10, "cpu"), logits(4, 10, "cpu")
    h = torch.randn(4, 8)
    mask = torch.ones(4)
    for call, name in ((lambda: kl_div_loss(s, t, mask=mask), "mask"),
                       (lambda: kl_ce_loss(s, t, torch.zeros(4, dtype=torch.long), kl_mask=mask), "kl_mask"),
                       (lambda: topk_kl_ce_as_dense(s, t, torch.zeros(4, dtype=torch.long), kl_mask=mask), "kl_mask"),
                       (lambda: cosine_loss(h, h, mask=mask), "mask"),
                       (lambda: masked_gather(h, mask), "mask"),
                       (lambda: DistillationLoss()(s, t, torch.zeros(4, dtype=torch.long), h, h, mask),
                        "attention_mask")):
        with pytest.raises(TypeError, match=name):
            call()


def test_numpy_scalars_are_accepted_like_python_numbers():
    s, t = logits(4, 10, "cpu"), logits(4, 10, "cpu")
    labels = torch.tensor([1, -100, 3, 4])
    assert torch.equal(kl_div_loss(s, t, temperature=np.float32(2.0)), kl_div_loss(s, t, temperature=2.0))
    for two_part in TWO_PART_LOSSES.values():
        assert torch.equal(torch.stack(two_part(s, t, labels, ignore_index=np.int64(-100), kl_weight=np.float32(5),
                                                ce_weight=np.float64(2), temperature=np.float32(2.0))),
                           torch.stack(two_part(s, t, labels, kl_weight=5.0, ce_weight=2.0)))
    assert torch.equal(cosine_loss(s, t, weight=np.float32(1.0)), cosine_loss(s, t))
    loss_fn = DistillationLoss(kl_weight=np.float32(5.0), ce_weight=np.int64(2), cos_weight=np.float16(0.0),
                               temperature=np.float32(2.0))
    assert torch.equal(loss_fn(s, t, labels).total, DistillationLoss(cos_weight=0.0)(s, t, labels).total)
    with pytest.raises(TypeError, match="temperature"):
        kl_div_loss(s, t, temperature=np.bool_(True))


def test_out_of_range_label_without_kl_is_the_same_value_error():
    s = logits(3, 50, "cpu")
    labels = torch.tensor([50, 1, -100])
    for loss_fn in (DistillationLoss(kl_weight=0.0, cos_weight=0.0), DistillationLoss(cos_weight=0.0)):
        with pytest.raises(ValueError, match="labels"):
            loss_fn(s, logits(3, 50, "cpu"), labels)


def test_restrict_kl_to_mask_selects_the_rows_distiller_selects():
    """distiller.py's --restrict_ce_to_mask takes the KL rows where labels > -1, without the attention
    mask: a labelled padding position (which Hugging Face's collators never make) still counts."""
    s, t = logits(2 * 4, 20, "cpu").view(2, 4, 20), logits(2 * 4, 20, "cpu").view(2, 4, 20)
    h = torch.randn(2, 4, 8)
    attention = torch.tensor([[True, True, True, False], [True, True, False, False]])
    labels = torch.tensor([[3, -100, 5, 7], [-100, 2, 9, -100]])  # 7 and 9 sit on padding
    out = DistillationLoss(restrict_kl_to_mask=True)(s, t, labels, h, h + 1, attention)
    ref = reference.distiller_loss(s.double(), t.double(), labels, h.double(), (h + 1).double(), attention,
                                   restrict_kl_to_mask=True)
    for ours, theirs in zip(out, ref):
        assert relative_error(ours, theirs) <= 1e-5


# ------------------------------------------------------------------------------------------------
# 9. opcheck: which tests run for the gradient-writing ops, and why one cannot
# ------------------------------------------------------------------------------------------------
def test_aot_dispatch_of_the_exposed_gradient_buffer_is_unsupported():
    """With compute_grad=True the op returns its gradient buffer and the backward rewrites that buffer
    in place (it becomes the gradient, at no cost). A traced graph that returns the buffer as an
    output would have to return a value the backward changes afterwards: AOTAutograd cannot split
    such a graph ("Node ... was invalid, but is output"). The public functions never return the
    buffer, so their compiled graphs partition (tests/test_ops.py compiles them)."""
    s, t = logits(4, 24, "cpu"), logits(4, 24, "cpu")
    args = (s.requires_grad_(), t, torch.tensor([1, -100, 3, 4]), None, torch.tensor([0.5, 0.5]), 2.0, -100, True)
    with pytest.raises(Exception, match="invalid, but is output"):
        torch.library.opcheck(torch.ops.distil.kl_ce_rows.default, args, test_utils=("test_aot_dispatch_dynamic",))
