"""The generic test families, run for every op of tests/opinfo.py on both backends: the C++ CPU kernel and
the Triton kernel (the interpreter on CPU tensors here, CUDA on a GPU run), against the float64 reference:
forward (every output written, exact zeros where no term applies), every backward mode, opcheck, the NaN
and empty-input policies, torch.compile of the public function, and the sm_80 / sm_90 builds."""
import pytest
import torch
import triton
import triton.language as tl

from distil._ops.registry import TRITON_IMPLS

from aot import compile_reports, main_loop_widths
from helpers import GPU_RUN, close_to, relative_error, upstream_row_grads
from opinfo import OPS, backward, expected, forward, grad_error, impl_device

NAN = float("nan")
SAMPLES = {op.name: op.sample_inputs() for op in OPS}  # on the CPU, for the parametrisation
CASES = [(op, i) for op in OPS for i in range(len(SAMPLES[op.name]))]
CASE_IDS = [f"{op.name}-{sample.name}" for op in OPS for sample in SAMPLES[op.name]]


def _impls(case):
    """The impls a case (op, ..., sample index last when it has one) runs on: the op's, those that take
    variants for a sample with one."""
    op = case[0]
    if len(case) > 1 and isinstance(case[-1], int) and SAMPLES[op.name][case[-1]].variant:
        return [impl for impl in op.impls if impl in op.variant_impls]
    return op.impls


def with_impls(cases, ids):
    """The parametrize arguments (values, ids) of ``cases`` (op, *rest) as (op, impl, *rest), for every
    impl the op (and the case's sample) has."""
    return dict(argvalues=[(case[0], impl, *case[1:]) for case in cases for impl in _impls(case)],
                ids=[f"{name}-{impl}" for case, name in zip(cases, ids) for impl in _impls(case)])


# ----------------------------------------------------------------------------------------------
# Every sample through every backend: forward (with the gradient it writes), backward, opcheck
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,impl,index", **with_impls(CASES, CASE_IDS))
def test_forward_matches_float64(triton_device, op, impl, index):
    sample = op.sample_inputs(impl_device(impl, triton_device))[index]
    s = sample.student
    coef = torch.tensor(op.coef, device=s.device)
    *loss_rows, grad = forward(op, impl, sample, coef)
    ref_rows, ref_grad = expected(op, sample, op.coef)
    assert grad.dtype == s.dtype and grad.shape == s.shape and grad.is_contiguous()
    for i, (rows, ref, inactive) in enumerate(zip(loss_rows, ref_rows, op.inactive(sample))):
        assert rows.dtype == torch.float32 and rows.shape == s.shape[:-1]
        assert close_to(rows, ref, sample.tol)
        assert torch.isfinite(rows).all() and (rows[inactive] == 0).all()
        assert i not in op.non_negative or (rows >= 0).all()
    assert grad_error(op, grad, ref_grad, sample, coef) <= sample.tol
    assert torch.isfinite(grad).all()
    no_term = torch.stack(op.inactive(sample)).all(0)  # rows with no term at all: a zero gradient row
    assert (grad[no_term] == 0).all()
    *loss_rows, no_grad = forward(op, impl, sample, coef, compute_grad=False)
    assert no_grad is None or no_grad.numel() == 0
    for rows, ref in zip(loss_rows, ref_rows):
        assert close_to(rows, ref, sample.tol)


BACKWARD_CASES = [(op, upstream, i) for op, i in CASES for upstream in op.upstreams]
BACKWARD_IDS = [f"{name}-{upstream}" for (op, _), name in zip(CASES, CASE_IDS) for upstream in op.upstreams]


@pytest.mark.parametrize("op,impl,upstream,index", **with_impls(BACKWARD_CASES, BACKWARD_IDS))
def test_backward_matches_float64(triton_device, op, impl, upstream, index):
    """The backward turns the forward's gradient (made for coef) into the gradient for the incoming
    per-row gradients: untouched when they equal coef, scaled when proportional, else recomputed (also
    where coef was 0: nothing to scale)."""
    sample = op.sample_inputs(impl_device(impl, triton_device))[index]
    reason = op.skip_backward(impl, upstream, sample)
    if reason:
        pytest.skip(reason)
    device, rows = sample.student.device, sample.student.shape[:-1]
    coef = torch.tensor(op.backward_coef, device=device) * (upstream != "zero coef")
    *_, grad = forward(op, impl, sample, coef)
    grad_rows = upstream_row_grads(upstream, coef, rows)
    before = grad.clone()
    backward(op, impl, sample, grad, grad_rows, coef)
    if upstream == "coef":
        assert torch.equal(grad, before)
    _, ref = expected(op, sample, grad_rows)
    assert grad_error(op, grad, ref, sample, grad_rows[0]) <= sample.tol


OPCHECK_CASES = [(op, i) for op in OPS for i, sample in enumerate(SAMPLES[op.name])
                 if sample in op.opcheck_samples([sample])]
OPCHECK_IDS = [f"{op.name}-{SAMPLES[op.name][i].name}" for op, i in OPCHECK_CASES]


@pytest.mark.parametrize("op,index", OPCHECK_CASES, ids=OPCHECK_IDS)
def test_opcheck(op, index):
    sample = op.sample_inputs()[index]
    rest = (torch.full((len(op.coef),), 0.5), *sample.scalars)
    variant = sample.variant
    for compute_grad in (False, True):
        torch.library.opcheck(op.op.default, (*sample.args, *rest, compute_grad, *variant))
    # With autograd the backward rewrites the op's gradient output in place (that buffer is the
    # gradient), and opcheck's test_aot_dispatch_dynamic returns that output from the traced graph, which
    # AOTAutograd cannot partition ("Node ... was invalid, but is output"; test_loss_contract.py pins
    # it). The public functions never return the buffer: test_torch_compile_fullgraph covers them.
    s, *teacher = sample.args
    torch.library.opcheck(op.op.default, (s.clone().requires_grad_(), *teacher, *rest, True, *variant),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    grad = op.op(*sample.args, *rest, True, *variant)[-1]
    grad_rows = [torch.rand(s.shape[:-1]) for _ in op.coef]
    torch.library.opcheck(op.backward_op.default, (grad, *grad_rows, *sample.args, *rest, *variant))


# ----------------------------------------------------------------------------------------------
# The policies: NaN in a selected row, empty inputs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,impl", **with_impls([(op,) for op in OPS], [op.name for op in OPS]))
def test_nan_in_a_selected_row_is_nan(triton_device, op, impl):
    """A NaN anywhere in a selected student row gives NaN losses and a NaN in its gradient row (never
    the 0 of an all -inf row); the other rows are untouched."""
    for sample in op.selected_samples((4,), 60, impl_device(impl, triton_device)):
        s = sample.student.clone()
        s[0] = NAN
        s[1, 17] = NAN
        *loss_rows, grad = forward(op, impl, sample.replace_student(s), torch.tensor(op.coef, device=s.device))
        for rows in loss_rows:
            assert rows[:2].isnan().all() and torch.isfinite(rows[2:]).all(), (sample.name, rows)
        assert grad[:2].isnan().any(-1).all() and torch.isfinite(grad[2:]).all()


EMPTY_CASES = [(op, shape) for op in OPS for shape in op.empty_shapes]


@pytest.mark.parametrize("op,impl,shape", **with_impls(EMPTY_CASES, [f"{op.name}-{s}" for op, s in EMPTY_CASES]))
def test_empty_inputs(triton_device, op, impl, shape):
    """No rows, or rows of length 0: outputs of the right shapes, exact zeros, and a backward that runs."""
    for sample in op.selected_samples(shape[:-1], shape[-1], impl_device(impl, triton_device)):
        coef = torch.tensor(op.coef, device=sample.student.device)
        *loss_rows, grad = forward(op, impl, sample, coef)
        assert grad.shape == shape and all(rows.shape == shape[:-1] for rows in loss_rows)
        assert all((rows == 0).all() for rows in loss_rows) and (grad == 0).all()
        backward(op, impl, sample, grad, loss_rows, coef)


# ----------------------------------------------------------------------------------------------
# Registration, torch.compile, GPU builds
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", OPS, ids=str)
def test_triton_impls_are_registered_by_name(op):
    """The CUDA kernels are named functions in one table, so that the contract tests
    (test_loss_contract.py) can register the same ones for CPU tensors."""
    for op_name in (f"{op.name}_rows", f"{op.name}_rows_backward"):
        assert TRITON_IMPLS[op_name].__name__ == f"{op_name}_triton"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"distil::{op_name}", "CUDA")


COMPILE_CASES = [(op, backend) for op in OPS for backend in op.compile_backends]


@pytest.mark.parametrize("op,backend", COMPILE_CASES, ids=[f"{op.name}-{b}" for op, b in COMPILE_CASES])
def test_torch_compile_fullgraph(op, backend):
    """The public function under torch.compile(fullgraph=True): the same value and gradient as eager."""
    loss, student = op.compile_case()
    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    out = compiled(s1)
    out.backward()
    ref = loss(s2)
    ref.backward()
    assert relative_error(out, ref) <= 1e-6
    assert relative_error(s1.grad, s2.grad) <= 1e-6


@pytest.mark.skipif(GPU_RUN, reason="ahead-of-time builds are checked on the CPU machine")
@pytest.mark.parametrize("op", OPS, ids=str)
def test_sm80_sm90_builds_have_128_bit_main_loops_and_no_spills(op):
    """Real GPU builds, specialised as Triton specialises a real launch (tests/aot.py): every tuning entry
    and specialisation without spills on sm_80 and sm_90; 128-bit accesses in the main loops at the
    vocabularies (hidden sizes) users have, odd ones included, for every dtype."""
    vector, other = op.aot_specs()
    reports = compile_reports(vector + other)
    spilled = [(spec["kernel"], spec["constexprs"], spec["signature"], spec["cc"], report)
               for spec, report in zip(vector + other, reports) if report["spill_stores"] or report["spill_loads"]]
    assert not spilled, spilled
    assert {r["arch"] for r in reports} == {"sm_80", "sm_90a"}
    for spec, report in zip(vector, reports):
        in_loop, outside = main_loop_widths(report)
        where = (spec["kernel"], spec["signature"], spec["cc"])
        assert in_loop and set(in_loop) == {128}, (where, in_loop)
        if op.scalar_edges:
            assert set(outside) - {128}, where  # the head / tail chunks: masked, scalar


# ----------------------------------------------------------------------------------------------
# bf16 outputs: every Triton bf16 result above is rounded as a GPU build rounds it
# ----------------------------------------------------------------------------------------------
@triton.jit
def _store_as_bf16(x_ptr, y_ptr, N: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets).to(tl.bfloat16))


def test_triton_float32_to_bf16_rounds_to_nearest_even(triton_device):
    """A kernel's float32 -> bfloat16 cast gives torch's bits: nearest, ties to even, NaN, ±inf, overflow to
    inf, subnormals. GPU builds do (cvt.rn.bf16.f32); the interpreter, which truncates, does through conftest."""
    ties = [1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8)]
    special = [float("nan"), float("inf"), -float("inf"), 3.4e38, 1e-40, -0.0]
    x = torch.cat([torch.tensor(ties + special), torch.randn(1024 - len(ties) - len(special)) * 100]).to(triton_device)
    y = torch.empty(1024, dtype=torch.bfloat16, device=triton_device)
    _store_as_bf16[(1,)](x, y, N=1024)
    assert torch.equal(y.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
