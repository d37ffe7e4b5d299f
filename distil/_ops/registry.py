"""The one registration every gradient-in-the-forward op follows (ARCHITECTURE.md, "Adding an op").

Such an op is ``distil::<op>(student, <inputs>..., coef, <scalars>..., bool compute_grad) ->
(<loss rows>..., grad)`` with its backward ``distil::<op>_backward(Tensor(a!) grad, <grad of each loss
rows>..., <the forward's arguments but compute_grad>)``: schema and CPU kernel in csrc/<op>.cpp, the
Triton launchers ``<op>(<the forward's arguments before compute_grad>, <loss rows>..., grad, <those after>)`` and
``<op>_backward(<the backward's arguments>)`` in kernels/<op>.py. :func:`register_gradient_op` then
registers, from those alone, the Triton implementations for CUDA, the fake implementations and autograd.

The Triton implementations are kept by op name in :data:`TRITON_IMPLS`, so that the tests can register the
same functions for CPU tensors (the Triton interpreter) and run every contract test on both backends.
"""
import importlib

import torch

from distil._ops.common import device_guard, save_gradient_buffer, take_gradient_buffer

# op name (without "distil::") -> the Python function registered as its CUDA kernel.
TRITON_IMPLS = {}


def triton_kernels(name):
    """The module ``distil.kernels.<name>``, or None where Triton is missing (it is a Linux-only
    dependency: CUDA tensors then have no kernel, CPU tensors keep the C++ one)."""
    try:
        return importlib.import_module(f"distil.kernels.{name}")
    except ImportError:  # pragma: no cover
        return None


def register_triton(op, impl):
    """Registers ``impl`` as ``distil::<op>``'s CUDA kernel and records it in :data:`TRITON_IMPLS`."""
    impl.__name__ = impl.__qualname__ = f"{op}_triton"
    TRITON_IMPLS[op] = impl
    torch.library.register_kernel(f"distil::{op}", "cuda", impl)
    return impl


def _argument_names(op):
    return [a.name for a in getattr(torch.ops.distil, op).default._schema.arguments]


def row_inputs_contiguous(args, rows):
    """The launchers read per-row tensors (labels, masks, lse) contiguously; the [.., D] rows they read in
    place with any strides (kernels/rows.py)."""
    return [x.contiguous() if isinstance(x, torch.Tensor) and x.shape == rows else x for x in args]


def _check_gradient_buffer(op, grad, student):
    if grad.shape != student.shape or not grad.is_contiguous():
        raise ValueError(f"{op}_backward: grad must be contiguous with the student's shape")


def register_gradient_op(op, n_loss_rows, check_args, kernels):
    """Registers ``distil::<op>`` and ``distil::<op>_backward`` (see the module docstring).

    ``check_args(*args)``: what the kernels assume of the forward's arguments but compute_grad, for direct
    ``torch.ops`` calls (the public functions check more); ``kernels``: the module of the Triton launchers,
    or None."""
    names = _argument_names(op)
    at_compute_grad = names.index("compute_grad")
    backward = getattr(torch.ops.distil, f"{op}_backward")
    backward_names = _argument_names(f"{op}_backward")[1 + n_loss_rows:]

    def split(args):
        args = list(args)
        return args, args.pop(at_compute_grad)

    if kernels is not None:
        launch, launch_backward = getattr(kernels, op), getattr(kernels, f"{op}_backward")

        def forward_impl(*args):
            args, compute_grad = split(args)
            check_args(*args)
            student = args[0]
            rows = student.shape[:-1]
            loss_rows = [student.new_empty(rows, dtype=torch.float32) for _ in range(n_loss_rows)]
            grad = torch.empty(student.shape, dtype=student.dtype, device=student.device) if compute_grad else None
            args = row_inputs_contiguous(args, rows)
            with device_guard(student):
                # Arguments after compute_grad (a divergence) follow the outputs, as in the launchers.
                launch(*args[:at_compute_grad], *loss_rows, grad, *args[at_compute_grad:])
            return (*loss_rows, student.new_empty(0) if grad is None else grad)

        def backward_impl(grad, *args):
            grad_rows, args = args[:n_loss_rows], args[n_loss_rows:]
            check_args(*args)
            student = args[0]
            _check_gradient_buffer(op, grad, student)
            rows = student.shape[:-1]
            with device_guard(student):
                launch_backward(grad, *(g.float().contiguous() for g in grad_rows),
                                *row_inputs_contiguous(args, rows))

        register_triton(op, forward_impl)
        register_triton(f"{op}_backward", backward_impl)

    @torch.library.register_fake(f"distil::{op}")
    def forward_fake(*args):
        args, compute_grad = split(args)
        student = args[0]
        loss_rows = [student.new_empty(student.shape[:-1], dtype=torch.float32) for _ in range(n_loss_rows)]
        return (*loss_rows, student.new_empty(student.shape) if compute_grad else student.new_empty(0))

    torch.library.register_fake(f"distil::{op}_backward", lambda *args: None)

    def setup_context(ctx, inputs, output):
        args, compute_grad = split(inputs)
        ctx.tensor_at = [i for i, x in enumerate(args) if isinstance(x, torch.Tensor)]
        ctx.args = [None if isinstance(x, torch.Tensor) else x for x in args]
        save_gradient_buffer(ctx, output[-1], compute_grad, *(args[i] for i in ctx.tensor_at))

    def backward_of_op(ctx, *grads):
        grad, *tensors = take_gradient_buffer(ctx, op)
        args = list(ctx.args)
        for i, x in zip(ctx.tensor_at, tensors):
            args[i] = x
        student = args[0]
        named = dict(zip((n for n in names if n != "compute_grad"), args))
        grad_rows = [torch.zeros(student.shape[:-1], dtype=torch.float32, device=student.device) if g is None
                     else g.float() for g in grads[:n_loss_rows]]
        backward(grad, *grad_rows, *(named[n] for n in backward_names))
        return (grad,) + (None,) * (len(names) - 1)

    torch.library.register_autograd(f"distil::{op}", backward_of_op, setup_context=setup_context)
