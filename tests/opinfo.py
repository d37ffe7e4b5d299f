"""One declaration per gradient-in-the-forward op, in the spirit of PyTorch's OpInfo: its sample inputs, its
float64 reference, its backends and backward modes, its torch.compile case and its ahead-of-time builds.
tests/test_ops.py runs every generic test family over :data:`OPS`; a new op (or a new divergence of an
op) adds an entry or cases here, not a test file. Op-specific kernel and API tests stay in test_<op>.py.

Every op follows the registration pattern of distil/_ops/registry.py: ``op(*args, coef, *scalars,
compute_grad) -> (*loss_rows, grad)``, ``op_backward(grad, *grad_rows, *args, coef, *scalars)``, and the
Triton launchers ``launch(*args, coef, *scalars, *loss_rows, grad)`` / ``launch_backward(...)`` with the
backward op's arguments.
"""
import importlib
import itertools
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from distil import fused_loss, reference
from distil._ops.registry import row_inputs_contiguous
from distil.kernels import cosine as cosine_kernels
from distil.kernels import kl_ce as kl_ce_kernels
from distil.kernels import topk_kl_ce as topk_kernels

from aot import launch_spec
from helpers import TOL, nan_empty, poison_heap, relative_error

NEG_INF = float("-inf")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# The vocabularies (and hidden sizes) the AOT builds must stream with 128-bit main loops.
VOCABS = (30522, 50257, 32000, 128256)


class Sample(NamedTuple):
    """``args``: the op's tensor arguments before ``coef`` (the student first); ``scalars``: those after it,
    before ``compute_grad``; ``tol``: the relative error allowed against float64; ``variant``: the
    defaulted scalars after ``compute_grad`` (a divergence: ``(divergence, divergence_param)``), () for
    their defaults."""
    name: str
    args: tuple
    scalars: tuple
    tol: float
    variant: tuple = ()

    @property
    def student(self):
        return self.args[0]

    def replace_student(self, student):
        return self._replace(args=(student, *self.args[1:]))


@dataclass
class OpInfo:
    name: str  # the op is distil::<name>_rows, its Triton launchers kernels/<name>.py's <name>_rows(_backward)
    sample_inputs: Callable  # device -> [Sample]
    reference: Callable  # (student float64, Sample) -> the per-row losses, float64
    inactive: Callable  # Sample -> per loss output, the rows that must be exactly 0
    coef: tuple  # the forward tests' coef
    backward_coef: tuple
    upstreams: tuple  # the backward modes (helpers.upstream_row_grads)
    selected_samples: Callable  # (rows shape, D, device) -> [Sample] with every row selected
    compile_case: Callable  # () -> (loss(student) through the public function, student)
    aot_specs: Callable  # () -> (specs that must stream with 128-bit main loops, the other specs)
    impls: tuple = ("cpu", "triton", "triton_chunked")
    chunked: Callable = lambda sample: {}  # launcher keywords that force the streamed paths
    skip_backward: Callable = lambda impl, upstream, sample: None  # a reason, or None
    opcheck_samples: Callable = lambda samples: samples
    grad_error: Optional[Callable] = None  # (grad, ref, sample, g) -> error; default relative_error
    empty_shapes: tuple = ((0, 13), (2, 0, 13))
    compile_backends: tuple = ("aot_eager",)
    scalar_edges: bool = True  # AOT: the masked head / tail accesses show outside the loops
    non_negative: tuple = ()  # the loss outputs that are never negative (indices)
    variant_impls: tuple = ("cpu", "triton", "triton_chunked")  # the impls that take samples' variants

    def __post_init__(self):
        self.op = getattr(torch.ops.distil, f"{self.name}_rows")
        self.backward_op = getattr(torch.ops.distil, f"{self.name}_rows_backward")
        kernels = importlib.import_module(f"distil.kernels.{self.name}")
        self.launch = getattr(kernels, f"{self.name}_rows")
        self.launch_backward = getattr(kernels, f"{self.name}_rows_backward")

    def __repr__(self):
        return self.name


def _meta(*shape, dtype=F32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _specs(module, kernels, launches, cc):
    return [launch_spec(kernel, module, args, cc=cc, **options)
            for kernel, (_, args, options) in zip(kernels, launches)]


# ------------------------------------------------------------------------------------------------
# Running an op on a sample, on either backend
# ------------------------------------------------------------------------------------------------
def impl_device(impl, triton_device):
    return "cpu" if impl == "cpu" else triton_device


def forward(op, impl, sample, coef, compute_grad=True):
    """(*loss_rows, grad): the C++ op, or the Triton launcher into NaN-filled outputs (every element must
    be written); "triton_chunked" forces the streamed paths."""
    s = sample.student
    rows = s.shape[:-1]
    if impl == "cpu":
        poison_heap(s, *(s.new_empty(rows, dtype=torch.float32) for _ in coef))
        return op.op(*sample.args, coef, *sample.scalars, compute_grad, *sample.variant)
    loss_rows = [nan_empty(rows, torch.float32, s.device) for _ in coef]
    grad = nan_empty(s.shape, s.dtype, s.device) if compute_grad else None
    blocks = op.chunked(sample) if impl == "triton_chunked" else {}
    op.launch(*row_inputs_contiguous(sample.args, rows), coef, *sample.scalars, *loss_rows, grad, *sample.variant,
              **blocks)
    return (*loss_rows, grad)


def backward(op, impl, sample, grad, grad_rows, coef):
    rows = sample.student.shape[:-1]
    if impl == "cpu":
        op.backward_op(grad, *grad_rows, *sample.args, coef, *sample.scalars, *sample.variant)
    else:
        blocks = op.chunked(sample) if impl == "triton_chunked" else {}
        op.launch_backward(grad, *(g.contiguous() for g in grad_rows), *row_inputs_contiguous(sample.args, rows), coef,
                           *sample.scalars, *sample.variant, **blocks)


def expected(op, sample, grad_rows):
    """float64 per-row losses and the gradient of sum(Σ_i grad_rows[i] * loss_rows[i]) w.r.t. the student."""
    s = sample.student.detach().double().requires_grad_()
    loss_rows = op.reference(s, sample)
    sum((rows * torch.as_tensor(g).double()).sum() for rows, g in zip(loss_rows, grad_rows)).backward()
    return [rows.detach() for rows in loss_rows], s.grad


def grad_error(op, grad, ref, sample, g):
    """The gradient's error against float64; ``g``: the per-row gradient (or coef) of the first loss."""
    return op.grad_error(grad, ref, sample, g) if op.grad_error else relative_error(grad, ref)


# ------------------------------------------------------------------------------------------------
# kl_ce
# ------------------------------------------------------------------------------------------------
def kl_ce_inputs(shape, vocab, s_dtype=F32, t_dtype=F32, device="cpu", label_frac=0.6, mask_frac=0.7, scale=3.0,
                 pad=0):
    """Random logits over the row shape ``shape``; ``pad`` > 0 makes them strided views of wider rows."""
    s = (torch.randn(*shape, vocab + pad, device=device) * scale).to(s_dtype)[..., :vocab]
    t = (torch.randn(*shape, vocab + pad, device=device) * scale).to(t_dtype)[..., :vocab]
    labels = torch.randint(0, max(vocab, 1), shape, device=device)
    labels[torch.rand(shape, device=device) > label_frac] = -100
    mask = torch.rand(shape, device=device) < mask_frac
    return s, t, labels, mask


def kl_ce_sample(name, s, t, labels, mask, temperature=2.0, ignore_index=-100):
    return Sample(name, (s, t, labels, mask), (temperature, ignore_index), TOL[s.dtype])


def kl_ce_samples(device="cpu"):
    """Every case the op must get right: the dtype pairs, V from 1 to a chunked 30522, [B, S, V] views
    of bigger tensors (padded V, transposed batch) with non-contiguous labels / mask, optional labels
    and mask, an in-range ignore_index, the -inf policy and +-1e4 logits."""
    out = [kl_ce_sample(f"V={v} {str(a)[6:]}/{str(b)[6:]}", *kl_ce_inputs((6,), v, a, b, device), temperature=temp)
           for v, a, b, temp in ((1, F32, F32, 2.0), (7, BF16, F32, 1.0), (100, F16, BF16, 2.0),
                                 (300, F32, F16, 2.0), (300, BF16, BF16, 0.5))]
    s, t, labels, mask = kl_ce_inputs((2,), 30522, BF16, BF16, device)
    labels[:] = torch.tensor([5, 30521])
    out.append(kl_ce_sample("V=30522 bf16", s, t, labels, mask))
    B, S, V = 2, 3, 37
    s = torch.randn(S * 2, B, V + 9, device=device)[::2, :, :V].transpose(0, 1)
    t = torch.randn(B, S, V + 3, device=device).to(F16)[..., :V]
    labels = torch.randint(0, V, (B, 2 * S), device=device)[:, 1::2]
    labels[0, 1] = -100
    mask = (torch.rand(S, B, device=device) < 0.6).t()
    out.append(kl_ce_sample("3-D strided", s, t, labels, mask))
    # Rows 8 elements apart beyond V: odd row starts that still share their 16-byte phase with the
    # gradient's, so the rows are cut at a different column each (kernels/rows.py).
    out.append(kl_ce_sample("V=301 stride 309", *kl_ce_inputs((6,), 301, F32, BF16, device, pad=8)))
    s, t, labels, mask = kl_ce_inputs((5,), 33, device=device)
    out.append(kl_ce_sample("no labels, no mask", s, t, None, None, 1.5))
    labels[labels == -100] = 3
    out.append(kl_ce_sample("ignore_index=3", s, t, labels, mask, ignore_index=3))
    s, t, labels, mask = kl_ce_inputs((7,), 40, device=device, label_frac=1.0, mask_frac=1.0)
    labels[:] = 7  # a finite student logit in every row: finite CE
    s[0, :5] = t[0, :5] = NEG_INF  # excluded in both: finite
    t[1, 10:] = NEG_INF  # teacher-only: q = 0 there
    s[2, 20:30] = NEG_INF  # student -inf only where q = 0
    t[2, 20:] = NEG_INF
    s[3] = NEG_INF  # whole student row: KL, CE and gradient 0
    t[4] = NEG_INF  # whole teacher row: KL 0, CE still counts
    out.append(kl_ce_sample("-inf policy", s, t, labels, mask))
    s, t, labels, mask = kl_ce_inputs((6,), 50, device=device, scale=1.0)
    s = torch.where(torch.rand(s.shape, device=device) < 0.5, 1e4, -1e4) + s
    t = torch.where(torch.rand(t.shape, device=device) < 0.5, 1e4, -1e4) + t
    out.append(kl_ce_sample("+-1e4 logits", s.bfloat16(), t.half(), labels, mask))
    return out + variant_samples(_kl_ce_divergence_samples, device)


_VARIANT_SAMPLES = {}


def variant_samples(make, device):
    """``make(device)``'s samples, made once per device under their own seed (read only): the tests of the
    op's default draw from the random stream they would draw from without them, and no test pays for
    making them again."""
    key = (make.__name__, str(device))
    if key not in _VARIANT_SAMPLES:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            _VARIANT_SAMPLES[key] = make(device)
    return _VARIANT_SAMPLES[key]


def _kl_ce_divergence_samples(device):
    return [sample._replace(name=f"{divergence_id} {sample.name}", variant=variant)
            for variant, divergence_id in zip(DIVERGENCES, DIVERGENCE_IDS) for sample in _divergence_bases(device)]


# (divergence, divergence_param) as the ops take them: every divergence but the default forward KL.
DIVERGENCES = [("reverse_kl", 0.0), ("jsd", 0.5), ("jsd", 0.9), ("skew_kl", 0.1), ("skew_reverse_kl", 0.3),
               ("tvd", 0.0)]
DIVERGENCE_IDS = [f"{d}={p}" if p else d for d, p in DIVERGENCES]
# The divergence samples the backward modes run on (the rest: forward only, for the interpreter's time).
DIVERGENCE_BACKWARD_SAMPLES = ("V=37 float32/float32 T=2.0", "-inf policy")


def _divergence_bases(device):
    """The samples every divergence runs on: the dtype pairs, odd V (1 to a chunked 2053), a [B, S, V]
    strided view, masks and labels, -inf entries where every divergence is finite, +-1e4 logits and
    extreme temperatures."""
    out = [kl_ce_sample(f"V={v} {str(a)[6:]}/{str(b)[6:]} T={temp}", *kl_ce_inputs((6,), v, a, b, device),
                        temperature=temp)
           for v, a, b, temp in ((1, F32, F32, 2.0), (37, F32, F32, 2.0), (7, F16, F32, 1.0), (300, BF16, F16, 0.5),
                                 (2053, F32, BF16, 1.0), (100, F32, F32, 0.05))]
    # At T = 20 the skew KLs are O(1/T²) of their per-token terms (no cancellation-free form, unlike the
    # forward KL's): fp32 keeps about 1e-5 there (measured up to 1.3e-5, both kernels, over seeds).
    out.append(kl_ce_sample("V=100 float32/float32 T=20.0", *kl_ce_inputs((6,), 100, device=device),
                            temperature=20.0)._replace(tol=3e-5))
    B, S, V = 2, 3, 37
    s = torch.randn(S * 2, B, V + 9, device=device)[::2, :, :V].transpose(0, 1)
    t = torch.randn(B, S, V + 3, device=device).to(F16)[..., :V]
    labels = torch.randint(0, V, (B, 2 * S), device=device)[:, 1::2]
    mask = (torch.rand(S, B, device=device) < 0.6).t()
    out.append(kl_ce_sample("3-D strided", s, t, labels, mask))
    s, t, labels, _ = kl_ce_inputs((6,), 40, device=device)
    labels[:] = 7  # a finite student logit in every row
    s[0, :5] = t[0, :5] = NEG_INF  # tokens of probability 0 in both: exact 0 terms
    s[1, 20:] = t[1, 20:] = NEG_INF
    s[2] = NEG_INF  # whole student row: loss, CE and gradient 0
    t[3] = NEG_INF  # whole teacher row: divergence 0, CE still counts
    s[4] = t[4]  # p = q: 0, and TVD's subgradient at ties
    out.append(kl_ce_sample("-inf policy", s, t, labels, None))
    s, t, labels, mask = kl_ce_inputs((6,), 50, device=device, scale=1.0)
    s = torch.where(torch.rand(s.shape, device=device) < 0.5, 1e4, -1e4) + s
    t = torch.where(torch.rand(t.shape, device=device) < 0.5, 1e4, -1e4) + t
    out.append(kl_ce_sample("+-1e4 logits", s.bfloat16(), t.half(), labels, mask))
    return out


def _kl_ce_skip_backward(impl, upstream, sample):
    if sample.variant and not sample.name.endswith(DIVERGENCE_BACKWARD_SAMPLES):
        return "a divergence's backward modes run on two samples (interpreter time)"
    return None


def _kl_ce_opcheck_samples(samples):
    return [x for x in samples if not x.variant or x.name.endswith("3-D strided")]


def _kl_ce_reference(s, sample):
    _, t, labels, mask = sample.args
    return reference.kl_ce_rows(s, t.double(), labels, mask, *sample.scalars, *sample.variant)


def _kl_ce_inactive(sample):
    """(rows without a KL term, rows without a CE term): labels / kl_mask are the last two arguments."""
    labels, mask = sample.args[-2:]
    rows = sample.student.shape[:-1]
    no_kl = torch.zeros(rows, dtype=torch.bool, device=sample.student.device) if mask is None else ~mask
    no_ce = torch.ones_like(no_kl) if labels is None else labels == sample.scalars[1]
    return no_kl, no_ce


def _kl_ce_selected(rows, vocab, device):
    s, t, labels, mask = kl_ce_inputs(rows, vocab, device=device, label_frac=1.0 if vocab else 0.0, mask_frac=1.0)
    return [kl_ce_sample("selected", s, t, labels, mask)]


def _kl_ce_compile_case():
    s, t, labels, mask = kl_ce_inputs((6,), 40)

    def loss(student):
        kl, ce = fused_loss.kl_ce_loss(student, t, labels, kl_mask=mask, kl_weight=5.0, ce_weight=2.0)
        return 5.0 * kl + 2.0 * ce
    return loss, s


def _kl_ce_launches(vocab, s_dtype, t_dtype, cc, has_labels=True, has_mask=True, write_grad=True, temperature=2.0,
                    rows=8192):
    """(forward, backward) specs of a launch on [rows, vocab] logits, from the launchers themselves
    (temperature > PRECISE_KL_ABOVE: the forward is the large-temperature KL in its own chunks)."""
    K = kl_ce_kernels
    s, t = _meta(rows, vocab, dtype=s_dtype), _meta(rows, vocab, dtype=t_dtype)
    labels = _meta(rows, dtype=torch.int64) if has_labels else None
    mask = _meta(rows, dtype=torch.bool) if has_mask else None
    coef, kl, ce, grad = _meta(2), _meta(rows), _meta(rows), _meta(rows, vocab, dtype=s_dtype)
    fwd = K.fwd_launch(s, t, labels, mask, coef, temperature, -100, kl, ce, grad if write_grad else None)
    bwd = K.bwd_launch(grad, kl, ce, s, t, labels, mask, coef, temperature, -100)
    return _specs("distil.kernels.kl_ce", (K.kl_ce_fwd_kernel, K.kl_ce_bwd_kernel), (fwd, bwd), cc)


def _kl_ce_aot_specs():
    precise_t = 2 * kl_ce_kernels.PRECISE_KL_ABOVE
    dtypes = (F32, BF16, F16)
    # 128-bit main loops: every vocabulary, every dtype, both architectures; the same for the
    # large-temperature KL (PRECISE_KL, its own chunks), whose backward is the one above.
    vector = [spec for vocab in VOCABS for dt in dtypes for cc in (80, 90)
              for spec in _kl_ce_launches(vocab, dt, dt, cc)]
    vector += [_kl_ce_launches(vocab, dt, dt, cc, temperature=precise_t)[0]
               for vocab in VOCABS for dt in dtypes for cc in (80, 90)]
    # The rest of the specialisations: the single-block row, mixed dtypes, the optional inputs.
    other = [spec for vocab in (300, 1000) for cc in (80, 90) for spec in _kl_ce_launches(vocab, F32, F32, cc)]
    other += [spec for s_dt, t_dt in ((BF16, F32), (F32, BF16)) for spec in _kl_ce_launches(30522, s_dt, t_dt, 90)]
    other += [_kl_ce_launches(30522, BF16, BF16, 90, *flags, temperature=temperature)[0]
              for flags in itertools.product((False, True), repeat=3) if flags != (True, True, True)
              for temperature in (2.0, precise_t)]
    other += [_kl_ce_launches(vocab, F32, F32, cc, temperature=precise_t)[0]
              for vocab in (300, 1000) for cc in (80, 90)]
    other += [_kl_ce_launches(30522, s_dt, t_dt, 90, temperature=precise_t)[0]
              for s_dt, t_dt in ((BF16, F32), (F32, BF16))]
    return vector, other


def _short_rows_in_chunks(sample):
    """Small chunks, so that short rows take the streamed multi-chunk path."""
    return {"block_v": 16 if sample.student.shape[-1] <= 512 else None}


KL_CE = OpInfo(
    name="kl_ce", sample_inputs=kl_ce_samples, reference=_kl_ce_reference, inactive=_kl_ce_inactive,
    coef=(0.7, 1.3), backward_coef=(0.25, 4.0), upstreams=("coef", "proportional", "arbitrary"),
    selected_samples=_kl_ce_selected, compile_case=_kl_ce_compile_case, aot_specs=_kl_ce_aot_specs,
    chunked=_short_rows_in_chunks, empty_shapes=((0, 13), (2, 0, 13), (4, 0)),
    compile_backends=("aot_eager", "inductor"), skip_backward=_kl_ce_skip_backward,
    opcheck_samples=_kl_ce_opcheck_samples, non_negative=(0, 1),
)


# ------------------------------------------------------------------------------------------------
# topk_kl_ce
# ------------------------------------------------------------------------------------------------
def teacher_topk(t, k, temperature, exact, v_dtype=F32, i_dtype=torch.int64, shuffle=True):
    """(values, index, lse) of full teacher logits t: its k largest, in a shuffled order (nothing may
    depend on sorted entries), and its full-vocabulary lse at T in exact mode."""
    values, index = t.float().topk(k, dim=-1)
    if shuffle:
        perm = torch.argsort(torch.rand(values.shape, device=t.device), dim=-1)
        values, index = values.gather(-1, perm), index.gather(-1, perm)
    lse = torch.logsumexp(t.double() / temperature, -1).float() if exact else None
    return values.to(v_dtype), index.to(i_dtype), lse


def topk_sample(name, s, values, index, lse, labels, mask, temperature=2.0, ignore_index=-100):
    return Sample(name, (s, values, index, lse, labels, mask), (temperature, ignore_index),
                  max(TOL[s.dtype], TOL[values.dtype]))


def make_topk_sample(name, shape, vocab, k, exact, s_dtype=F32, v_dtype=F32, i_dtype=torch.int64, device="cpu",
                     temperature=2.0, label_frac=0.6, mask_frac=0.7, scale=3.0):
    s = (torch.randn(*shape, vocab, device=device) * scale).to(s_dtype)
    t = torch.randn(*shape, vocab, device=device) * scale
    values, index, lse = teacher_topk(t, k, temperature, exact, v_dtype, i_dtype)
    labels = torch.randint(0, vocab, shape, device=device)
    labels[torch.rand(shape, device=device) > label_frac] = -100
    mask = torch.rand(shape, device=device) < mask_frac
    return topk_sample(name, s, values, index, lse, labels, mask, temperature)


def topk_samples(device="cpu"):
    """Both modes over: k in {1, 8, 64, 256}; every dtype of student, teacher values and indices; a
    chunked V = 30522 row; [B, S, .] strided views; no labels / mask; ties and -inf among the top-k;
    the -inf policy; a k = V row."""
    out = []
    for exact in (False, True):
        mode = "exact" if exact else "renorm"
        for k, vocab, s_dt, v_dt, i_dt in ((1, 50, F32, F32, torch.int64), (8, 100, BF16, F16, torch.int16),
                                           (64, 300, F16, BF16, torch.int32), (256, 300, F32, F16, torch.int16)):
            out.append(make_topk_sample(f"{mode} k={k} V={vocab} {str(s_dt)[6:]}", (6,), vocab, k, exact, s_dt, v_dt,
                                        i_dt, device))
        out.append(make_topk_sample(f"{mode} k=64 V=30522 bf16", (2,), 30522, 64, exact, BF16, F16, torch.int16,
                                    device))
        out.append(make_topk_sample(f"{mode} k=V=40", (5,), 40, 40, exact, device=device))
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
        out.append(topk_sample(f"{mode} 3-D strided", s, values, index, lse, labels, mask))
        sample = make_topk_sample(f"{mode} no labels, no mask", (4,), 33, 6, exact, device=device, temperature=1.5)
        out.append(sample._replace(args=(*sample.args[:4], None, None)))
        # Ties: integer-valued teacher logits, many equal among the top-k (and at its edge).
        t = torch.randint(-2, 3, (5, 60), device=device).float()
        values, index, lse = teacher_topk(t, 16, 2.0, exact)
        s = torch.randn(5, 60, device=device) * 2
        out.append(topk_sample(f"{mode} ties", s, values, index, lse, torch.randint(0, 60, (5,), device=device), None))
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
        out.append(topk_sample(f"{mode} -inf policy", s, values, index, lse, labels, None))
    return out + variant_samples(_topk_divergence_samples, device)


def _topk_divergence_samples(device):
    """The divergences on the k (+ tail) buckets (exact mode) or the k tokens (renormalised)."""
    return [make_topk_sample(f"{divergence_id} {mode} k={k} {str(s_dt)[6:]}", (6,), 37, k, mode == "exact", s_dt,
                             device=device)._replace(variant=variant)
            for variant, divergence_id in zip(DIVERGENCES, DIVERGENCE_IDS) for mode in ("renorm", "exact")
            for k in (1, 8, 37) for s_dt in (F32, BF16)]


def _topk_reference(s, sample):
    _, values, index, lse, labels, mask = sample.args
    temperature, ignore_index = sample.scalars
    lse = None if lse is None else lse.double()
    if sample.variant:
        return reference.topk_divergence_rows(s, values.double(), index, lse, labels, mask, temperature,
                                              *sample.variant, ignore_index=ignore_index)
    return reference.topk_kl_ce_rows(s, values.double(), index, lse, labels, mask, temperature, ignore_index)


def _topk_selected(rows, vocab, device):
    return [make_topk_sample(f"selected {mode}", rows, vocab, min(8, vocab), mode == "exact", device=device,
                             label_frac=1.0, mask_frac=1.0) for mode in ("renorm", "exact")]


def _topk_compile_case():
    sample = make_topk_sample("api", (6,), 40, 8, exact=True)
    s, values, index, lse, labels, mask = sample.args

    def loss(student):
        kl, ce = fused_loss.topk_kl_ce_loss(student, values, index, labels, teacher_lse=lse, kl_mask=mask,
                                            kl_weight=5.0, ce_weight=2.0)
        return 5.0 * kl + 2.0 * ce
    return loss, s


def _topk_launches(vocab, k, s_dt, v_dt, i_dt, exact, cc, has_labels=True, has_mask=True, write_grad=True,
                   rows=8192):
    K = topk_kernels
    s, values, index = _meta(rows, vocab, dtype=s_dt), _meta(rows, k, dtype=v_dt), _meta(rows, k, dtype=i_dt)
    lse = _meta(rows) if exact else None
    labels = _meta(rows, dtype=torch.int64) if has_labels else None
    mask = _meta(rows, dtype=torch.bool) if has_mask else None
    coef, kl, ce, grad = _meta(2), _meta(rows), _meta(rows), _meta(rows, vocab, dtype=s_dt)
    fwd = K.fwd_launch(s, values, index, lse, labels, mask, coef, 2.0, -100, kl, ce, grad if write_grad else None)
    bwd = K.bwd_launch(grad, kl, ce, s, values, index, lse, labels, mask, coef, 2.0, -100)
    return _specs("distil.kernels.topk_kl_ce", (K.topk_kl_ce_fwd_kernel, K.topk_kl_ce_bwd_kernel), (fwd, bwd), cc)


def _topk_aot_specs():
    # The student row and its gradient stream through 128-bit main loops at every vocabulary, every
    # student dtype, both modes, both architectures (the k teacher entries are a gather: scalar, outside;
    # k = 64 is one teacher block, no loop).
    vector = [spec for vocab in VOCABS for s_dt in (F32, BF16, F16)
              for exact, cc in itertools.product((False, True), (80, 90))
              for spec in _topk_launches(vocab, 64, s_dt, F16, torch.int32, exact, cc)]
    # The rest: one-block rows, k streamed in blocks, other teacher dtypes, the optional inputs.
    other = [spec for (vocab, k), cc in itertools.product(((512, 8), (30522, 256), (50257, 1024)), (80, 90))
             for spec in _topk_launches(vocab, k, BF16, F16, torch.int32, True, cc)]
    other += [spec for v_dt, i_dt in ((F32, torch.int64), (BF16, torch.int16))
              for spec in _topk_launches(30522, 64, F32, v_dt, i_dt, True, 90)]
    other += [_topk_launches(30522, 64, BF16, F16, torch.int16, True, 90, *flags)[0]
              for flags in itertools.product((False, True), repeat=3) if flags != (True, True, True)]
    return vector, other


def _topk_skip_backward(impl, upstream, sample):
    if (sample.student.shape[-1] > 1000 or impl == "triton_chunked") and upstream != "arbitrary":
        return "chunked and long rows exercise the recomputing branch only (interpreter time)"
    if sample.variant and " k=8 " not in sample.name:
        return "a divergence's backward modes run on the k = 8 samples"
    return None


def _topk_opcheck_samples(samples):
    return [x for x in samples if "30522" not in x.name and (not x.variant or x.name.endswith("exact k=8 float32"))]


TOPK_KL_CE = OpInfo(
    name="topk_kl_ce", sample_inputs=topk_samples, reference=_topk_reference, inactive=_kl_ce_inactive,
    coef=(0.7, 1.3), backward_coef=(0.25, 4.0), upstreams=("coef", "proportional", "arbitrary"),
    selected_samples=_topk_selected, compile_case=_topk_compile_case, aot_specs=_topk_aot_specs,
    chunked=lambda sample: {**_short_rows_in_chunks(sample), "block_k": 16},
    skip_backward=_topk_skip_backward, opcheck_samples=_topk_opcheck_samples,
)


# ------------------------------------------------------------------------------------------------
# cosine
# ------------------------------------------------------------------------------------------------
def make_hidden(shape, h, s_dtype=F32, t_dtype=F32, device="cpu", mask_frac=0.7):
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


def cosine_sample(name, x, y, mask):
    return Sample(name, (x, y, mask), (), TOL[x.dtype])


def cosine_samples(device="cpu"):
    """H from 1 to a streamed 9000 (every tuning entry kind: packed rows, one row per program,
    chunks), the dtype pairs, [B, S, H] views, with and without a mask."""
    out = []
    for h, shape, a, b, use_mask in ((1, (6,), F32, F32, False), (7, (6,), BF16, BF16, True),
                                     (384, (2, 3), F16, F32, True), (768, (6,), F32, F32, True),
                                     (1024, (2, 3), BF16, BF16, True), (4096, (2,), F32, BF16, False),
                                     (9000, (2,), BF16, F32, True)):
        x, y, mask = make_hidden(shape, h, a, b, device)
        out.append(cosine_sample(f"H={h} {str(a)[6:]}/{str(b)[6:]}{' masked' if use_mask else ''}", x, y,
                                 mask if use_mask else None))
    # Streamed rows of odd width, contiguous and 8 elements apart: cut at a different column each.
    out.append(cosine_sample("H=8195 float32/bfloat16 masked", *make_hidden((3,), 8195, F32, BF16, device)))
    x = torch.randn(3, 8205, device=device).to(BF16)[:, :8197]
    y = torch.randn(3, 8205, device=device).to(BF16)[:, :8197]
    out.append(cosine_sample("H=8197 stride 8205", x, y, None))
    return out


def _cosine_inactive(sample):
    mask = sample.args[2]
    rows = sample.student.shape[:-1]
    return (torch.zeros(rows, dtype=torch.bool, device=sample.student.device) if mask is None else ~mask,)


def cosine_grad_error(grad, ref, sample, g):
    """Relative error, except for H = 1 where d(1 − cos)/dx = y/d − cos·x/a is a difference of two
    nearly equal terms (cos = ±1): there the error is measured against the size of those terms."""
    x, y = sample.args[:2]
    if x.shape[-1] > 1:
        return relative_error(grad, ref)
    x64, y64 = x.double(), y.double()
    a = (x64 * x64).sum(-1, keepdim=True) + 1e-12
    d = (a * ((y64 * y64).sum(-1, keepdim=True) + 1e-12)).sqrt()
    scale = (g.abs().max() * y64.abs() / d).norm()
    return ((grad.double() - ref).norm() / scale).item()


def _cosine_compile_case():
    x, y, mask = make_hidden((2, 4), 40)
    return (lambda student: 2.0 * fused_loss.cosine_loss(student, y, mask=mask, weight=2.0)), x


def _cosine_launches(h, s_dtype, t_dtype, cc, rows=16384):
    K = cosine_kernels
    x, y, dx = _meta(rows, h, dtype=s_dtype), _meta(rows, h, dtype=t_dtype), _meta(rows, h, dtype=s_dtype)
    mask, coef, loss = _meta(rows, dtype=torch.bool), _meta(1), _meta(rows)
    launches = (K.fwd_launch(x, y, mask, coef, loss, dx), K.bwd_launch(dx, loss, x, y, mask, coef))
    return _specs("distil.kernels.cosine", (K.cosine_fwd_kernel, K.cosine_bwd_kernel), launches, cc)


def _cosine_aot_specs():
    """The streamed rows at every width in every dtype on both architectures; every tuning-table entry,
    fp32 (widest loads, most registers) on sm_80 and bf16 on sm_90; fp16 with an fp32 teacher at H = 768."""
    vector = [spec for h in VOCABS for dt in (F32, BF16, F16) for cc in (80, 90)
              for spec in _cosine_launches(h, dt, dt, cc)]
    other = [spec for max_h in [e[0] for e in cosine_kernels.TUNING] for dt, cc in ((F32, 80), (BF16, 90))
             for spec in _cosine_launches(max_h, dt, dt, cc)]
    other += [spec for cc in (80, 90) for spec in _cosine_launches(768, F16, F32, cc)]
    return vector, other


COSINE = OpInfo(
    name="cosine", sample_inputs=cosine_samples,
    reference=lambda x, sample: (reference.cosine_rows(x, sample.args[1].double(), sample.args[2]),),
    inactive=_cosine_inactive, coef=(0.7,), backward_coef=(0.25,), upstreams=("coef", "arbitrary", "zero coef"),
    selected_samples=lambda rows, h, device: [cosine_sample("selected", *make_hidden(rows, h, device=device)[:2],
                                                            None)],
    compile_case=_cosine_compile_case, aot_specs=_cosine_aot_specs, impls=("cpu", "triton"),
    grad_error=cosine_grad_error, scalar_edges=False,
)

OPS = [KL_CE, TOPK_KL_CE, COSINE]
