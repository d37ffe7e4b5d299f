"""distil::cosine_rows: the C++ CPU kernel and the Triton kernel (interpreter here, CUDA on a GPU run)
against the float64 reference (distil.reference.cosine_rows: nn.CosineEmbeddingLoss with target +1,
never F.cosine_similarity, whose epsilon differs) on one set of ``sample_inputs()`` feeding the
forward, gradient and opcheck tests; then the public cosine_loss, torch.compile and sm_80/sm_90 builds."""
from typing import NamedTuple, Optional

import pytest
import torch
import torch.nn.functional as F

from distil import fused_loss, reference
from distil.kernels import cosine as K

from aot import compile_reports, launch_spec, main_loop_widths
from helpers import API_DEVICES, GPU_RUN, TOL, RecordOps, nan_empty, relative_error, rows_past_int32


class Sample(NamedTuple):
    name: str
    x: torch.Tensor
    y: torch.Tensor
    mask: Optional[torch.Tensor]


def make_hidden(shape, h, s_dtype=torch.float32, t_dtype=torch.float32, device="cpu", mask_frac=0.7):
    """Random hidden states over the row shape ``shape``; [B, S] ones are strided views (padded H,
    transposed batch), not copies. Half of the teacher rows are near the student (cos close to 1)."""
    if len(shape) == 2:
        b, s = shape
        x = torch.randn(s, b, h + 3, device=device).to(s_dtype).transpose(0, 1)[..., :h]
        y = torch.randn(b, s + 1, h, device=device).to(t_dtype)[:, :s]
    else:
        x = torch.randn(*shape, h, device=device).to(s_dtype)
        y = torch.randn(*shape, h, device=device).to(t_dtype)
    y = torch.where(torch.rand(*shape, 1, device=device) < 0.5, y, (x.float() + 0.3 * y.float()).to(t_dtype))
    mask = torch.rand(shape, device=device) < mask_frac
    return x, y, mask


def sample_inputs(device="cpu"):
    """H from 1 to a streamed 9000 (every tuning entry kind: packed rows, one row per program,
    chunks), the dtype pairs, [B, S, H] views, with and without a mask."""
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    out = []
    for h, shape, a, b, use_mask in ((1, (6,), f32, f32, False), (7, (6,), bf16, bf16, True),
                                     (384, (2, 3), f16, f32, True), (768, (6,), f32, f32, True),
                                     (1024, (2, 3), bf16, bf16, True), (4096, (2,), f32, bf16, False),
                                     (9000, (2,), bf16, f32, True)):
        x, y, mask = make_hidden(shape, h, a, b, device)
        out.append(Sample(f"H={h} {str(a)[6:]}/{str(b)[6:]}{' masked' if use_mask else ''}", x, y,
                          mask if use_mask else None))
    # Streamed rows of odd width, contiguous and 8 elements apart: cut at a different column each.
    x, y, mask = make_hidden((3,), 8195, f32, bf16, device)
    out.append(Sample("H=8195 float32/bfloat16 masked", x, y, mask))
    x = torch.randn(3, 8205, device=device).to(bf16)[:, :8197]
    y = torch.randn(3, 8205, device=device).to(bf16)[:, :8197]
    out.append(Sample("H=8197 stride 8205", x, y, None))
    return out


SAMPLE_NAMES = [x.name for x in sample_inputs()]


def expected(x, y, mask, g):
    """float64 per-row losses and the gradient of sum(g_r * loss_r) w.r.t. x."""
    xd = x.detach().double().requires_grad_()
    rows = reference.cosine_rows(xd, y.double(), mask)
    (rows * torch.as_tensor(g).double()).sum().backward()
    return rows.detach(), xd.grad


def distiller_cosine(s, t, mask):
    """distiller.py's loss_cos in float64: the mask's rows (all without one), CosineEmbeddingLoss."""
    s, t = s.double(), t.double()
    rows = torch.ones(s.shape[:-1], dtype=torch.bool, device=s.device) if mask is None else mask
    return reference.distiller_cos(reference.select_rows(s, rows), reference.select_rows(t, rows))


def forward(impl, x, y, mask, coef, compute_grad=True):
    if impl == "cpu":
        return torch.ops.distil.cosine_rows(x, y, mask, coef, compute_grad)
    # The Triton launcher into NaN-filled outputs (every element must be written).
    loss = nan_empty(x.shape[:-1], torch.float32, x.device)
    grad = nan_empty(x.shape, x.dtype, x.device) if compute_grad else None
    K.cosine_rows(x, y, None if mask is None else mask.contiguous(), coef, loss, grad)
    return loss, grad


def backward(impl, grad, g, x, y, mask, coef):
    if impl == "cpu":
        torch.ops.distil.cosine_rows_backward(grad, g, x, y, mask, coef)
    else:
        K.cosine_rows_backward(grad, g.contiguous(), x, y, None if mask is None else mask.contiguous(), coef)


def grad_error(grad, ref, x, y, coef):
    """Relative error, except for H = 1 where d(1 − cos)/dx = y/d − cos·x/a is a difference of two
    nearly equal terms (cos = ±1): there the error is measured against the size of those terms."""
    if x.shape[-1] > 1:
        return relative_error(grad, ref)
    x64, y64 = x.double(), y.double()
    a = (x64 * x64).sum(-1, keepdim=True) + 1e-12
    d = (a * ((y64 * y64).sum(-1, keepdim=True) + 1e-12)).sqrt()
    scale = (coef * y64.abs() / d).norm()
    return ((grad.double() - ref).norm() / scale).item()


# ----------------------------------------------------------------------------------------------
# Every sample through both kernels: forward (with the gradient it writes), backward, opcheck
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["cpu", "triton"])
@pytest.mark.parametrize("index", range(len(SAMPLE_NAMES)), ids=SAMPLE_NAMES)
def test_forward_matches_float64(triton_device, impl, index):
    x, y, mask = sample_inputs("cpu" if impl == "cpu" else triton_device)[index][1:]
    coef = torch.tensor([0.7], device=x.device)
    loss, grad = forward(impl, x, y, mask, coef)
    ref_loss, ref_grad = expected(x, y, mask, 0.7)
    assert grad.dtype == x.dtype and grad.shape == x.shape and grad.is_contiguous()
    assert loss.dtype == torch.float32 and loss.shape == x.shape[:-1]
    assert relative_error(loss, ref_loss) <= TOL[x.dtype]
    assert grad_error(grad, ref_grad, x, y, 0.7) <= TOL[x.dtype]
    if mask is not None:
        assert (loss[~mask] == 0).all() and (grad[~mask] == 0).all()
    loss, grad = forward(impl, x, y, mask, coef, compute_grad=False)
    assert grad is None or grad.numel() == 0
    assert relative_error(loss, ref_loss) <= TOL[x.dtype]


@pytest.mark.parametrize("impl", ["cpu", "triton"])
@pytest.mark.parametrize("upstream", ["coef", "arbitrary", "zero coef"])
@pytest.mark.parametrize("index", range(len(SAMPLE_NAMES)), ids=SAMPLE_NAMES)
def test_backward_matches_float64(triton_device, impl, upstream, index):
    """The backward leaves the forward's gradient untouched when g equals coef, scales it otherwise,
    and recomputes the rows where coef was 0 (nothing to scale)."""
    x, y, mask = sample_inputs("cpu" if impl == "cpu" else triton_device)[index][1:]
    rows = x.shape[:-1]
    coef = torch.tensor([0.0 if upstream == "zero coef" else 0.25], device=x.device)
    grad = forward(impl, x, y, mask, coef)[1]
    g = coef.expand(rows) if upstream == "coef" else torch.randn(rows, device=x.device)
    before = grad.clone()
    backward(impl, grad, g, x, y, mask, coef)
    if upstream == "coef":
        assert torch.equal(grad, before)
    _, ref = expected(x, y, mask, g)
    assert grad_error(grad, ref, x, y, g.abs().max().item()) <= TOL[x.dtype]


@pytest.mark.parametrize("index", range(len(SAMPLE_NAMES)), ids=SAMPLE_NAMES)
def test_opcheck(index):
    _, x, y, mask = sample_inputs()[index]
    coef = torch.tensor([0.5])
    for compute_grad in (False, True):
        torch.library.opcheck(torch.ops.distil.cosine_rows.default, (x, y, mask, coef, compute_grad))
    # With autograd the op hands its own gradient output to the backward, which rewrites it in
    # place (ARCHITECTURE.md); opcheck's AOT test returns that output to the caller, which the
    # partitioner rejects.  The public function never exposes it: test_torch_compile_fullgraph
    # covers AOT autograd through it.
    torch.library.opcheck(torch.ops.distil.cosine_rows.default, (x.clone().requires_grad_(), y, mask, coef, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    grad = torch.ops.distil.cosine_rows(x, y, mask, coef, True)[1]
    torch.library.opcheck(torch.ops.distil.cosine_rows_backward.default,
                          (grad, torch.rand(x.shape[:-1]), x, y, mask, coef))


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
    loss, grad = forward(impl, x, y, None, coef)
    ref_loss, ref_grad = expected(x, y, None, coef.expand(6))
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
    loss, grad = forward("triton", x, y, None, coef)
    ref_loss, ref_grad = expected(x, y, None, coef.expand(2))
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


def test_torch_compile_fullgraph():
    x, y, mask = make_hidden((2, 4), 40)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, y, mask):
        return 2.0 * fused_loss.cosine_loss(x, y, mask=mask, weight=2.0)

    x1 = x.detach().clone().requires_grad_()
    out = step(x1, y, mask)
    out.backward()
    xd = x.detach().double().requires_grad_()
    ref = 2.0 * distiller_cosine(xd, y, mask)
    ref.backward()
    assert relative_error(out, ref) <= 1e-5
    assert relative_error(x1.grad, xd.grad) <= 1e-5


# ----------------------------------------------------------------------------------------------
# Real GPU builds, specialised as Triton specialises a real launch (tests/aot.py): every tuning entry
# of both kernels without spills on sm_80 and sm_90; 128-bit accesses in the main loops of the
# streamed rows at odd and even widths, for every dtype.
# ----------------------------------------------------------------------------------------------
WIDTHS = (30522, 50257, 32000, 128256)


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _launch_specs(h, s_dtype, t_dtype, cc, rows=16384):
    """(forward, backward) specs of a launch on [rows, h] hidden states, from the launchers themselves."""
    x, y, dx = _meta(rows, h, dtype=s_dtype), _meta(rows, h, dtype=t_dtype), _meta(rows, h, dtype=s_dtype)
    mask, coef, loss = _meta(rows, dtype=torch.bool), _meta(1), _meta(rows)
    launches = ((K.cosine_fwd_kernel, K.fwd_launch(x, y, mask, coef, loss, dx)),
                (K.cosine_bwd_kernel, K.bwd_launch(dx, loss, x, y, mask, coef)))
    return [launch_spec(kernel, "distil.kernels.cosine", args, cc=cc, **options)
            for kernel, (_, args, options) in launches]


@pytest.mark.skipif(GPU_RUN, reason="ahead-of-time builds are checked on the CPU machine")
def test_sm80_sm90_builds_have_128_bit_main_loops_and_no_spills():
    """Every tuning-table entry, fp32 (widest loads, most registers) on sm_80 and bf16 on sm_90, fp16
    with an fp32 teacher at H = 768; the streamed rows at every width above in every dtype on both."""
    vector_specs = [spec for h in WIDTHS for dt in (torch.float32, torch.bfloat16, torch.float16) for cc in (80, 90)
                    for spec in _launch_specs(h, dt, dt, cc)]
    other_specs = [spec for max_h in [e[0] for e in K.TUNING]
                   for dt, cc in ((torch.float32, 80), (torch.bfloat16, 90))
                   for spec in _launch_specs(max_h, dt, dt, cc)]
    other_specs += [spec for cc in (80, 90) for spec in _launch_specs(768, torch.float16, torch.float32, cc)]
    specs = vector_specs + other_specs
    reports = compile_reports(specs)
    spilled = [(s["kernel"], s["constexprs"]["BLOCK_H"], s["signature"]["x_ptr"], s["cc"], r)
               for s, r in zip(specs, reports) if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, spilled
    assert {r["arch"] for r in reports} == {"sm_80", "sm_90a"}
    for spec, report in zip(vector_specs, reports):
        in_loop, outside = main_loop_widths(report)
        where = (spec["kernel"], spec["signature"]["x_ptr"], spec["signature"]["H"], spec["cc"])
        assert in_loop and set(in_loop) == {128}, (where, in_loop)
