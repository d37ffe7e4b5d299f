"""distil::cosine_rows: the Triton kernel (interpreter here, CUDA on a GPU run), the C++ CPU kernel,
the public cosine_loss, autograd, opcheck, torch.compile, and sm_80/sm_90 builds.  References are
float64 nn.CosineEmbeddingLoss (target +1), never F.cosine_similarity (whose epsilon differs)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from aot import compile_reports
from conftest import GPU_RUN, relative_error, rows_past_int32

from distil import _cosine_op, fused_loss  # noqa: F401  (_cosine_op registers fake impl + autograd)
from distil.kernels import cosine as K

API_DEVICES = ["cpu"] + (["cuda"] if GPU_RUN else [])
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def reference_rows(x, y, mask=None):
    """float64 per-row nn.CosineEmbeddingLoss(reduction="none") with target +1; 0 where mask is False."""
    x64, y64 = x.double(), y.double()
    h = x.shape[-1]
    rows = nn.CosineEmbeddingLoss(reduction="none")(
        x64.reshape(-1, h), y64.reshape(-1, h), torch.ones(x64.shape[:-1].numel(), dtype=torch.float64, device=x.device)
    ).reshape(x.shape[:-1])
    return rows if mask is None else torch.where(mask, rows, torch.zeros_like(rows))


def expected(x, y, mask, g):
    """float64 per-row losses and the gradient of Σ g_r·loss_r w.r.t. x."""
    xd = x.detach().double().requires_grad_()
    rows = reference_rows(xd, y, mask)
    (rows * g.double()).sum().backward()
    return rows.detach(), xd.grad


def distiller_cosine(s, t, mask):
    """distiller.py's loss_cos: masked_select on the [B, S, H]-expanded mask, then
    nn.CosineEmbeddingLoss(reduction="mean") with target +1, in float64."""
    s, t = s.double(), t.double()
    h = s.shape[-1]
    if mask is not None:
        sel = mask.unsqueeze(-1).expand_as(s)
        s, t = torch.masked_select(s, sel).view(-1, h), torch.masked_select(t, sel).view(-1, h)
    s, t = s.reshape(-1, h), t.reshape(-1, h)
    return nn.CosineEmbeddingLoss(reduction="mean")(s, t, torch.ones(s.shape[0], dtype=torch.float64, device=s.device))


def make_hidden(rows, h, s_dtype=torch.float32, t_dtype=torch.float32, device="cpu", three_d=False, mask_frac=0.7):
    """Random hidden states; the 3-D ones are strided views (padded H, transposed batch), not copies."""
    if three_d:
        b, s = 2, rows // 2
        x = torch.randn(s, b, h + 3, device=device).to(s_dtype).transpose(0, 1)[..., :h]
        y = torch.randn(b, s + 1, h, device=device).to(t_dtype)[:, :s]
        shape = (b, s)
    else:
        x = torch.randn(rows, h, device=device).to(s_dtype)
        y = torch.randn(rows, h, device=device).to(t_dtype)
        shape = (rows,)
    # Half of the teacher rows are near the student (cos close to 1), as after some training.
    y = torch.where(torch.rand(*shape, 1, device=device) < 0.5, y, (x.float() + 0.3 * y.float()).to(t_dtype))
    mask = torch.rand(shape, device=device) < mask_frac
    return x, y, mask


def run_kernel(x, y, mask, coef, compute_grad=True):
    """The Triton launcher into NaN-poisoned buffers (every element must be written)."""
    loss = torch.full(x.shape[:-1], float("nan"), device=x.device)
    grad = torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device) if compute_grad else None
    K.cosine_rows_into(x, y, mask, coef, loss, grad)
    return loss, grad


def run_impl(impl, x, y, mask, coef, compute_grad=True):
    if impl == "triton":
        return run_kernel(x, y, mask, coef, compute_grad)
    return torch.ops.distil.cosine_rows(x, y, mask, coef, compute_grad)


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
# Kernels: Triton through its launcher, and the C++ CPU op
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h", [1, 7, 384, 768, 1024, 4096, 9000])
@pytest.mark.parametrize(
    "s_dtype,t_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)],
)
def test_kernel_matches_float64(triton_device, h, s_dtype, t_dtype):
    three_d = h % 2 == 0
    x, y, mask = make_hidden(6 if h < 4096 else 2, h, s_dtype, t_dtype, triton_device, three_d=three_d)
    mask = mask if three_d else None
    coef = torch.tensor([0.7], device=triton_device)
    loss, grad = run_kernel(x, y, mask, coef)
    ref_loss, ref_grad = expected(x, y, mask, coef.expand(x.shape[:-1]))
    assert grad.dtype == s_dtype and grad.shape == x.shape and grad.is_contiguous()
    assert loss.dtype == torch.float32 and loss.shape == x.shape[:-1]
    assert relative_error(loss, ref_loss) <= TOL[s_dtype]
    assert grad_error(grad, ref_grad, x, y, 0.7) <= TOL[s_dtype]
    if mask is not None:
        assert (loss[~mask] == 0).all() and (grad[~mask] == 0).all()


@pytest.mark.parametrize("impl", ["triton", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_vectors_and_tiny_norms(triton_device, impl, dtype):
    """CosineEmbeddingLoss adds 1e-12 to each squared norm: a zero student gives cos 0 (loss 1) and
    gradient -y/sqrt(1e-12·(|y|²+1e-12)); norms near 1e-6 shift cos noticeably, unlike
    F.cosine_similarity, which clamps each norm at 1e-8."""
    device = triton_device if impl == "triton" else "cpu"
    h = 16
    x = torch.randn(6, h, device=device)
    y = torch.randn(6, h, device=device)
    x[0] = 0  # zero student
    y[1] = 0  # zero teacher
    x[2], y[2] = 0, 0  # both zero: loss 1, gradient 0
    x[3] *= 1e-7  # |x|² ~ 1.6e-13, comparable to the epsilon
    x[4] *= 1e-7
    y[4] *= 1e-7
    x, y = x.to(dtype), y.to(dtype)
    coef = torch.tensor([1.0], device=device)
    loss, grad = run_impl(impl, x, y, None, coef)
    ref_loss, ref_grad = expected(x, y, None, coef.expand(6))
    assert torch.isfinite(grad).all()
    assert loss[0].item() == 1.0 and loss[1].item() == 1.0 and loss[2].item() == 1.0
    assert (grad[2] == 0).all()
    assert relative_error(loss, ref_loss) <= TOL[dtype]
    assert relative_error(grad, ref_grad) <= TOL[dtype]
    # The two epsilon conventions really differ on these rows, so the check above can tell them apart.
    sim = 1 - F.cosine_similarity(x.double(), y.double(), dim=-1)
    assert (sim[3:5] - ref_loss[3:5]).abs().min() > 1e-2


@pytest.mark.parametrize("impl", ["triton", "cpu"])
def test_backward_branches(triton_device, impl):
    device = triton_device if impl == "triton" else "cpu"
    x, y, mask = make_hidden(8, 40, device=device, three_d=True)
    rows = x.shape[:-1]

    def backward(grad, g, coef):
        if impl == "triton":
            K.cosine_rows_backward_(grad, g, x, y, mask, coef)
        else:
            torch.ops.distil.cosine_rows_backward(grad, g, x, y, mask, coef)

    # g == coef: the buffer is left exactly as the forward wrote it.
    coef = torch.tensor([0.25], device=device)
    grad = run_impl(impl, x, y, mask, coef)[1]
    before = grad.clone()
    backward(grad, coef.expand(rows), coef)
    assert torch.equal(grad, before)
    # Any other g: a per-row scale of the forward's gradient.
    g = torch.randn(rows, device=device)
    backward(grad, g, coef)
    _, ref = expected(x, y, mask, g)
    assert relative_error(grad, ref) <= 1e-5
    # coef == 0 left nothing to scale: the rows are recomputed.
    zero = torch.zeros(1, device=device)
    grad = run_impl(impl, x, y, mask, zero)[1]
    assert (grad == 0).all()
    backward(grad, g, zero)
    assert relative_error(grad, ref) <= 1e-5


def test_kernel_without_mask_or_grad(triton_device):
    x, y, _ = make_hidden(5, 33, device=triton_device)
    loss, grad = run_kernel(x, y, None, torch.tensor([1.0], device=triton_device), compute_grad=False)
    assert grad is None
    assert relative_error(loss, reference_rows(x, y)) <= 1e-5


def test_kernel_int64_row_offsets(triton_device):
    """Row 1 starts past element 2**31 (int64 offsets)."""
    h = 64
    x = rows_past_int32(h, torch.bfloat16, triton_device)
    y = torch.randn(2, h, device=triton_device)
    coef = torch.tensor([1.0], device=triton_device)
    loss, grad = run_kernel(x, y, None, coef)
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
    x, y, mask = make_hidden(10, 96, s_dtype, t_dtype, device, three_d=three_d)
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
    x, y, mask = make_hidden(8, 50, device=device, three_d=True)
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
    x, y, mask = make_hidden(rows, 30, device=device)
    x.requires_grad_()
    (0.3 * fused_loss.cosine_loss(x, y, mask=mask, weight=0.3)).backward()
    coef = torch.full((1,), 0.3, device=device) / mask.sum().clamp(min=1).float()
    _, grad = torch.ops.distil.cosine_rows(x.detach(), y, mask, coef, True)
    assert torch.equal(x.grad, grad)


@pytest.mark.parametrize("device", API_DEVICES)
def test_no_selected_rows_gives_exact_zeros(device):
    x, y, _ = make_hidden(4, 20, device=device, three_d=True)
    x.requires_grad_()
    loss = fused_loss.cosine_loss(x, y, mask=torch.zeros(x.shape[:-1], dtype=torch.bool, device=device))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
    empty = torch.randn(0, 20, device=device, requires_grad=True)
    loss = fused_loss.cosine_loss(empty, torch.randn(0, 20, device=device))
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, 20)


def test_teacher_gets_no_gradient_and_no_grad_mode():
    x, y, _ = make_hidden(4, 20)
    x.requires_grad_()
    y.requires_grad_()
    fused_loss.cosine_loss(x, y).backward()
    assert y.grad is None and x.grad is not None
    with torch.no_grad():
        loss = fused_loss.cosine_loss(x, y)
    assert relative_error(loss, distiller_cosine(x.detach(), y.detach(), None)) <= 1e-5


def test_second_backward_raises():
    x, y, _ = make_hidden(4, 20)
    x.requires_grad_()
    loss = fused_loss.cosine_loss(x, y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated once"):
        loss.backward()


def test_bad_inputs_name_the_argument():
    x, y, mask = make_hidden(6, 10, three_d=True)
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
        fused_loss.cosine_loss(x, y, mask=mask.long())
    with pytest.raises(ValueError, match="mask"):
        fused_loss.cosine_loss(x, y, mask=mask.T)
    with pytest.raises(ValueError, match="weight"):
        fused_loss.cosine_loss(x, y, weight=-1.0)
    with pytest.raises(ValueError, match="weight"):
        fused_loss.cosine_loss(x, y, weight=float("inf"))


def test_opcheck():
    x, y, mask = make_hidden(6, 24, three_d=True)
    coef = torch.tensor([0.5])
    for m in (None, mask):
        for compute_grad in (False, True):
            torch.library.opcheck(torch.ops.distil.cosine_rows.default, (x, y, m, coef, compute_grad))
        # With autograd the op hands its own gradient output to the backward, which rewrites it in
        # place (ARCHITECTURE.md); opcheck's AOT test returns that output to the caller, which the
        # partitioner rejects.  The public function never exposes it: test_torch_compile_fullgraph
        # covers AOT autograd through it.
        torch.library.opcheck(torch.ops.distil.cosine_rows.default, (x.clone().requires_grad_(), y, m, coef, True),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    grad = torch.ops.distil.cosine_rows(x, y, mask, coef, True)[1]
    torch.library.opcheck(torch.ops.distil.cosine_rows_backward.default,
                          (grad, torch.rand(x.shape[:-1]), x, y, mask, coef))


def test_torch_compile_fullgraph():
    x, y, mask = make_hidden(8, 40, three_d=True)

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
# Real GPU builds: every tuning-table entry, both kernels, every dtype, sm_80 and sm_90, zero spills
# ----------------------------------------------------------------------------------------------
_CONSTEXPRS = ("HAS_MASK", "COMPUTE_GRAD", "SINGLE", "BLOCK_H", "ROWS")


def _signature(kernel, s_dtype, t_dtype):
    ptrs = {"x_ptr": s_dtype, "y_ptr": t_dtype, "dx_ptr": s_dtype, "mask_ptr": "u8"}
    sig = {}
    for name in kernel.arg_names:
        if name in ptrs:
            sig[name] = "*" + ptrs[name]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in _CONSTEXPRS:
            sig[name] = "constexpr"
        else:
            sig[name] = "i64"
    return sig


@pytest.mark.skipif(GPU_RUN, reason="ahead-of-time builds are checked on the CPU machine")
def test_every_specialisation_compiles_for_sm80_sm90_without_spills():
    """Every tuning-table entry of both kernels, fp32 (widest loads, most registers) on sm_80 and
    bf16 on sm_90; fp16 with an fp32 teacher on both at the H = 768 entry (~1.5 s per build)."""
    builds = {(max_h, dt, cc) for max_h in [e[0] for e in K.TUNING] + [3 * K.CHUNK_H]
              for dt, cc in [(("fp32", "fp32"), 80), (("bf16", "bf16"), 90)]}
    builds |= {(768, ("fp16", "fp32"), cc) for cc in (80, 90)}
    specs, seen = [], set()
    for kernel, config in ((K.cosine_fwd_kernel, K.config_for), (K.cosine_bwd_kernel, K.bwd_config_for)):
        for max_h, (s_dt, t_dt), cc in sorted(builds):
            block_h, rows, warps = config(max_h)
            consts = {"HAS_MASK": True, "COMPUTE_GRAD": True, "SINGLE": max_h <= block_h,
                      "BLOCK_H": block_h, "ROWS": rows}
            consts = {k: v for k, v in consts.items() if k in kernel.arg_names}
            key = (kernel.__name__, tuple(consts.items()), s_dt, t_dt, cc, warps)
            if key in seen:
                continue
            seen.add(key)
            specs.append(dict(module="distil.kernels.cosine", kernel=kernel.__name__,
                              signature=_signature(kernel, s_dt, t_dt), constexprs=consts, cc=cc, num_warps=warps))
    reports = compile_reports(specs)
    spilled = [(s["kernel"], s["constexprs"]["BLOCK_H"], s["signature"]["x_ptr"], s["cc"], r)
               for s, r in zip(specs, reports) if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, spilled
    assert len(reports) == len(specs) and all(r["registers"] > 0 for r in reports)
    assert {r["arch"] for r in reports} >= {"sm_80", "sm_90a"}
