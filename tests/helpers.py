"""What every test file shares: the device lists, the ONE tolerance table, error measures and
poisoned outputs. The ops' samples are declared once, in tests/opinfo.py."""
import os
import socket

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# benchmarks/gpu_suite.sh sets DISTIL_GPU_TESTS=1: Triton kernels then run on CUDA, else through the
# interpreter on CPU tensors (conftest.py sets TRITON_INTERPRET before triton is imported).
GPU_RUN = os.environ.get("DISTIL_GPU_TESTS") == "1"
API_DEVICES = ["cpu"] + (["cuda"] if GPU_RUN else [])

# Relative error allowed against a float64 reference, by the dtype of the values compared.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def one_error_line(capsys, *words):
    """The one ``distil-train: error:`` line a refused run printed (no traceback), holding every word."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("distil-train: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def relative_error(out, ref):
    """||out - ref|| / ||ref||; the absolute error where the reference is exactly zero."""
    out, ref = out.double().cpu(), ref.double().cpu()
    denom = ref.norm().item() or 1.0
    return (out - ref).norm().item() / denom


def close_to(out, ref, tol):
    """relative_error within tol, or out equal to ref up to float64 rounding (a reference that is 0 in
    exact arithmetic but for its rounding: rows of p = q, V = 1)."""
    return relative_error(out, ref) <= tol or (out.double().cpu() - ref.double().cpu()).abs().max() <= 1e-12


def nan_empty(shape, dtype, device):
    """An output buffer full of NaN: a value the kernel fails to write cannot pass as a lucky zero."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def poison_heap(*like):
    """Allocate and free NaN tensors the size of an op's outputs, so that outputs the op allocates
    itself (C++ kernels) and fails to write read back as NaN rather than as lucky zeros."""
    for x in like:
        torch.full((max(x.numel(), 1),), float("nan"), dtype=x.dtype)


def rows_past_int32(cols, dtype, device):
    """A random [2, cols] tensor whose row 1 starts past element 2**31 of its storage: only the two
    rows' pages are touched, the rest of the (lazily allocated) storage stays virtual."""
    stride = 2**31 + 5 * cols
    storage = torch.empty(stride + cols, dtype=dtype, device=device)
    x = storage.as_strided((2, cols), (stride, 1))
    return x.copy_(torch.randn(2, cols, device=device).to(dtype))


class RecordOps(TorchDispatchMode):
    """Records ``(op, args, outputs)`` of every op dispatched inside the ``with`` block (custom ops
    included), e.g. to assert what a public function asked its op for."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((func, args, out))
        return out

    def of(self, op):
        return [(args, out) for func, args, out in self.calls if func is op]


def free_port():
    """A free TCP port on the loopback address, for a test's torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def upstream_row_grads(upstream, coef, rows):
    """Incoming per-row gradients, one per loss output of an op, for its backward tests: equal to ``coef``
    ("coef": the backward must leave the buffer as it is), proportional to it (a per-row rescale), or
    "arbitrary" / "zero coef" (random, a recomputation; the caller makes coef 0 for the latter)."""
    device = coef.device
    if upstream in ("arbitrary", "zero coef"):
        return tuple(torch.randn(rows, device=device) for _ in coef)
    factor = torch.ones(rows, device=device) if upstream == "coef" else torch.rand(rows, device=device) + 0.5
    return tuple(c * factor for c in coef)


def assert_cache_trains_as_live_teacher(teacher, cache, *, pad_id, steps, step_inputs):
    """A top-k = V float32 ``cache`` (a distil.teacher_cache.TeacherCache) reproduces the live ``teacher``:
    optimizer steps of one student init over the same batches and dropout (``steps`` of them, into epoch 1)
    give per step the live run's total to 1e-5 relative and each part (kl, ce) to 1e-5 of the total (a
    small KL is a difference of sums whose fp32 rounding differs between the dense and the top-k kernels).
    ``step_inputs(batch, cached)``: the step's (input_ids, attention_mask, labels) from the reader's batch
    and the cache's."""
    import itertools

    from distil.data import LengthGroupedBatches
    from distil.fused_loss import DistillationLoss
    from distil.step import DistillationStep, StudentRows
    from distil.student import build_student

    loss_fn = DistillationLoss(kl_weight=5.0, ce_weight=2.0, cos_weight=0.0, temperature=2.0)
    runs = {}
    for name in ("live", "cached"):
        torch.manual_seed(0)
        student = build_student(teacher).train()
        step = DistillationStep(StudentRows(student), teacher if name == "live" else None, loss_fn,
                                cache_temperature=cache.temperature)
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
        reader = LengthGroupedBatches(cache.sequences(), 8, seed=3, pad_id=pad_id)
        losses = []
        for i, batch in zip(range(steps), itertools.chain(reader, reader)):
            cached = cache.batch(batch["epoch"], batch["sequence_index"], batch["input_ids"].shape[1], pad_id)
            inputs = step_inputs(batch, cached)
            torch.manual_seed(100 + i)  # the same dropout in both runs
            out = step(*inputs, cached)
            out.total.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(torch.stack([out.total, out.kl, out.ce]).detach())
        runs[name] = torch.stack(losses)
    scale = runs["live"][:, :1].abs()
    assert ((runs["cached"] - runs["live"]).abs() <= 1e-5 * scale).all(), (runs["cached"] - runs["live"]) / scale


def assert_batch_holds_teacher_outputs(teacher, batch, ids, attn, k=8, temperature=2.0):
    """A teacher cache's ``batch`` holds, at the real tokens of (``ids``, ``attn``), the ``teacher``'s top-k
    logits (fp16/bf16 rounding), their indices (near-ties may come in another order), its lse at T and
    its last hidden states."""
    real = attn.bool()
    with torch.no_grad():
        out = teacher(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    logits = out.logits[real]
    values = logits.topk(k, -1).values
    assert torch.allclose(logits.gather(-1, batch["topk_index"][real].long()), values, atol=1e-5)
    assert torch.allclose(batch["topk_logits"][real].float(), values, atol=1e-2, rtol=1e-3)
    assert torch.allclose(batch["lse"][real], torch.logsumexp(logits / temperature, -1), atol=1e-5)
    assert torch.allclose(batch["hidden"][real].float(), out.hidden_states[-1][real], atol=1e-2)
