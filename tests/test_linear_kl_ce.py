"""distil::linear_kl_ce: the fused LM-head KL+CE against float64 references (losses and the hidden, weight
and bias gradients), chunking, degenerate inputs, autograd combinations, tied weights, opcheck, compile,
the module at each model family's head input, and two gloo ranks under DDP and FSDP2."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from distil import reference
from distil._ops.divergence import check_divergence
from distil._ops.registry import TRITON_IMPLS
from distil.cli import exit_without_teardown
from distil.fused_loss import (
    DistillationLoss,
    LinearKLCELoss,
    TopKLogits,
    kl_ce_loss,
    linear_kl_ce_loss,
    topk_kl_ce_loss,
)
from distil.reference import linear_distiller_losses

from aot import compile_reports, launch_spec
from helpers import API_DEVICES, GPU_RUN, TOL, RecordOps, free_port, relative_error

V = 97  # prime


def sample_inputs(rows=23, hs=16, ht=24, vocab=V, dtype=torch.float32, device="cpu", three_d=False, bias=True,
                  label_frac=0.4, mask_frac=0.7):
    """Student rows/head (requiring grad), a teacher head with another hidden size, labels and a KL mask."""
    shape = (rows // 2, 2) if three_d else (rows,)
    def make(*size, scale=1.0, grad=False):
        return (torch.randn(*size, device=device) * scale).to(dtype).requires_grad_(grad)
    student = dict(student_head_input=make(*shape, hs, grad=True), student_weight=make(vocab, hs, scale=0.5, grad=True),
                   student_bias=make(vocab, grad=True) if bias else None)
    teacher = dict(teacher_head_input=make(*shape, ht), teacher_weight=make(vocab, ht, scale=0.5),
                   teacher_bias=make(vocab) if bias else None)
    labels = torch.randint(0, vocab, shape, device=device)
    labels[torch.rand(shape, device=device) > label_frac] = -100
    kl_mask = torch.rand(shape, device=device) < mask_frac
    return student, teacher, labels, kl_mask


def _reference(student, teacher, labels, kl_mask, temperature=2.0, kl_weight=1.0, ce_weight=1.0):
    """float64 (kl, ce) of distiller.py's formulas on the heads' logits, and the student's gradients of
    kl_weight·kl + ce_weight·ce (autograd)."""
    leaves = {k: None if v is None else v.detach().double().requires_grad_() for k, v in student.items()}
    t = teacher.get("teacher_logits")
    if t is None:
        t = F.linear(*(None if v is None else v.double() for v in teacher.values()))
    kl, ce = linear_distiller_losses(leaves["student_head_input"], leaves["student_weight"], leaves["student_bias"],
                                     t.double(), labels, kl_mask, temperature=temperature)
    (kl_weight * kl + ce_weight * ce).backward()
    return kl.detach(), ce.detach(), {k: None if v is None else v.grad for k, v in leaves.items()}


def _fused(student, teacher, labels, kl_mask, **kwargs):
    for v in student.values():
        if v is not None:
            v.grad = None
    kl, ce = linear_kl_ce_loss(*student.values(), labels, kl_mask=kl_mask, **teacher, **kwargs)
    return kl, ce


def _grads(student):
    return {k: None if v is None else v.grad for k, v in student.items()}


@pytest.mark.parametrize("device", API_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("teacher_kind", ["head", "head_no_bias", "logits"])
@pytest.mark.parametrize("three_d", [False, True])
def test_matches_float64_reference(device, dtype, teacher_kind, three_d):
    student, teacher, labels, kl_mask = sample_inputs(dtype=dtype, device=device, three_d=three_d,
                                                      bias=teacher_kind != "head_no_bias")
    if teacher_kind == "logits":
        with torch.no_grad():
            teacher = {"teacher_logits": F.linear(*teacher.values()).float()}
    kl, ce = _fused(student, teacher, labels, kl_mask, kl_weight=5.0, ce_weight=2.0, chunk_rows=5)
    (5.0 * kl + 2.0 * ce).backward()
    ref_kl, ref_ce, ref_grads = _reference(student, teacher, labels, kl_mask, kl_weight=5.0, ce_weight=2.0)
    assert kl.dtype == ce.dtype == torch.float32
    assert relative_error(kl, ref_kl) < TOL[dtype] and relative_error(ce, ref_ce) < TOL[dtype]
    for name, grad in _grads(student).items():
        if ref_grads[name] is None:
            assert grad is None
            continue
        assert grad.dtype == dtype and grad.shape == student[name].shape
        assert relative_error(grad, ref_grads[name]) < TOL[dtype], name


@pytest.mark.parametrize("chunk_rows", [1, 4, 22, 23, 64])
def test_chunk_boundaries_give_the_same_result(chunk_rows):
    student, teacher, labels, kl_mask = sample_inputs(rows=23)
    kl, ce = _fused(student, teacher, labels, kl_mask, chunk_rows=chunk_rows)
    (kl + ce).backward()
    ref_kl, ref_ce, ref_grads = _reference(student, teacher, labels, kl_mask)
    assert relative_error(kl, ref_kl) < TOL[torch.float32] and relative_error(ce, ref_ce) < TOL[torch.float32]
    for name, grad in _grads(student).items():
        assert relative_error(grad, ref_grads[name]) < TOL[torch.float32], name


@pytest.mark.parametrize("combination", ["kl_only", "ce_only", "other_weights", "scaled", "accumulated"])
def test_any_combination_is_exact(combination):
    """The forward prepares 5·kl + 2·ce; other combinations are scaled or recomputed in the backward."""
    student, teacher, labels, kl_mask = sample_inputs()
    kl, ce = _fused(student, teacher, labels, kl_mask, kl_weight=5.0, ce_weight=2.0, chunk_rows=6)
    weights = {"kl_only": (1.0, 0.0), "ce_only": (0.0, 1.0), "other_weights": (1.0, 3.0), "scaled": (0.5, 0.2),
               "accumulated": (5.0, 2.0)}[combination]
    if combination == "kl_only":
        kl.backward()
    elif combination == "ce_only":
        ce.backward()
    else:
        (weights[0] * kl + weights[1] * ce).backward()
    if combination == "accumulated":  # a second micro-batch adds to .grad
        kl2, ce2 = linear_kl_ce_loss(*student.values(), labels, kl_mask=kl_mask, kl_weight=5.0, ce_weight=2.0,
                                     **teacher)
        (5.0 * kl2 + 2.0 * ce2).backward()
        weights = (10.0, 4.0)
    _, _, ref_grads = _reference(student, teacher, labels, kl_mask, kl_weight=weights[0], ce_weight=weights[1])
    for name, grad in _grads(student).items():
        assert relative_error(grad, ref_grads[name]) < TOL[torch.float32], name


def test_masks_all_ignored_and_empty_give_exact_zeros():
    student, teacher, labels, _ = sample_inputs()
    labels.fill_(-100)
    kl, ce = _fused(student, teacher, labels, torch.zeros_like(labels, dtype=torch.bool))
    (kl + ce).backward()
    assert kl.item() == 0.0 and ce.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in _grads(student).values())

    student, teacher, labels, kl_mask = sample_inputs(rows=0)
    kl, ce = _fused(student, teacher, labels, kl_mask)
    (kl + ce).backward()
    assert kl.item() == 0.0 and ce.item() == 0.0
    grads = _grads(student)
    assert grads["student_head_input"].shape == (0, 16) and torch.count_nonzero(grads["student_weight"]) == 0


def test_nan_input_gives_nan():
    student, teacher, labels, kl_mask = sample_inputs()
    with torch.no_grad():
        student["student_weight"][3, 0] = float("nan")  # logit 3 of every row
    kl, ce = _fused(student, teacher, labels, None)
    assert kl.isnan() and ce.isnan()


def test_bf16_gradient_error_no_larger_than_the_unfused_path():
    """Against float64: the fused path accumulates the weight gradient in fp32 across chunks, the unfused
    (F.linear in bf16 + kl_ce_loss) in one bf16 GEMM; neither may be worse than the unfused one."""
    student, teacher, labels, kl_mask = sample_inputs(rows=512, hs=64, ht=64, dtype=torch.bfloat16)
    _, _, ref_grads = _reference(student, teacher, labels, kl_mask)
    kl, ce = _fused(student, teacher, labels, kl_mask, chunk_rows=64)
    (kl + ce).backward()
    fused = {k: v.clone() for k, v in _grads(student).items()}
    for v in student.values():
        v.grad = None
    logits = F.linear(*student.values())
    with torch.no_grad():
        teacher_logits = F.linear(*teacher.values())
    kl, ce = kl_ce_loss(logits, teacher_logits, labels, kl_mask=kl_mask)
    (kl + ce).backward()
    for name, grad in _grads(student).items():
        fused_error, unfused_error = relative_error(fused[name], ref_grads[name]), relative_error(grad, ref_grads[name])
        assert fused_error <= unfused_error * 1.02, (name, fused_error, unfused_error)


def test_autocast_runs_the_heads_in_its_dtype():
    """As F.linear under autocast: bf16 GEMMs, fp32 parameters get fp32 gradients."""
    student, teacher, labels, kl_mask = sample_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kl, ce = _fused(student, teacher, labels, kl_mask, chunk_rows=8)
    (kl + ce).backward()
    ref_kl, ref_ce, ref_grads = _reference(student, teacher, labels, kl_mask)
    assert relative_error(kl, ref_kl) < TOL[torch.bfloat16] and relative_error(ce, ref_ce) < TOL[torch.bfloat16]
    for name, grad in _grads(student).items():
        assert grad.dtype == torch.float32
        assert relative_error(grad, ref_grads[name]) < TOL[torch.bfloat16], name


def test_teacher_gets_no_gradient_and_no_grad_computes_none():
    student, teacher, labels, kl_mask = sample_inputs()
    teacher = {k: v.requires_grad_() for k, v in teacher.items()}
    kl, ce = _fused(student, teacher, labels, kl_mask)
    (kl + ce).backward()
    assert all(v.grad is None for v in teacher.values())
    with torch.no_grad():
        kl, ce = _fused(student, teacher, labels, kl_mask)
    assert not kl.requires_grad


def test_tied_weights_sum_both_uses():
    """BERT's decoder is the word-embedding matrix: the head's gradient adds to the embedding's."""
    torch.manual_seed(1)
    emb = nn.Embedding(V, 16)
    ids = torch.randint(0, V, (20,))
    labels = torch.randint(0, V, (20,))
    teacher_logits = torch.randn(20, V)

    def step(fused):
        emb.zero_grad()
        hidden = torch.tanh(emb(ids))
        if fused:
            kl, ce = linear_kl_ce_loss(hidden, emb.weight, None, labels, teacher_logits=teacher_logits, chunk_rows=7)
        else:
            kl, ce = kl_ce_loss(F.linear(hidden, emb.weight), teacher_logits, labels)
        (kl + ce).backward()
        return emb.weight.grad.clone()

    assert relative_error(step(True), step(False)) < 1e-5


def test_errors_name_the_argument():
    student, teacher, labels, kl_mask = sample_inputs()
    hs, w, b = student.values()
    with pytest.raises(ValueError, match="student_weight"):
        linear_kl_ce_loss(hs, w[:, :5], b, labels, **teacher)
    with pytest.raises(TypeError, match="student_weight"):
        linear_kl_ce_loss(hs, w.double(), b, labels, **teacher)
    with pytest.raises(ValueError, match="teacher_weight"):
        linear_kl_ce_loss(hs, w, b, labels, **{**teacher, "teacher_weight": teacher["teacher_weight"][:5]})
    with pytest.raises(ValueError, match="labels"):
        linear_kl_ce_loss(hs, w, b, labels[:3], **teacher)
    with pytest.raises(ValueError, match="labels"):
        linear_kl_ce_loss(hs, w, b, labels.clamp(min=0) + V, **teacher)
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_kl_ce_loss(hs, w, b, labels, chunk_rows=0, **teacher)
    with pytest.raises(ValueError, match="teacher_logits"):
        linear_kl_ce_loss(hs, w, b, labels, teacher_logits=torch.randn(3, V), **teacher)


def test_opcheck():
    student, teacher, labels, kl_mask = sample_inputs(rows=9)
    plain = [v.detach() for v in student.values()]
    coef = torch.tensor([0.5, 0.25])
    # the row tensors (no precomputed or top-k teacher), the transforms (a scale and a student cap), the
    # divergence, then coef, temperature, ignore_index, chunk_rows
    args = (*plain, *teacher.values(), None, None, None, None, labels, kl_mask, 1.5, 4.0, 1.0, None, "jsd", 0.3, coef,
            2.0, -100, 4)
    torch.library.opcheck(torch.ops.distil.linear_kl_ce.default, (*args, [False, False, False], False))
    # With gradients, eager backward rewrites the op's buffer outputs in place, which opcheck's AOT
    # comparison after backward cannot model; the traced backward is covered by the compile test.
    torch.library.opcheck(torch.ops.distil.linear_kl_ce.default,
                          (*student.values(), *args[3:], [True, True, True], False),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    out = torch.ops.distil.linear_kl_ce(*args, [True, True, True], False)
    torch.library.opcheck(torch.ops.distil.linear_kl_ce_backward.default,
                          (*out[2:], torch.tensor([0.3, 0.1]), *args, False))
    # a top-k teacher (exact mode) in place of the teacher head, the student soft-capped
    topk = _topk_teacher(teacher, 4, exact=True)
    args = (*plain, None, None, None, None, topk["teacher_topk_logits"], topk["teacher_topk_index"],
            topk["teacher_lse"], labels, kl_mask, 1.0, 4.0, 1.0, None, "forward_kl", 0.0, coef, 2.0, -100, 4)
    torch.library.opcheck(torch.ops.distil.linear_kl_ce.default, (*args, [False, False, False], False))
    torch.library.opcheck(torch.ops.distil.linear_kl_ce.default,
                          (*student.values(), *args[3:], [True, True, True], False),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    student, teacher, labels, kl_mask = sample_inputs()

    @torch.compile(fullgraph=True, backend=backend)
    def step(student, teacher, labels, kl_mask):
        kl, ce = linear_kl_ce_loss(*student.values(), labels, kl_mask=kl_mask, kl_weight=5.0, ce_weight=2.0,
                                   chunk_rows=8, **teacher)
        return 5.0 * kl + 2.0 * ce

    step(student, teacher, labels, kl_mask).backward()
    _, _, ref_grads = _reference(student, teacher, labels, kl_mask, kl_weight=5.0, ce_weight=2.0)
    for name, grad in _grads(student).items():
        assert relative_error(grad, ref_grads[name]) < TOL[torch.float32], name


def test_torch_compile_fullgraph_with_a_top_k_teacher_and_a_soft_cap():
    student, teacher, labels, kl_mask = sample_inputs()
    topk = _topk_teacher(teacher, 8, exact=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(student, topk, labels, kl_mask):
        kl, ce = linear_kl_ce_loss(*student.values(), labels, kl_mask=kl_mask, kl_weight=5.0, ce_weight=2.0,
                                   chunk_rows=8, logit_softcap=4.0, **topk)
        return 5.0 * kl + 2.0 * ce

    step(student, topk, labels, kl_mask).backward()
    values, index, lse = (topk[k] for k in ("teacher_topk_logits", "teacher_topk_index", "teacher_lse"))
    _, _, ref_grads = _reference_on_logits(student, labels, kl_mask, lambda s: reference.topk_kl_ce_rows(
        s, values.double(), index, lse.double(), labels, kl_mask, 2.0), 5.0, 2.0, logit_softcap=4.0)
    for name, grad in _grads(student).items():
        assert relative_error(grad, ref_grads[name]) < TOL[torch.float32], name


# ----------------------------------------------------------------------------------------------
# A top-k teacher, logit transforms, precomputed teacher logits read in place: on both row kernels
# ----------------------------------------------------------------------------------------------
@pytest.fixture(params=["C++", "Triton"])
def backend(request):
    """The row kernels the composite calls: C++ on CPU tensors, or Triton (CUDA in a GPU run, else on CPU
    tensors through the interpreter, registered for CPU for this test)."""
    if request.param == "C++":
        return "cpu"
    if GPU_RUN:
        return "cuda"
    lib = torch.library.Library("distil", "IMPL")
    for op in ("kl_ce_rows_into", "topk_kl_ce_rows"):
        lib.impl(op, TRITON_IMPLS[op], "CPU")
    request.addfinalizer(lib._destroy)
    return "cpu"


def _topk_teacher(teacher, k, exact, temperature=2.0):
    """The teacher head's top-k logits in a shuffled order, their indices and (exact mode) the lse at T."""
    with torch.no_grad():
        t = F.linear(*(None if v is None else v.float() for v in teacher.values()))
    values, index = t.topk(k, dim=-1)
    perm = torch.argsort(torch.rand(values.shape, device=t.device), dim=-1)
    lse = torch.logsumexp(t.double() / temperature, -1).float() if exact else None
    return dict(teacher_topk_logits=values.gather(-1, perm), teacher_topk_index=index.gather(-1, perm).int(),
                teacher_lse=lse, teacher_lse_temperature=temperature if exact else None)


def _reference_on_logits(student, labels, kl_mask, loss_rows, kl_weight=1.0, ce_weight=1.0, logit_scale=1.0,
                         logit_softcap=None):
    """float64 (kl, ce) of ``loss_rows`` on the student head's transformed logits (batchmean KL, mean CE)
    and the student's gradients of kl_weight·kl + ce_weight·ce."""
    leaves = {k: None if v is None else v.detach().double().requires_grad_() for k, v in student.items()}
    kl_rows, ce_rows = loss_rows(reference.head_logits(*leaves.values(), logit_scale, logit_softcap))
    n_kl = kl_rows.numel() if kl_mask is None else int(kl_mask.sum())
    kl, ce = kl_rows.sum() / max(n_kl, 1), ce_rows.sum() / max(int((labels != -100).sum()), 1)
    (kl_weight * kl + ce_weight * ce).backward()
    return kl.detach(), ce.detach(), {k: None if v is None else v.grad for k, v in leaves.items()}


def _check_against(student, got, want, dtype):
    kl, ce = got
    ref_kl, ref_ce, ref_grads = want
    assert relative_error(kl, ref_kl) < TOL[dtype] and relative_error(ce, ref_ce) < TOL[dtype]
    for name, grad in _grads(student).items():
        assert grad.dtype == dtype and relative_error(grad, ref_grads[name]) < TOL[dtype], name


@pytest.mark.parametrize("exact", [False, True], ids=["renormalised", "exact"])
@pytest.mark.parametrize("dtype, three_d", [(torch.float32, False), (torch.bfloat16, True)])
def test_topk_teacher_matches_float64_and_topk_kl_ce_loss_on_the_logits(backend, exact, dtype, three_d):
    """The student's fused head against a top-k teacher (the teacher cache's): topk_kl_ce_loss of the
    student's logits in float64, and (fp32) the unfused topk_kl_ce_loss on materialised logits."""
    student, teacher, labels, kl_mask = sample_inputs(dtype=dtype, device=backend, three_d=three_d)
    topk = _topk_teacher(teacher, 8, exact)
    kl, ce = _fused(student, {}, labels, kl_mask, kl_weight=5.0, ce_weight=2.0, chunk_rows=5, **topk)
    (5.0 * kl + 2.0 * ce).backward()
    lse = None if topk["teacher_lse"] is None else topk["teacher_lse"].double()
    want = _reference_on_logits(student, labels, kl_mask, lambda s: reference.topk_kl_ce_rows(
        s, topk["teacher_topk_logits"].double(), topk["teacher_topk_index"], lse, labels, kl_mask, 2.0),
        kl_weight=5.0, ce_weight=2.0)
    _check_against(student, (kl, ce), want, dtype)
    if dtype == torch.float32:
        fused = [kl, ce, *(g.clone() for g in _grads(student).values())]
        for v in student.values():
            v.grad = None
        kl, ce = topk_kl_ce_loss(F.linear(*student.values()), topk["teacher_topk_logits"],
                                 topk["teacher_topk_index"], labels, teacher_lse=topk["teacher_lse"],
                                 teacher_lse_temperature=topk["teacher_lse_temperature"], kl_mask=kl_mask,
                                 kl_weight=5.0, ce_weight=2.0)
        (5.0 * kl + 2.0 * ce).backward()
        for got, unfused in zip(fused, [kl, ce, *_grads(student).values()]):
            assert relative_error(got, unfused) < 1e-5


@pytest.mark.parametrize("teacher_kind", ["head", "topk", "none"])
def test_logit_scale_and_softcap_match_float64(backend, teacher_kind):
    """``c·tanh(scale·F.linear(...)/c)`` per head (Gemma's soft cap, Cohere's scale), gradients through
    it: the announced combination, then another one (the backward's recomputation runs the transforms)."""
    student, teacher, labels, kl_mask = sample_inputs(device=backend)
    transforms = dict(logit_scale=1.5, logit_softcap=4.0)
    if teacher_kind == "head":
        t64 = reference.head_logits(*(v.double() for v in teacher.values()), 0.7, 3.0)
        fused_teacher = dict(teacher, teacher_logit_scale=0.7, teacher_logit_softcap=3.0)

        def loss_rows(s):
            return reference.kl_ce_rows(s, t64, labels, kl_mask, 2.0)
    elif teacher_kind == "topk":
        fused_teacher = _topk_teacher(teacher, 8, exact=True)
        values, index, lse = (fused_teacher[k] for k in ("teacher_topk_logits", "teacher_topk_index", "teacher_lse"))

        def loss_rows(s):
            return reference.topk_kl_ce_rows(s, values.double(), index, lse.double(), labels, kl_mask, 2.0)
    else:
        fused_teacher = {}

        def loss_rows(s):
            ce = F.cross_entropy(s, labels, reduction="none")
            return torch.zeros_like(ce), ce
    for kl_weight, ce_weight in ((5.0, 2.0), (1.0, 3.0)):
        kl, ce = _fused(student, fused_teacher, labels, kl_mask, kl_weight=5.0, ce_weight=2.0, chunk_rows=6,
                        **transforms)
        (kl_weight * kl + ce_weight * ce).backward()
        want = _reference_on_logits(student, labels, kl_mask, loss_rows, kl_weight, ce_weight, **transforms)
        _check_against(student, (kl, ce), want, torch.float32)
    plain = _reference_on_logits(student, labels, kl_mask, loss_rows, kl_weight, ce_weight)
    assert relative_error(ce, plain[1]) > 1e-2  # the transforms change the loss: the test can fail


def test_teacher_logits_are_read_in_place_whatever_their_row_strides():
    """A causal shift, ``logits[:, :-1]``: [B, S, V] rows that do not flatten into one stride are read
    one sequence at a time, not copied; a V stride other than 1 is refused."""
    student, teacher, labels, kl_mask = sample_inputs(rows=14, three_d=True)
    with torch.no_grad():
        full = F.linear(*teacher.values())
    shifted = torch.cat([full, full[:, :1]], 1)[:, :-1]  # the same values, row strides of S + 1 rows
    assert shifted.stride(0) != shifted.shape[1] * shifted.stride(1)
    results = []
    for teacher_logits in (full, shifted):
        with RecordOps() as record:
            kl, ce = _fused(student, {"teacher_logits": teacher_logits}, labels, kl_mask, chunk_rows=3)
        (args, _), = record.of(torch.ops.distil.linear_kl_ce.default)
        assert args[6].data_ptr() == teacher_logits.data_ptr()  # the op reads the caller's tensor
        (kl + ce).backward()
        results.append([kl, ce, *(g.clone() for g in _grads(student).values())])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="teacher_logits.*contiguous"):
        _fused(student, {"teacher_logits": torch.cat([full, full], -1)[..., ::2]}, labels, kl_mask)


def test_teacher_and_transform_errors_name_the_argument():
    student, teacher, labels, kl_mask = sample_inputs()
    topk = _topk_teacher(teacher, 4, exact=True)
    with pytest.raises(ValueError, match="one teacher"):
        _fused(student, dict(teacher, **topk), labels, kl_mask)
    with pytest.raises(ValueError, match="teacher_topk_logits and teacher_topk_index"):
        _fused(student, {"teacher_topk_logits": topk["teacher_topk_logits"]}, labels, kl_mask)
    with pytest.raises(ValueError, match="teacher_topk_index"):
        _fused(student, dict(topk, teacher_topk_index=topk["teacher_topk_index"][:, :3]), labels, kl_mask)
    with pytest.raises(ValueError, match="temperature"):
        _fused(student, topk, labels, kl_mask, temperature=3.0)
    with pytest.raises(ValueError, match="teacher_logit_softcap"):
        _fused(student, topk, labels, kl_mask, teacher_logit_softcap=30.0)
    with pytest.raises(ValueError, match="logit_softcap"):
        _fused(student, teacher, labels, kl_mask, logit_softcap=0.0)
    with pytest.raises(TypeError, match="teacher_logit_scale"):
        _fused(student, teacher, labels, kl_mask, teacher_logit_scale="2")
    with pytest.raises(ValueError, match="teacher_logit_softcap"):
        LinearKLCELoss(nn.Linear(16, V), teacher_logit_softcap=30.0)


def test_distillation_loss_with_heads_takes_a_top_k_teacher():
    """DistillationLoss(student_head=...) with TopKLogits: the fused student head, equal to the loss on the
    student's logits (no heads) with the same TopKLogits."""
    student, teacher, labels, _ = sample_inputs(rows=20)
    attention_mask = torch.rand(20) < 0.8
    topk = _topk_teacher(teacher, 8, exact=True)
    cached = TopKLogits(topk["teacher_topk_logits"], topk["teacher_topk_index"], topk["teacher_lse"], 2.0)
    head = nn.Linear(16, V)
    with torch.no_grad():
        head.weight.copy_(student["student_weight"])
        head.bias.copy_(student["student_bias"])
    hidden = student["student_head_input"]
    fused = DistillationLoss(cos_weight=0.0, student_head=head, chunk_rows=7)(
        None, cached, labels, attention_mask=attention_mask, student_head_input=hidden)
    fused.total.backward()
    got = [*fused[:3], hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    hidden.grad = head.weight.grad = head.bias.grad = None
    plain = DistillationLoss(cos_weight=0.0)(head(hidden), cached, labels, attention_mask=attention_mask)
    plain.total.backward()
    for a, b in zip(got, [*plain[:3], hidden.grad, head.weight.grad, head.bias.grad]):
        assert relative_error(a, b) < 1e-5
    with pytest.raises(ValueError, match="logit_softcap.*student_head"):
        DistillationLoss(logit_softcap=30.0)


# ----------------------------------------------------------------------------------------------
# The module at each model family's head input (tiny random transformers configs)
# ----------------------------------------------------------------------------------------------
def _bert():
    from transformers import BertConfig, BertForMaskedLM
    model = BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, max_position_embeddings=32))
    return model, model.bert, lambda h: model.cls.predictions.transform(h)


def _distilbert():
    from transformers import DistilBertConfig, DistilBertForMaskedLM
    model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=V, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                                                   max_position_embeddings=32))
    return model, model.distilbert, lambda h: model.vocab_layer_norm(F.gelu(model.vocab_transform(h)))


def _roberta():
    from transformers import RobertaConfig, RobertaForMaskedLM
    model = RobertaForMaskedLM(RobertaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, max_position_embeddings=40))
    head = model.lm_head
    return model, model.roberta, lambda h: head.layer_norm(F.gelu(head.dense(h)))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32))
    return model, model.model, lambda h: h  # the base model's output is already after the final norm


@pytest.mark.parametrize("family", [_bert, _distilbert, _roberta, _llama])
def test_module_at_the_documented_head_input_equals_the_models_logits(family):
    torch.manual_seed(0)
    student, student_base, student_transform = family()
    teacher, teacher_base, teacher_transform = family()
    student.eval(), teacher.eval()
    ids = torch.randint(5, V, (2, 12))
    labels = torch.full((2, 12), -100)
    labels[:, ::4] = ids[:, ::4]
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids).logits
        teacher_rows = teacher_transform(teacher_base(input_ids=ids)[0])
    logits = student(input_ids=ids).logits
    kl, ce = kl_ce_loss(logits, teacher_logits, labels)
    (kl + ce).backward()
    expected = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()

    loss = LinearKLCELoss(student.get_output_embeddings(), teacher.get_output_embeddings(), chunk_rows=5)
    fused_kl, fused_ce = loss(student_transform(student_base(input_ids=ids)[0]), labels, teacher_rows)
    (fused_kl + fused_ce).backward()
    assert relative_error(fused_kl, kl) < 1e-5 and relative_error(fused_ce, ce) < 1e-5
    for p, g in zip(student.parameters(), expected):
        assert relative_error(p.grad, g) < 1e-4


def _transformed(family, seed):
    """A tiny model whose forward transforms its logits: Gemma2's soft cap (small, so that it bites on a
    random init's small logits), Cohere's scale."""
    from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    sizes = dict(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=64, max_position_embeddings=32)
    if family == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(**sizes, head_dim=16, final_logit_softcapping=0.05)).eval()
    return CohereForCausalLM(CohereConfig(**sizes, logit_scale=0.25)).eval()


@pytest.mark.parametrize("family", ["gemma2", "cohere"])
def test_module_with_the_models_logit_transforms_equals_their_logits(family):
    """transformers applies the cap in Gemma2ForCausalLM.forward and the scale in CohereForCausalLM.forward:
    the module with the transforms read from their configs gives the losses and gradients of those logits."""
    from distil.student import logit_transform

    student, teacher = _transformed(family, 0), _transformed(family, 1)
    ids = torch.randint(3, V, (2, 12))
    labels = torch.where(torch.rand(2, 12) < 0.5, ids, -100)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids).logits
        teacher_rows = teacher.model(input_ids=ids)[0]
    kl, ce = kl_ce_loss(student(input_ids=ids).logits, teacher_logits, labels)
    (kl + ce).backward()
    expected = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    scale, softcap = logit_transform(student.config)
    teacher_scale, teacher_softcap = logit_transform(teacher.config)
    assert (scale, softcap) == {"gemma2": (1.0, 0.05), "cohere": (0.25, None)}[family]
    loss = LinearKLCELoss(student.lm_head, teacher.lm_head, chunk_rows=5, logit_scale=scale, logit_softcap=softcap,
                          teacher_logit_scale=teacher_scale, teacher_logit_softcap=teacher_softcap)
    fused_kl, fused_ce = loss(student.model(input_ids=ids)[0], labels, teacher_rows)
    (fused_kl + fused_ce).backward()
    assert relative_error(fused_kl, kl) < 1e-5 and relative_error(fused_ce, ce) < 1e-5
    for p, g in zip(student.parameters(), expected):
        assert relative_error(p.grad, g) < 1e-4
    with torch.no_grad():  # the transforms matter: the test can fail
        plain_kl, _ = LinearKLCELoss(student.lm_head, teacher.lm_head)(student.model(input_ids=ids)[0], labels,
                                                                       teacher_rows)
    assert relative_error(plain_kl, kl) > 1e-2


# ----------------------------------------------------------------------------------------------
# Two gloo ranks: DDP and FSDP2 (the head sharded, gathered by the loss module's forward)
# ----------------------------------------------------------------------------------------------
def _rank_batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    hidden = torch.randn(10, 16, generator=g)
    teacher_rows = torch.randn(10, 24, generator=g)
    labels = torch.randint(0, V, (10,), generator=g)
    return hidden, teacher_rows, labels


def _models():
    torch.manual_seed(3)
    trunk = nn.Linear(16, 16)
    head = nn.Linear(16, V)
    teacher_head = nn.Linear(24, V).requires_grad_(False)
    return trunk, head, teacher_head


class _Student(nn.Module):
    """A trunk and the fused head loss; forward returns 5·kl + 2·ce of the rank's batch."""

    def __init__(self, trunk, loss):
        super().__init__()
        self.trunk, self.loss = trunk, loss

    def forward(self, rank):
        hidden, teacher_rows, labels = _rank_batch(rank)
        kl, ce = self.loss(torch.tanh(self.trunk(hidden)), labels, teacher_rows)
        return 5.0 * kl + 2.0 * ce


def _student():
    trunk, head, teacher_head = _models()
    return _Student(trunk, LinearKLCELoss(head, teacher_head, kl_weight=5.0, ce_weight=2.0, chunk_rows=3))


def _distributed_worker(rank, port, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from torch.distributed.fsdp import fully_shard
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(_student())
        model(rank).backward()
        ddp = {k: p.grad.clone() for k, p in model.module.named_parameters() if p.requires_grad}

        model = _student()
        fully_shard(model.loss)  # holds the heads: its forward gathers them, its backward reduce-scatters
        fully_shard(model)
        model(rank).backward()
        fsdp = {k: p.grad.full_tensor() for k, p in model.named_parameters() if p.requires_grad}
        hidden, teacher_rows, labels = _rank_batch(rank)
        try:  # outside the module's call its heads are sharded DTensors: a clear error, not a wrong loss
            model.loss.forward(hidden, labels, teacher_rows)
            error = None
        except RuntimeError as exc:
            error = str(exc)
        if rank == 0:
            torch.save({"ddp": ddp, "fsdp": fsdp, "error": error}, out)
        dist.barrier()  # both ranks leave together
    finally:
        dist.destroy_process_group()
    exit_without_teardown(0)  # see its docstring: an FSDP2 process may abort in teardown


@pytest.mark.skipif(GPU_RUN, reason="CPU semantics: gloo ranks on the CPU")
def test_two_gloo_ranks_ddp_and_fsdp2_match_one_process(tmp_path):
    out = tmp_path / "grads.pt"
    mp.spawn(_distributed_worker, args=(free_port(), out), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    model = _student()
    # DDP averages the ranks' gradients (FSDP2's reduce-scatter too): the mean of the two batches' losses.
    (0.5 * (model(0) + model(1))).backward()
    expected = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    assert sorted(got["ddp"]) == sorted(got["fsdp"]) == sorted(expected)
    assert "sharded DTensor" in got["error"]
    for name, grad in expected.items():
        assert relative_error(got["ddp"][name], grad) < 1e-5, name
        assert relative_error(got["fsdp"][name], grad) < 1e-5, name


# ----------------------------------------------------------------------------------------------
# 16-bit gradients: announced at their final scale, far factors recomputed, the device-side decision
# ----------------------------------------------------------------------------------------------
def _confident(dtype, rows=1024):
    """Rows whose softmax is peaked (|logits| ~ 20): at weight/rows most gradient entries are far below
    fp16's normal range, so a gradient written small and rescaled afterwards loses them."""
    student, teacher, labels, kl_mask = sample_inputs(rows=rows, hs=32, ht=32, dtype=dtype)
    with torch.no_grad():
        student["student_weight"].mul_(6.0)
        teacher["teacher_weight"].mul_(6.0)
    return student, teacher, labels, kl_mask


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("factor", [1024.0, 1 / 64])  # a GradScaler scale, 1/grad_accum (powers of two: exact coefs)
def test_16bit_far_factor_is_recomputed_not_rescaled(dtype, factor):
    """Announcing 5·kl + 2·ce and backpropagating factor·(5·kl + 2·ce) with a factor outside [1/2, 2]
    gives the gradients of a forward that announced the product (the dense ops' 16-bit rule), not the
    forward's 16-bit buffers multiplied by the factor (fp16's underflow carried into the gradient)."""
    student, teacher, labels, kl_mask = _confident(dtype)
    kl, ce = _fused(student, teacher, labels, kl_mask, kl_weight=5.0, ce_weight=2.0)
    (factor * (5.0 * kl + 2.0 * ce)).backward()
    late = {k: v.clone() for k, v in _grads(student).items()}
    kl, ce = _fused(student, teacher, labels, kl_mask, kl_weight=5.0 * factor, ce_weight=2.0 * factor)
    (factor * (5.0 * kl + 2.0 * ce)).backward()
    for name, grad in _grads(student).items():
        assert torch.equal(late[name], grad), (name, relative_error(late[name], grad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_device_tensor_weights_equal_number_weights(dtype):
    """0-d device tensors are accepted as weights, as by kl_ce_loss (no host sync), and give the same
    losses and gradients as the numbers."""
    student, teacher, labels, kl_mask = sample_inputs(dtype=dtype)
    kl, ce = _fused(student, teacher, labels, kl_mask, kl_weight=5.0, ce_weight=2.0)
    (5.0 * kl + 2.0 * ce).backward()
    want = {k: v.clone() for k, v in _grads(student).items()}
    kl_t, ce_t = _fused(student, teacher, labels, kl_mask, kl_weight=torch.tensor(5.0), ce_weight=torch.tensor(2.0))
    (5.0 * kl_t + 2.0 * ce_t).backward()
    assert kl_t == kl and ce_t == ce
    for name, grad in _grads(student).items():
        assert torch.equal(grad, want[name]), name
    with pytest.raises(TypeError, match="kl_weight"):
        _fused(student, teacher, labels, kl_mask, kl_weight=torch.ones(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("incoming", ["announced", "double", "far", "other", "zeros"])
def test_device_decision_then_gated_scale(triton_device, dtype, incoming):
    """The sync-free backward (device-tensor weights on CUDA): the factor is decided on the device and
    applied by a kernel that reads nothing but the factor when it is 1; a rescale where it keeps the
    precision, else NaN (only a recomputation, which needs the host, could be exact)."""
    from distil._ops.linear_kl_ce import _device_factor
    from distil.kernels.gated_scale import gated_scale_

    announced = torch.tensor([0.3, 0.02], device=triton_device)
    grads = {"announced": announced.clone(), "double": 2 * announced, "far": 1024 * announced,
             "other": torch.tensor([0.3, 0.5], device=triton_device), "zeros": torch.zeros(2, device=triton_device)}
    narrow = dtype != torch.float32
    factor = _device_factor(grads[incoming], announced, narrow)
    buffer = torch.randn(3, 1000, device=triton_device).to(dtype)
    before = buffer.clone()
    gated_scale_([buffer], factor)
    expect = {"announced": 1.0, "double": 2.0, "far": float("nan") if narrow else 1024.0, "other": float("nan"),
              "zeros": float("nan") if narrow else 0.0}[incoming]
    want = (before.float() * expect).to(dtype)
    assert torch.equal(buffer.isnan(), want.isnan())
    assert torch.equal(buffer.nan_to_num(), want.nan_to_num())
    # all zero on both sides: the buffers already hold the gradient (of 0 · sums)
    assert _device_factor(torch.zeros(2), torch.zeros(2), narrow).item() == 1.0


@pytest.mark.skipif(GPU_RUN, reason="ahead-of-time builds are checked on the CPU machine")
def test_gated_scale_builds_with_128_bit_accesses_and_no_spills():
    """The backward's gated scale on sm_80 and sm_90 for every gradient dtype, at a row count of a
    [16384, 768] hidden gradient: 0 spills, every access of the buffer 128-bit (the factor is the one
    32-bit load)."""
    from distil.kernels import gated_scale as G

    specs = [launch_spec(G.gated_scale_kernel, "distil.kernels.gated_scale",
                         dict(x_ptr=torch.empty(0, dtype=dtype, device="meta"), n=16384 * 768,
                              factor_ptr=torch.empty((), device="meta"), BLOCK=G.BLOCK), cc=cc, num_warps=4)
             for dtype in (torch.float32, torch.bfloat16, torch.float16) for cc in (80, 90)]
    for spec, report in zip(specs, compile_reports(specs)):
        where = (spec["signature"]["x_ptr"], spec["cc"])
        assert report["spill_stores"] == report["spill_loads"] == 0, (where, report)
        narrow = [a for a in report["accesses"] if a["bits"] != 128]
        assert narrow == [{"op": "ld", "bits": 32, "in_loop": False}], (where, narrow)
        assert {a["op"] for a in report["accesses"] if a["bits"] == 128} == {"ld", "st"}, where


# ----------------------------------------------------------------------------------------------
# Divergences other than the forward KL through the fused heads
# ----------------------------------------------------------------------------------------------
# the public arguments of each divergence (distil/_ops/divergence.py)
HEAD_DIVERGENCES = [("reverse_kl", {}), ("jsd", {"jsd_beta": 0.3}), ("skew_kl", {"skew_alpha": 0.2}),
                    ("skew_reverse_kl", {"skew_alpha": 0.4}), ("tvd", {})]
HEAD_DIVERGENCE_IDS = [name for name, _ in HEAD_DIVERGENCES]


@pytest.mark.parametrize("divergence, params", HEAD_DIVERGENCES, ids=HEAD_DIVERGENCE_IDS)
@pytest.mark.parametrize("teacher_kind", ["head", "logits"])
def test_divergences_match_float64_and_kl_ce_loss_on_the_logits(backend, divergence, params, teacher_kind):
    """linear_kl_ce_loss(divergence=...) is kl_ce_loss(F.linear(...), ..., divergence=...): against the
    float64 definition (chunked, soft-capped student, the announced combination and then one the backward
    recomputes), and against the unfused fp32 op on materialised logits."""
    student, teacher, labels, kl_mask = sample_inputs(device=backend)
    with torch.no_grad():
        t_logits = F.linear(*teacher.values())
    fused_teacher = teacher if teacher_kind == "head" else {"teacher_logits": t_logits}
    op_divergence, op_param = check_divergence(divergence, params.get("jsd_beta", 0.5),
                                                        params.get("skew_alpha", 0.1))
    transforms = dict(logit_softcap=6.0)

    def loss_rows(s):
        return reference.kl_ce_rows(s, t_logits.double(), labels, kl_mask, 2.0, divergence=op_divergence,
                                    divergence_param=op_param)

    for kl_weight, ce_weight in ((5.0, 2.0), (1.0, 3.0)):
        kl, ce = _fused(student, fused_teacher, labels, kl_mask, kl_weight=5.0, ce_weight=2.0, chunk_rows=5,
                        divergence=divergence, **params, **transforms)
        (kl_weight * kl + ce_weight * ce).backward()
        want = _reference_on_logits(student, labels, kl_mask, loss_rows, kl_weight, ce_weight, **transforms)
        _check_against(student, (kl, ce), want, torch.float32)
    fused = [kl, ce, *(g.clone() for g in _grads(student).values())]
    forward_kl = _reference_on_logits(student, labels, kl_mask, lambda s: reference.kl_ce_rows(
        s, t_logits.double(), labels, kl_mask, 2.0), **transforms)[0]
    assert relative_error(kl, forward_kl) > 1e-2  # the divergence reached the kernel: the test can fail
    for v in student.values():
        v.grad = None
    s = reference.head_logits(*student.values(), 1.0, transforms["logit_softcap"])
    kl, ce = kl_ce_loss(s, t_logits, labels, kl_mask=kl_mask, divergence=divergence, **params)
    (kl_weight * kl + ce_weight * ce).backward()
    for got, unfused in zip(fused, [kl, ce, *_grads(student).values()]):
        assert relative_error(got, unfused) < 1e-5


@pytest.mark.parametrize("divergence, params", HEAD_DIVERGENCES, ids=HEAD_DIVERGENCE_IDS)
def test_distillation_loss_divergence_equal_with_and_without_heads(divergence, params):
    """DistillationLoss(divergence=...) gives the same kl (and gradients) from the heads as from the
    logits, and the logits path is kl_ce_loss's."""
    student, teacher, labels, _ = sample_inputs(rows=12, three_d=True)
    s_head, t_head = nn.Linear(16, V), nn.Linear(24, V)
    with torch.no_grad():
        for head, values in ((s_head, student), (t_head, teacher)):
            head.weight.copy_(values[f"{'student' if head is s_head else 'teacher'}_weight"])
            head.bias.copy_(values[f"{'student' if head is s_head else 'teacher'}_bias"])
    hs, ht = student["student_head_input"].detach(), teacher["teacher_head_input"]
    outputs = []
    for heads in (False, True):
        loss = DistillationLoss(cos_weight=0.0, student_head=s_head if heads else None,
                                teacher_head=t_head if heads else None, divergence=divergence, **params)
        x = hs.clone().requires_grad_()
        s_head.zero_grad()
        if heads:
            out = loss(labels=labels, student_head_input=x, teacher_head_input=ht)
        else:
            with torch.no_grad():
                t_logits = t_head(ht)
            out = loss(s_head(x), t_logits, labels)
        out.total.backward()
        outputs.append([out.kl, out.ce, x.grad, s_head.weight.grad.clone()])
    for a, b in zip(*outputs):
        assert relative_error(a, b) < 1e-5
    with torch.no_grad():
        kl, _ = kl_ce_loss(s_head(hs), t_head(ht), labels, divergence=divergence, **params)
    assert relative_error(outputs[0][0], kl) < 1e-6


@pytest.mark.parametrize("divergence, params", HEAD_DIVERGENCES, ids=HEAD_DIVERGENCE_IDS)
@pytest.mark.parametrize("exact", [False, True], ids=["renormalised", "exact"])
def test_divergences_with_a_top_k_teacher_match_float64_and_topk_kl_ce_loss_on_the_logits(backend, divergence,
                                                                                          params, exact):
    """linear_kl_ce_loss(divergence=...) against a top-k teacher is topk_kl_ce_loss(F.linear(...), ...,
    divergence=...): against the float64 definition on the buckets (chunked, soft-capped student, the announced
    combination and then one the backward recomputes), and against the unfused op on materialised logits."""
    student, teacher, labels, kl_mask = sample_inputs(device=backend)
    topk = _topk_teacher(teacher, 8, exact)
    op_divergence, op_param = check_divergence(divergence, params.get("jsd_beta", 0.5),
                                                        params.get("skew_alpha", 0.1))
    values, index, lse = (topk[k] for k in ("teacher_topk_logits", "teacher_topk_index", "teacher_lse"))
    transforms = dict(logit_softcap=6.0)

    def loss_rows(s, divergence=op_divergence):
        return reference.topk_divergence_rows(s, values.double(), index, None if lse is None else lse.double(),
                                              labels, kl_mask, 2.0, divergence, op_param)

    for kl_weight, ce_weight in ((5.0, 2.0), (1.0, 3.0)):
        kl, ce = _fused(student, {}, labels, kl_mask, kl_weight=5.0, ce_weight=2.0, chunk_rows=5,
                        divergence=divergence, **params, **topk, **transforms)
        (kl_weight * kl + ce_weight * ce).backward()
        want = _reference_on_logits(student, labels, kl_mask, loss_rows, kl_weight, ce_weight, **transforms)
        _check_against(student, (kl, ce), want, torch.float32)
    fused = [kl, ce, *(g.clone() for g in _grads(student).values())]
    forward_kl = _reference_on_logits(student, labels, kl_mask, lambda s: loss_rows(s, "forward_kl"),
                                      **transforms)[0]
    assert relative_error(kl, forward_kl) > 1e-2  # the divergence reached the kernel: the test can fail
    for v in student.values():
        v.grad = None
    s = reference.head_logits(*student.values(), 1.0, transforms["logit_softcap"])
    kl, ce = topk_kl_ce_loss(s, values, index, labels, teacher_lse=lse,
                             teacher_lse_temperature=topk["teacher_lse_temperature"], kl_mask=kl_mask,
                             divergence=divergence, **params)
    (kl_weight * kl + ce_weight * ce).backward()
    for got, unfused in zip(fused, [kl, ce, *_grads(student).values()]):
        assert relative_error(got, unfused) < 1e-5


@pytest.mark.parametrize("divergence, params", HEAD_DIVERGENCES[1:2], ids=HEAD_DIVERGENCE_IDS[1:2])
def test_distillation_loss_divergence_with_a_top_k_teacher_equal_with_and_without_heads(divergence, params):
    """DistillationLoss(divergence=...) with a TopKLogits teacher: the same kl (and gradients) from the student's
    head as from its logits, and the logits path is topk_kl_ce_loss's."""
    student, teacher, labels, _ = sample_inputs(rows=12, three_d=True)
    topk = _topk_teacher(teacher, 8, exact=True)
    cached = TopKLogits(topk["teacher_topk_logits"], topk["teacher_topk_index"], topk["teacher_lse"], 2.0)
    s_head = nn.Linear(16, V)
    hs = student["student_head_input"].detach()
    outputs = []
    for heads in (False, True):
        loss = DistillationLoss(cos_weight=0.0, student_head=s_head if heads else None, divergence=divergence,
                                **params)
        x = hs.clone().requires_grad_()
        s_head.zero_grad()
        out = loss(None, cached, labels, student_head_input=x) if heads else loss(s_head(x), cached, labels)
        out.total.backward()
        outputs.append([out.kl, out.ce, x.grad, s_head.weight.grad.clone()])
    for a, b in zip(*outputs):
        assert relative_error(a, b) < 1e-5
    teacher_args = dict(teacher_lse=topk["teacher_lse"], teacher_lse_temperature=2.0)
    with torch.no_grad():
        kl, _ = topk_kl_ce_loss(s_head(hs), cached.logits, cached.index, labels, **teacher_args, divergence=divergence,
                                **params)
        forward_kl, _ = topk_kl_ce_loss(s_head(hs), cached.logits, cached.index, labels, **teacher_args)
    assert relative_error(outputs[0][0], kl) < 1e-6 and relative_error(outputs[0][0], forward_kl) > 1e-2


def test_divergence_arguments_are_checked():
    student, teacher, labels, kl_mask = sample_inputs(rows=6)
    with pytest.raises(ValueError, match="divergence must be one of"):
        _fused(student, teacher, labels, kl_mask, divergence="kl")
    with pytest.raises(ValueError, match="jsd_beta is a parameter of divergence='jsd'"):
        _fused(student, teacher, labels, kl_mask, divergence="tvd", jsd_beta=0.2)
    with pytest.raises(ValueError, match="skew_alpha must be in"):
        LinearKLCELoss(nn.Linear(16, V), divergence="skew_kl", skew_alpha=1.0)
    with pytest.raises(ValueError, match="jsd_beta must be in"):
        DistillationLoss(divergence="jsd", jsd_beta=1.5)
    assert "divergence='jsd', jsd_beta=0.3" in repr(LinearKLCELoss(nn.Linear(16, V), divergence="jsd", jsd_beta=0.3))


def test_torch_compile_fullgraph_with_a_divergence():
    student, teacher, labels, kl_mask = sample_inputs()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(student, teacher, labels, kl_mask):
        kl, ce = linear_kl_ce_loss(*student.values(), labels, kl_mask=kl_mask, kl_weight=5.0, ce_weight=2.0,
                                   chunk_rows=8, divergence="skew_reverse_kl", skew_alpha=0.3, **teacher)
        return 5.0 * kl + 2.0 * ce

    step(student, teacher, labels, kl_mask).backward()
    t64 = F.linear(*(v.double() for v in teacher.values()))
    _, _, ref_grads = _reference_on_logits(student, labels, kl_mask, lambda s: reference.kl_ce_rows(
        s, t64, labels, kl_mask, 2.0, divergence="skew_reverse_kl", divergence_param=0.3), 5.0, 2.0)
    for name, grad in _grads(student).items():
        assert relative_error(grad, ref_grads[name]) < TOL[torch.float32], name
