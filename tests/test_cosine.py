"""distil::cosine_rows beyond the generic families of tests/test_ops.py (samples in tests/opinfo.py): the
epsilon of nn.CosineEmbeddingLoss at zero and tiny norms, int64 row offsets; then the public cosine_loss
against distiller.py's loss_cos."""
import pytest
import torch
import torch.nn.functional as F

from distil import fused_loss, reference

from helpers import API_DEVICES, TOL, RecordOps, relative_error, rows_past_int32
from opinfo import COSINE, cosine_sample, expected, forward, make_hidden


def distiller_cosine(s, t, mask):
    """distiller.py's loss_cos in float64: the mask's rows (all without one), CosineEmbeddingLoss."""
    s, t = s.double(), t.double()
    rows = torch.ones(s.shape[:-1], dtype=torch.bool, device=s.device) if mask is None else mask
    return reference.distiller_cos(reference.select_rows(s, rows), reference.select_rows(t, rows))


# ----------------------------------------------------------------------------------------------
# Kernel-specific cases
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["triton", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_vectors_and_tiny_norms(triton_device, impl, dtype):
    """CosineEmbeddingLoss adds 1e-12 to each squared norm: a zero student gives cos 0 (loss 1) and
    gradient -y/sqrt(1e-12·(|y|²+1e-12)); norms near 1e-6 shift cos noticeably, unlike
    F.cosine_similarity, which clamps each norm at 1e-8."""
    device = triton_device if impl == "triton" else "cpu"
    h = 16
    # Drawn on the CPU (the same numbers on every device): the last check below needs a draw where the
    # two conventions differ by more than 1e-2.
    x = torch.randn(6, h).to(device)
    y = torch.randn(6, h).to(device)
    x[0] = 0  # zero student
    y[1] = 0  # zero teacher
    x[2], y[2] = 0, 0  # both zero: loss 1, gradient 0
    x[3] *= 1e-7  # |x|² ~ 1.6e-13, comparable to the epsilon
    x[4] *= 1e-7
    y[4] *= 1e-7
    x, y = x.to(dtype), y.to(dtype)
    coef = torch.tensor([1.0], device=device)
    sample = cosine_sample("zero norms", x, y, None)
    loss, grad = forward(COSINE, impl, sample, coef)
    (ref_loss,), ref_grad = expected(COSINE, sample, [coef.expand(6)])
    assert torch.isfinite(grad).all()
    assert loss[0].item() == 1.0 and loss[1].item() == 1.0 and loss[2].item() == 1.0
    assert (grad[2] == 0).all()
    assert relative_error(loss, ref_loss) <= TOL[dtype]
    assert relative_error(grad, ref_grad) <= TOL[dtype]
    # The two epsilon conventions really differ on these rows, so the check above can tell them apart.
    sim = 1 - F.cosine_similarity(x.double(), y.double(), dim=-1)
    assert (sim[3:5] - ref_loss[3:5]).abs().min() > 1e-2


def test_kernel_int64_row_offsets(triton_device):
    """Row 1 starts past element 2**31 (int64 offsets)."""
    h = 64
    x = rows_past_int32(h, torch.bfloat16, triton_device)
    y = torch.randn(2, h, device=triton_device)
    coef = torch.tensor([1.0], device=triton_device)
    sample = cosine_sample("past 2**31", x, y, None)
    loss, grad = forward(COSINE, "triton", sample, coef)
    (ref_loss,), ref_grad = expected(COSINE, sample, [coef.expand(2)])
    assert relative_error(loss, ref_loss) <= 1e-2 and relative_error(grad, ref_grad) <= 1e-2


# ----------------------------------------------------------------------------------------------
# Public API (CPU C++ kernel here; CUDA Triton kernel on a GPU run)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", API_DEVICES)
@pytest.mark.parametrize("three_d", [False, True])
@pytest.mark.parametrize("s_dtype,t_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float32, torch.float16)])
@pytest.mark.parametrize("use_mask", [False, True])
def test_cosine_loss_matches_distiller(device, three_d, s_dtype, t_dtype, use_mask):
    x, y, mask = make_hidden((2, 5) if three_d else (10,), 96, s_dtype, t_dtype, device)
    mask = mask if use_mask else None
    x.requires_grad_()
    loss = fused_loss.cosine_loss(x, y, mask=mask, weight=1.5)
    (1.5 * loss).backward()
    xd = x.detach().double().requires_grad_()
    ref = distiller_cosine(xd, y, mask)
    (1.5 * ref).backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert relative_error(loss, ref) <= TOL[s_dtype]
    assert relative_error(x.grad, xd.grad) <= TOL[s_dtype]
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("device", API_DEVICES)
@pytest.mark.parametrize("upstream", [1.0, -0.3, 0.0])
@pytest.mark.parametrize("weight", [1.0, 0.0])
def test_any_upstream_gradient_is_exact(device, upstream, weight):
    x, y, mask = make_hidden((2, 4), 50, device=device)
    x.requires_grad_()
    (upstream * fused_loss.cosine_loss(x, y, mask=mask, weight=weight)).backward()
    xd = x.detach().double().requires_grad_()
    (upstream * distiller_cosine(xd, y, mask)).backward()
    if upstream == 0.0:
        assert torch.equal(x.grad, torch.zeros_like(x))
    else:
        assert relative_error(x.grad, xd.grad) <= 1e-5


@pytest.mark.parametrize("device", API_DEVICES)
@pytest.mark.parametrize("rows", [7, 23, 49])
def test_backward_is_free_for_the_announced_weight(device, rows):
    """backward() of weight·loss hands the op exactly coef per row, so the forward's buffer becomes
    the gradient untouched (a rescale by a ratio of 1 ± 1 ulp would change some of its bits)."""
    x, y, mask = make_hidden((rows,), 30, device=device)
    x.requires_grad_()
    (0.3 * fused_loss.cosine_loss(x, y, mask=mask, weight=0.3)).backward()
    coef = torch.full((1,), 0.3, device=device) / mask.sum().clamp(min=1).float()
    _, grad = torch.ops.distil.cosine_rows(x.detach(), y, mask, coef, True)
    assert torch.equal(x.grad, grad)


@pytest.mark.parametrize("device", API_DEVICES)
def test_no_selected_rows_gives_exact_zeros(device):
    x, y, _ = make_hidden((2, 2), 20, device=device)
    x.requires_grad_()
    loss = fused_loss.cosine_loss(x, y, mask=torch.zeros(x.shape[:-1], dtype=torch.bool, device=device))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
    empty = torch.randn(0, 20, device=device, requires_grad=True)
    loss = fused_loss.cosine_loss(empty, torch.randn(0, 20, device=device))
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, 20)


def test_teacher_gets_no_gradient_and_no_grad_mode():
    x, y, _ = make_hidden((4,), 20)
    x.requires_grad_()
    y.requires_grad_()
    fused_loss.cosine_loss(x, y).backward()
    assert y.grad is None and x.grad is not None
    with torch.no_grad(), RecordOps() as ops:
        loss = fused_loss.cosine_loss(x, y)
    ((args, out),) = ops.of(torch.ops.distil.cosine_rows.default)
    assert args[4] is False and out[1].numel() == 0  # no gradient asked for, none written
    assert relative_error(loss, distiller_cosine(x.detach(), y.detach(), None)) <= 1e-5


def test_second_backward_raises():
    x, y, _ = make_hidden((4,), 20)
    x.requires_grad_()
    loss = fused_loss.cosine_loss(x, y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated once"):
        loss.backward()


def test_bad_inputs_name_the_argument():
    x, y, mask = make_hidden((2, 3), 10)
    with pytest.raises(ValueError, match="project"):
        fused_loss.cosine_loss(x, torch.randn(2, 3, 12))
    with pytest.raises(ValueError, match="teacher_hidden"):
        fused_loss.cosine_loss(x, torch.randn(3, 2, 10))
    with pytest.raises(ValueError, match="teacher_hidden"):
        fused_loss.cosine_loss(x, y.reshape(6, 10))
    with pytest.raises(TypeError, match="student_hidden"):
        fused_loss.cosine_loss(x.double(), y)
    with pytest.raises(TypeError, match="teacher_hidden"):
        fused_loss.cosine_loss(x, [1.0])
    with pytest.raises(ValueError, match="student_hidden"):
        fused_loss.cosine_loss(x[0, 0], y[0, 0])
    with pytest.raises(TypeError, match="mask"):
        fused_loss.cosine_loss(x, y, mask=mask.float())  # integer masks are accepted, float ones not
    with pytest.raises(ValueError, match="mask"):
        fused_loss.cosine_loss(x, y, mask=mask.T)
    with pytest.raises(ValueError, match="weight"):
        fused_loss.cosine_loss(x, y, weight=-1.0)
    with pytest.raises(ValueError, match="weight"):
        fused_loss.cosine_loss(x, y, weight=float("inf"))
    with pytest.raises(ValueError, match="student_hidden.*contiguous"):
        fused_loss.cosine_loss(x.transpose(1, 2).contiguous().transpose(1, 2), y)
