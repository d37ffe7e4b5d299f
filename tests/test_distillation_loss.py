"""distil.fused_loss.DistillationLoss against a float64 restatement of distiller.py's Distiller.step loss
(MLM mode), on random padded batches; pre-gathered rows; zero alphas; degenerate and bad inputs."""
import pytest
import torch

from distil.fused_loss import DistillationLoss
from distil.reference import distiller_loss

from helpers import API_DEVICES, TOL, relative_error


def distiller_step_loss(s_logits, t_logits, labels, s_hidden, t_hidden, attention_mask, *, alpha_ce, alpha_mlm,
                        alpha_cos, temperature, restrict_ce_to_mask):
    """Distiller.step's loss (distil.reference) in float64.
    Returns (total, kl, mlm, cos)."""
    s_logits, t_logits, s_hidden, t_hidden = (x.double() for x in (s_logits, t_logits, s_hidden, t_hidden))
    return distiller_loss(s_logits, t_logits, labels, s_hidden, t_hidden, attention_mask, alpha_kl=alpha_ce,
                          alpha_mlm=alpha_mlm, alpha_cos=alpha_cos, temperature=temperature,
                          restrict_kl_to_mask=restrict_ce_to_mask)


def make_batch(dtype=torch.float32, device="cpu", b=3, s=7, vocab=37, h=24):
    """A padded MLM batch as distiller.py builds it: lengths >= 2, pads never masked (labels -100)."""
    lengths = torch.tensor([s, 4, 2][:b], device=device)
    attention_mask = torch.arange(s, device=device)[None, :] < lengths[:, None]
    labels = torch.randint(0, vocab, (b, s), device=device)
    labels[(torch.rand(b, s, device=device) > 0.4) | ~attention_mask] = -100
    labels[0, 1] = 5  # at least one masked token
    s_logits = (torch.randn(b, s, vocab, device=device) * 3).to(dtype)
    t_logits = (torch.randn(b, s, vocab, device=device) * 3).to(dtype)
    t_hidden = torch.randn(b, s, h, device=device).to(dtype)
    s_hidden = (0.5 * t_hidden.float() + torch.randn(b, s, h, device=device)).to(dtype)
    return s_logits, t_logits, labels, s_hidden, t_hidden, attention_mask


def run_both(module, batch, *, alpha_ce, alpha_mlm, alpha_cos, temperature, restrict):
    s_logits, t_logits, labels, s_hidden, t_hidden, attention_mask = batch
    s_logits = s_logits.clone().requires_grad_()
    s_hidden = s_hidden.clone().requires_grad_()
    out = module(s_logits, t_logits, labels, s_hidden, t_hidden, attention_mask)
    out.total.backward()
    ref_logits = s_logits.detach().double().requires_grad_()
    ref_hidden = s_hidden.detach().double().requires_grad_()
    ref = distiller_step_loss(ref_logits, t_logits, labels, ref_hidden, t_hidden, attention_mask, alpha_ce=alpha_ce,
                              alpha_mlm=alpha_mlm, alpha_cos=alpha_cos, temperature=temperature,
                              restrict_ce_to_mask=restrict)
    ref[0].backward()
    return out, ref, (s_logits.grad, s_hidden.grad), (ref_logits.grad, ref_hidden.grad)


@pytest.mark.parametrize("device", API_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("restrict", [False, True])
def test_matches_distiller_step(device, dtype, restrict):
    batch = make_batch(dtype, device)
    module = DistillationLoss(restrict_kl_to_mask=restrict)
    out, ref, grads, ref_grads = run_both(module, batch, alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0,
                                          temperature=2.0, restrict=restrict)
    for got, want in zip(out, ref):
        assert got.dtype == torch.float32 and got.dim() == 0
        assert relative_error(got, want) <= TOL[dtype]
    for got, want in zip(grads, ref_grads):
        assert relative_error(got, want) <= TOL[dtype]
    attention_mask = batch[-1]
    assert (grads[1][~attention_mask] == 0).all()  # pads get no cosine gradient


def test_restrict_kl_to_mask_changes_the_rows():
    batch = make_batch()
    kl_all = DistillationLoss()(*batch).kl
    kl_masked = DistillationLoss(restrict_kl_to_mask=True)(*batch).kl
    assert abs(kl_all.item() - kl_masked.item()) > 1e-3


@pytest.mark.parametrize("device", API_DEVICES)
def test_pre_gathered_rows_equal_the_batch(device):
    batch = make_batch(device=device)
    module = DistillationLoss(kl_weight=3.0, ce_weight=0.5, cos_weight=2.0, temperature=1.5)
    full = module(*batch)
    attention_mask = batch[-1]
    rows = [t[attention_mask] for t in batch[:-1]]
    gathered = module(*rows)
    for got, want in zip(gathered, full):
        assert relative_error(got, want) <= 1e-6
    assert gathered.total.item() != 0.0


@pytest.mark.parametrize("alphas", [(0.0, 2.0, 1.0), (5.0, 0.0, 1.0), (5.0, 2.0, 0.0), (0.0, 0.0, 1.5)])
def test_zero_alphas_skip_their_part(alphas):
    batch = make_batch()
    alpha_kl, alpha_mlm, alpha_cos = alphas
    module = DistillationLoss(kl_weight=alpha_kl, ce_weight=alpha_mlm, cos_weight=alpha_cos)
    s_logits, t_logits, labels, s_hidden, t_hidden, attention_mask = batch
    # A skipped part never touches its inputs: pass None for them.
    skipped = (s_logits, None if alpha_kl == 0 else t_logits, labels, None if alpha_cos == 0 else s_hidden,
               None if alpha_cos == 0 else t_hidden, attention_mask)
    s_logits = s_logits.clone().requires_grad_()
    s_hidden_in = skipped[3] if skipped[3] is None else s_hidden.clone().requires_grad_()
    out = module(s_logits, skipped[1], labels, s_hidden_in, skipped[4], attention_mask)
    out.total.backward()
    ref_logits = s_logits.detach().double().requires_grad_()
    ref_hidden = s_hidden.detach().double().requires_grad_()
    ref = distiller_step_loss(ref_logits, t_logits, labels, ref_hidden, t_hidden, attention_mask, alpha_ce=alpha_kl,
                              alpha_mlm=alpha_mlm, alpha_cos=alpha_cos, temperature=2.0, restrict_ce_to_mask=False)
    ref[0].backward()
    assert relative_error(out.total, ref[0]) <= 1e-5
    for alpha, got, want in zip(alphas, out[1:], ref[1:]):
        if alpha == 0:
            assert got.item() == 0.0
        else:
            assert relative_error(got, want) <= 1e-5
    if alpha_kl == alpha_mlm == 0:
        assert s_logits.grad is None
    else:
        assert relative_error(s_logits.grad, ref_logits.grad) <= 1e-5
    if alpha_cos > 0:
        assert relative_error(s_hidden_in.grad, ref_hidden.grad) <= 1e-5


@pytest.mark.parametrize("device", API_DEVICES)
def test_no_selected_rows_gives_exact_zeros(device):
    s_logits, t_logits, labels, s_hidden, t_hidden, attention_mask = make_batch(device=device)
    s_logits.requires_grad_()
    s_hidden.requires_grad_()
    out = DistillationLoss()(s_logits, t_logits, torch.full_like(labels, -100), s_hidden, t_hidden,
                             torch.zeros_like(attention_mask))
    out.total.backward()
    assert all(part.item() == 0.0 for part in out)
    assert torch.equal(s_logits.grad, torch.zeros_like(s_logits))
    assert torch.equal(s_hidden.grad, torch.zeros_like(s_hidden))


def test_bad_inputs_name_the_argument():
    s_logits, t_logits, labels, s_hidden, t_hidden, attention_mask = make_batch()
    module = DistillationLoss()
    with pytest.raises(ValueError, match="kl_weight"):
        DistillationLoss(kl_weight=-1.0)
    with pytest.raises(ValueError, match="cos_weight"):
        DistillationLoss(cos_weight=float("nan"))
    with pytest.raises(ValueError, match="at least one"):
        DistillationLoss(kl_weight=0.0, ce_weight=0.0, cos_weight=0.0)
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(temperature=0.0)
    with pytest.raises(TypeError, match="restrict_kl_to_mask"):
        DistillationLoss(restrict_kl_to_mask=1)
    with pytest.raises(ValueError, match="project"):
        module(s_logits, t_logits, labels, s_hidden, torch.randn(3, 7, 32), attention_mask)
    with pytest.raises(ValueError, match="student_hidden"):
        module(s_logits, t_logits, labels, s_hidden[:, :5], t_hidden[:, :5], attention_mask)
    with pytest.raises(ValueError, match="teacher_logits"):
        module(s_logits, t_logits[:2], labels, s_hidden, t_hidden, attention_mask)
    with pytest.raises(TypeError, match="attention_mask"):
        module(s_logits, t_logits, labels, s_hidden, t_hidden, attention_mask.float())  # integer masks are accepted
    with pytest.raises(ValueError, match="attention_mask"):
        module(s_logits, t_logits, labels, s_hidden, t_hidden, attention_mask[:, :3])
    with pytest.raises(ValueError, match="labels"):
        module(s_logits, t_logits, labels[:2], s_hidden, t_hidden, attention_mask)
    with pytest.raises(ValueError, match="teacher_logits"):
        module(s_logits, None, labels, s_hidden, t_hidden, attention_mask)
    with pytest.raises(ValueError, match="student_hidden"):
        module(s_logits, t_logits, labels, None, None, attention_mask)


def test_torch_compile_fullgraph():
    batch = make_batch()
    module = DistillationLoss()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (compiled, module):
        s_logits, s_hidden = batch[0].clone().requires_grad_(), batch[3].clone().requires_grad_()
        out = fn(s_logits, batch[1], batch[2], s_hidden, batch[4], batch[5])
        out.total.backward()
        grads.append((out.total, s_logits.grad, s_hidden.grad))
    for got, want in zip(*grads):
        assert relative_error(got, want) <= 1e-6


def test_pre_gathered_hidden_rows_may_differ_from_logit_rows():
    """Masked-only KL/MLM rows with non-pad cosine rows, as the trainer gathers them."""
    from distil.fused_loss import cosine_loss, kl_ce_loss

    s, t = torch.randn(6, 50, requires_grad=True), torch.randn(6, 50)
    labels = torch.randint(0, 50, (6,))
    sh, th = torch.randn(9, 16, requires_grad=True), torch.randn(9, 16)
    out = DistillationLoss()(s, t, labels, sh, th)
    kl, mlm = kl_ce_loss(s.detach(), t, labels)
    cos = cosine_loss(sh.detach(), th)
    assert relative_error(out.kl, kl) <= 1e-6 and relative_error(out.ce, mlm) <= 1e-6
    assert relative_error(out.cos, cos) <= 1e-6
    assert relative_error(out.total, 5 * kl + 2 * mlm + cos) <= 1e-6
    with pytest.raises(ValueError, match="student_hidden"):
        DistillationLoss()(s.view(2, 3, 50), t.view(2, 3, 50), labels.view(2, 3), sh, th)


@pytest.mark.parametrize("restrict", [False, True])
@pytest.mark.parametrize("alphas", [(5.0, 2.0, 1.0), (0.0, 2.0, 1.0), (5.0, 0.0, 0.0)])
@pytest.mark.parametrize("teacher_kind", ["head", "logits"])
def test_heads_instead_of_logits_equal_the_logits_path(restrict, alphas, teacher_kind):
    """DistillationLoss(student_head=, teacher_head=) on the head inputs = DistillationLoss on the heads' logits."""
    _, _, labels, s_hidden, t_hidden, attention_mask = make_batch()
    student_head, teacher_head = torch.nn.Linear(24, 37), torch.nn.Linear(16, 37).requires_grad_(False)
    s_rows = s_hidden.clone().requires_grad_()
    t_rows = torch.randn(*t_hidden.shape[:-1], 16)
    kwargs = dict(kl_weight=alphas[0], ce_weight=alphas[1], cos_weight=alphas[2], restrict_kl_to_mask=restrict)
    plain = DistillationLoss(**kwargs)
    out = plain(student_head(s_rows), teacher_head(t_rows), labels, s_rows, t_hidden, attention_mask)
    out.total.backward()
    expected = [out, s_rows.grad.clone(), student_head.weight.grad.clone(), student_head.bias.grad.clone()]
    s_rows.grad = None
    student_head.zero_grad()

    fused = DistillationLoss(**kwargs, student_head=student_head,
                             teacher_head=teacher_head if teacher_kind == "head" else None, chunk_rows=4)
    teacher = (dict(teacher_head_input=t_rows) if teacher_kind == "head"
               else dict(teacher_logits=teacher_head(t_rows)))
    out = fused(None, labels=labels, student_hidden=s_rows, teacher_hidden=t_hidden, attention_mask=attention_mask,
                student_head_input=s_rows, **teacher)
    out.total.backward()
    for got, want in zip(out, expected[0]):
        assert relative_error(got, want) < 1e-5
    for got, want in zip((s_rows.grad, student_head.weight.grad, student_head.bias.grad), expected[1:]):
        assert relative_error(got, want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("grad_scale", [1024.0, 1 / 64])  # GradScaler-sized, 1/grad_accum
def test_grad_scale_reaches_the_heads_and_the_topk_teacher(dtype, grad_scale):
    """grad_scale is announced to every op (heads, top-k teacher, logits alike): each writes its 16-bit
    gradient at the final scale, the backward of (total * grad_scale) is free, and the heads path gives
    the logits path's gradient (against float64: no worse)."""
    from distil.fused_loss import TopKLogits

    from helpers import RecordOps

    torch.manual_seed(0)
    n, h, vocab = 512, 32, 37
    weight = (torch.randn(vocab, h) * 3).to(dtype)  # peaked rows: small entries that fp16 underflows at alpha / n
    labels = torch.randint(0, vocab, (n,))
    labels[torch.rand(n) > 0.3] = -100
    rows = torch.randn(n, h).to(dtype)
    t_logits = (rows.float() @ weight.float().t() * 1.1).to(dtype)
    scale = torch.tensor(grad_scale)

    def head_grad(kind):
        x = rows.clone().requires_grad_()
        head = torch.nn.Linear(h, vocab, bias=False).to(dtype).requires_grad_(False)
        head.weight.copy_(weight)
        with RecordOps() as rec:
            if kind == "heads":
                out = DistillationLoss(cos_weight=0.0, student_head=head)(
                    None, t_logits, labels, student_head_input=x, grad_scale=scale)
            elif kind == "logits":
                out = DistillationLoss(cos_weight=0.0)(head(x), t_logits, labels, grad_scale=scale)
            else:
                values, index = t_logits.float().topk(vocab, dim=-1)
                teacher = TopKLogits(values, index, torch.logsumexp(t_logits.float() / 2.0, -1), temperature=2.0)
                out = DistillationLoss(cos_weight=0.0)(head(x), teacher, labels, grad_scale=scale)
        (out.total * scale).backward()
        op = {"heads": torch.ops.distil.linear_kl_ce.default, "logits": torch.ops.distil.kl_ce_rows.default,
              "topk": torch.ops.distil.topk_kl_ce_rows.default}[kind]
        (args, _), = rec.of(op)
        coef = args[[a.name for a in op._schema.arguments].index("coef")]
        want = torch.stack([scale * 5.0 / n, scale * 2.0 / (labels != -100).sum()])
        assert torch.equal(coef, want), (kind, coef, want)
        return x.grad.double() / grad_scale

    ref_x = rows.double().requires_grad_()
    ref = distiller_step_loss(ref_x @ weight.double().t(), t_logits, labels, ref_x, ref_x, None, alpha_ce=5.0,
                              alpha_mlm=2.0, alpha_cos=0.0, temperature=2.0, restrict_ce_to_mask=False)[0]
    ref.backward()
    heads, logits, topk = head_grad("heads"), head_grad("logits"), head_grad("topk")
    for other in (heads, topk):  # k = V in exact mode: the dense loss
        assert relative_error(other, logits) < 1e-3
        assert relative_error(other, ref_x.grad) <= 1.05 * relative_error(logits, ref_x.grad) + 1e-6


def _count_scalar_checks(monkeypatch):
    """Replaces every scalar check of distil.checks, wherever distil imported it by name, by one that
    records its name; returns the list of names."""
    import sys

    import distil.checks

    calls = []
    for name, check in list(vars(distil.checks).items()):
        if not (name.startswith("check_") and callable(check)):
            continue

        def counted(*args, _check=check, _name=name, **kwargs):
            calls.append(_name)
            return _check(*args, **kwargs)

        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith("distil") and getattr(module, name, None) is check:
                monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("path", ["logits", "kl_only", "ce_only", "heads", "heads_teacher_logits", "topk",
                                  "heads_topk"])
@pytest.mark.parametrize("grad_scale", [None, "tensor", "number"])
def test_forward_hands_checked_scalars_down(monkeypatch, path, grad_scale):
    """DistillationLoss checks its scalars once, in __init__, and calls the ops' checked cores: a forward
    runs no scalar check of distil.checks but that of the call's own grad_scale (a number; a tensor is a
    tensor check), on every path. The public ops run them (the counting is live)."""
    from distil.fused_loss import TopKLogits, kl_ce_loss

    calls = _count_scalar_checks(monkeypatch)
    s_logits, t_logits, labels, s_hidden, t_hidden, attention_mask = make_batch()
    kl_ce_loss(s_logits, t_logits, labels)
    assert "check_temperature" in calls and "check_divergence" in calls
    weights = {"kl_only": dict(ce_weight=0.0), "ce_only": dict(kl_weight=0.0)}.get(path, {})
    heads = path.startswith("heads")
    student_head, teacher_head = torch.nn.Linear(24, 37), torch.nn.Linear(24, 37)
    module = DistillationLoss(**weights, student_head=student_head if heads else None,
                              teacher_head=teacher_head if path == "heads" else None)
    teacher = dict(teacher_logits=t_logits)
    if path == "heads":
        teacher = dict(teacher_head_input=t_hidden)
    elif path.endswith("topk"):
        values, index = t_logits.topk(5, -1)
        teacher = dict(teacher_logits=TopKLogits(values, index))
    scale = {None: None, "tensor": torch.tensor(0.5), "number": 0.5}[grad_scale]
    calls.clear()
    out = module(None if heads else s_logits.requires_grad_(), labels=labels, student_hidden=s_hidden,
                 teacher_hidden=t_hidden, attention_mask=attention_mask,
                 student_head_input=s_hidden if heads else None, grad_scale=scale, **teacher)
    out.total.backward()
    assert calls == (["check_non_negative_finite", "check_real"] if grad_scale == "number" else [])
    assert out.total.item() > 0
