"""One whole distillation step, distiller.py-style eager against distil's pipeline.

    python benchmarks/bench_step.py                 # CUDA if present, else CPU
    python benchmarks/bench_step.py --device cpu
    python benchmarks/bench_step.py --quick         # tiny shapes: a smoke run
    python benchmarks/bench_step.py --decoder       # the causal step: a LLaMA-shaped teacher, V = 128256

A step = teacher forward (no grad), student forward + backward, gradient clipping at 5.0, AdamW step.
Every variant uses the same models, batch and masks:

- ``eager``: ``Distiller.step`` of the paper's ``distiller.py`` in MLM mode (:func:`distil.reference.distiller_step`):
  full ``[B, S, V]`` logits for teacher and student, ``masked_select`` with expanded masks,
  ``nn.KLDivLoss`` / ``nn.CrossEntropyLoss`` / ``nn.CosineEmbeddingLoss``;
- ``ours``: :class:`distil.step.DistillationStep` with logits (``distil-train --no-fused-head``): bodies on
  the batch, ``masked_gather`` of the loss rows, both LM heads on those rows only, fused losses;
- ``fused-head``: the same with the heads' output projections fused into the KL+CE loss
  (``linear_kl_ce_loss``, what ``distil-train`` runs by default): no ``[rows, V]`` logits at all.
- ``cached``: the same step with the teacher read from a teacher cache (``distil-train
  --teacher-cache``): no teacher in memory, its top-64 logits (fp16, int16 indices), lse and last
  hidden states (fp16) given as :meth:`distil.teacher_cache.TeacherCache.batch` returns them, the student's
  head fused with them (``linear_kl_ce_loss`` with a top-k teacher in exact mode, what ``--teacher-cache``
  runs by default): no ``[rows, V]`` logits either.

Modes: ``kl=non-pad`` (the default recipe) and ``kl=masked`` (``--restrict-kl-to-mask``).
Shapes: CPU, a small BERT (teacher 4 layers, H=256, V=30522; student 2 layers) at B=16, S=128;
CUDA, BERT-base (12 layers) -> 6 layers at B=32, S in {128, 512}, bf16 autocast, teacher in bf16.

``--decoder``: the causal step (``distil-train`` on a decoder teacher; :func:`distil.step.causal_labels`, no
masking, mode ``kl=non-pad`` only) with a tiny LLaMA-shaped teacher (4 layers, H=256, grouped-query
attention) and LLaMA 3's vocabulary size V=128256 -> a 2-layer student, fp32 on every device, B=2, S=512:
the vocabulary projections dominate, as in real decoders. ``eager`` is then ``distiller.py``'s causal branch
(:func:`distil.reference.distiller_causal_step`: full ``[B, S, V]`` logits of both models), and
``cached`` reads the teacher's top-64 logits (int32 indices above V=32767) and its full lse.
Peak memory: CUDA max allocated during one step above the live state; CPU, the peak RSS of a fresh
process per variant (``_common.CPU_MEMORY_METHOD``). Sequence lengths are uniform in [S/2, S] (the
longest is S), as length-grouped batches are. Writes ``benchmarks/results/step_<device>.json``.
"""
import argparse
import gc
import os

import torch
from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

from distil.fused_loss import DistillationLoss
from distil.masking import MLMMasker
from distil.reference import distiller_causal_step, distiller_step
from distil.step import DistillationStep, StudentRows, causal_labels
from distil.student import build_student, lm_adapter
from distil.teacher_cache import bytes_per_token

import _common as C  # benchmarks/ is the script's directory, so it is on sys.path

ALPHA_KL, ALPHA_MLM, ALPHA_COS, T = 5.0, 2.0, 1.0, 2.0  # ALPHA_MLM weighs the next-token loss of decoders
MODES = {"kl=non-pad": False, "kl=masked": True}
DECODER_MODES = {"kl=non-pad": False}
VARIANTS = ("eager", "ours", "fused-head", "cached")
# (teacher layers, hidden, heads, ffn, student layers, vocab, [(B, S)])
SHAPES = {
    "cpu": (4, 256, 4, 1024, 2, 30522, [(16, 128)]),
    "cuda": (12, 768, 12, 3072, 6, 30522, [(32, 128), (32, 512)]),
    "quick": (2, 64, 2, 128, 1, 1000, [(4, 32)]),
}
# (teacher layers, hidden, heads, key-value heads, ffn, student layers, vocab, [(B, S)])
DECODER_SHAPES = {
    "full": (4, 256, 4, 2, 688, 2, 128256, [(2, 512)]),
    "quick": (2, 64, 2, 1, 128, 1, 1000, [(4, 32)]),
}


TOPK = 64


def cache_teacher(teacher, ids, attn):
    """The teacher as a cache holds it for this batch, in TeacherCache.batch's [B, S, ...] layout."""
    adapter = lm_adapter(teacher)
    with torch.no_grad():
        hidden = adapter.body(ids, attn)
        logits = adapter.head(hidden).float()
    values, index = logits.topk(TOPK, -1)
    small = logits.shape[-1] <= 32767
    return {"topk_logits": values.half(), "topk_index": index.to(torch.int16 if small else torch.int32),
            "lse": torch.logsumexp(logits / T, -1), "hidden": hidden.half()}


def _padded_lengths(batch, seq, g):
    """Lengths uniform in [S/2, S], the first exactly S, and the matching attention mask."""
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
    lengths[0] = seq
    return lengths, (torch.arange(seq) < lengths[:, None]).long()


def _finish_inputs(teacher, student, batch, restrict, dtype, cached_only, causal):
    """The optimizer, the cache tensors of ``batch`` and, with ``cached_only``, no teacher."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6)
    cached = cache_teacher(teacher, *batch[:2])
    if cached_only:
        teacher = None
        gc.collect()
    return dict(teacher=teacher, student=student, optimizer=optimizer, restrict=restrict, dtype=dtype,
                batch=batch, cached=cached, causal=causal)


def make_inputs(device, shape_key, batch, seq, restrict, cached_only=False):
    """Models, optimizer and one masked batch (seeded); the teacher in bf16 on CUDA. With
    ``cached_only`` the teacher is run once for the cache tensors and then dropped."""
    t_layers, hidden, heads, ffn, s_layers, vocab, _ = SHAPES[shape_key]
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=t_layers,
                        num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=max(512, seq))
    teacher = BertForMaskedLM(config).to(device).eval().requires_grad_(False)
    student = build_student(teacher, num_layers=s_layers).to(device=device, dtype=torch.float32).train()
    student.requires_grad_(True)
    dtype = torch.bfloat16 if device == "cuda" else None
    if dtype is not None:
        teacher.to(dtype)
    g = torch.Generator().manual_seed(0)
    lengths, attention_mask = _padded_lengths(batch, seq, g)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    ids[:, 0] = 2
    ids[torch.arange(seq) == lengths[:, None] - 1] = 3
    ids[attention_mask == 0] = 0
    masker = MLMMasker(vocab, special_ids=[0, 1, 2, 3, 4], mask_id=4)
    masked, labels = masker(ids, attention_mask, g)
    batch = tuple(t.to(device) for t in (masked, attention_mask, labels))
    return _finish_inputs(teacher, student, batch, restrict, dtype, cached_only, causal=False)


def make_decoder_inputs(device, shape_key, batch, seq, restrict=False, cached_only=False):
    """A LLaMA-shaped teacher (``DECODER_SHAPES``, fp32), its half-depth student, the optimizer and one
    right-padded batch (BOS ... EOS, seeded) with its next-token labels."""
    t_layers, hidden, heads, kv_heads, ffn, s_layers, vocab, _ = DECODER_SHAPES[shape_key]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=t_layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=ffn, max_position_embeddings=seq,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    teacher = LlamaForCausalLM(config).to(device).eval().requires_grad_(False)
    student = build_student(teacher, num_layers=s_layers).to(device).train().requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    lengths, attention_mask = _padded_lengths(batch, seq, g)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    ids[:, 0] = 1
    ids[torch.arange(seq) == lengths[:, None] - 1] = 2
    ids[attention_mask == 0] = 0
    batch = tuple(t.to(device) for t in (ids, attention_mask, causal_labels(ids, attention_mask)))
    return _finish_inputs(teacher, student, batch, restrict, None, cached_only, causal=True)


def make_step(variant, inputs):
    """A closure running one full training step of ``variant`` (one of ``VARIANTS``)."""
    student, teacher, optimizer = inputs["student"], inputs["teacher"], inputs["optimizer"]
    restrict, dtype = inputs["restrict"], inputs["dtype"]
    ids, attn, labels = inputs["batch"]
    device = ids.device.type
    if variant != "eager":
        heads = {}
        if variant in ("fused-head", "cached"):  # a cached teacher has no head: only the student's is fused
            heads = dict(student_head=student.get_output_embeddings())
            if variant == "fused-head":
                heads["teacher_head"] = teacher.get_output_embeddings()
        loss_fn = DistillationLoss(kl_weight=ALPHA_KL, ce_weight=ALPHA_MLM, cos_weight=ALPHA_COS, temperature=T,
                                   **heads)
        step_fn = DistillationStep(StudentRows(student), None if variant == "cached" else teacher, loss_fn,
                                   restrict_kl_to_mask=restrict, autocast_dtype=dtype, cache_temperature=T)
        cached = inputs["cached"] if variant == "cached" else None

        def loss():
            return step_fn(ids, attn, labels, cached).total
    elif inputs["causal"]:

        def loss():
            return distiller_causal_step(student, teacher, ids, attn, alpha_kl=ALPHA_KL, alpha_clm=ALPHA_MLM,
                                         alpha_cos=ALPHA_COS, temperature=T)[0]
    else:

        def loss():
            with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                return distiller_step(student, teacher, ids, attn, labels, restrict_kl_to_mask=restrict)[0]

    def step():
        loss().backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _rss_child(argv):
    variant, model, shape_key, batch, seq, mode = argv
    make = make_decoder_inputs if model == "decoder" else make_inputs
    C.rss_child_report(
        lambda: make("cpu", shape_key, int(batch), int(seq), MODES[mode], cached_only=variant == "cached"),
        lambda inputs: make_step(variant, inputs)(),
    )


def run(device, shape_key, decoder=False):
    records = []
    shapes, modes, make = (DECODER_SHAPES, DECODER_MODES, make_decoder_inputs) if decoder else (
        SHAPES, MODES, make_inputs)
    for batch, seq in shapes[shape_key][-1]:
        for mode, restrict in modes.items():
            inputs = make(device, shape_key, batch, seq, restrict)
            steps = {v: make_step(v, inputs) for v in VARIANTS}
            if device == "cuda":
                ms = {v: C.median_ms_cuda(fn) for v, fn in steps.items()}
                peak = {v: C.cuda_peak_bytes(fn) for v, fn in steps.items()}
            else:
                ms = C.median_ms_interleaved(steps, warmup=1, min_repeats=3, max_repeats=7, budget_s=30.0)
                script = os.path.abspath(__file__)
                model = "decoder" if decoder else "encoder"
                peak = {v: C.peak_rss_subprocess([script, "--rss-child", v, model, shape_key, str(batch), str(seq),
                                                  mode]) for v in steps}
            tokens = int(inputs["batch"][1].sum())
            for v in steps:
                fp32 = device == "cpu" or decoder
                records.append(dict(op="step", dtype="fp32" if fp32 else "bf16", shape=[batch, seq],
                                    mode=mode, variant=v, ms=ms[v], peak_bytes=peak[v], status="ok",
                                    tokens_per_s=tokens / (ms[v] * 1e-3)))
            del inputs, steps
            C.free_memory(device)
    return C.add_ratios(records, baseline="eager")


def _decoder_report(records, vocab):
    """The decoder step's targets: the fused heads against distiller.py's materialised logits, the cache
    against the live teacher."""
    for shape in sorted({tuple(r["shape"]) for r in records}):
        group = {r["variant"]: r for r in records if tuple(r["shape"]) == shape}
        fused, eager, ours, cached = (group[v] for v in ("fused-head", "eager", "ours", "cached"))
        print(f"\nDecoder step, B x S = {shape[0]} x {shape[1]}, V = {vocab}:")
        mem, speed = fused["mem_ratio"], fused["speedup"]
        print(f"- fused heads vs distiller.py's logits (eager): {mem:.2f}x the peak memory at {speed:.2f}x its "
              f"tokens/s (target <= 0.35x at >= 1.0x): {'met' if mem <= 0.35 and speed >= 1.0 else 'not met'}")
        print(f"- fused heads vs ours with logits: {fused['peak_bytes'] / ours['peak_bytes']:.2f}x the peak memory "
              f"at {ours['ms'] / fused['ms']:.2f}x its tokens/s")
        for name, live in (("live teacher, fused heads (the default)", fused), ("live teacher, logits", ours)):
            speed, mem = cached["tokens_per_s"] / live["tokens_per_s"], cached["peak_bytes"] / live["peak_bytes"]
            print(f"- top-{TOPK} cache vs {name}: {speed:.2f}x tokens/s, {mem:.2f}x the peak memory "
                  f"(target >= 1.4x tokens/s): {'met' if speed >= 1.4 else 'not met'}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke run); results get a _quick suffix")
    p.add_argument("--decoder", action="store_true",
                   help="the causal step: a LLaMA-shaped teacher (V = 128256) and its half-depth student, fp32")
    C.add_output_args(p)
    p.add_argument("--rss-child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_child:
        return _rss_child(args.rss_child)
    device = C.resolve_device(p, args.device)
    if args.decoder:
        shape_key = "quick" if args.quick else "full"
        records = run(device, shape_key, decoder=True)
        print(C.markdown_table(records))
        _decoder_report(records, DECODER_SHAPES[shape_key][6])
        _save(device, args, "decoder", records, DECODER_SHAPES[shape_key],
              "fused-head: <=0.35x the peak memory of eager (materialised logits) at >=1.0x its tokens/s; "
              "cached: >=1.4x the tokens/s of the live-teacher step")
        return
    shape_key = "quick" if args.quick else device
    records = run(device, shape_key)
    print(C.markdown_table(records))
    print("\n| mode | shape | cached tokens/s | live (ours) tokens/s | speed-up | peak mem cached/live |"
          "\n|---|---|---|---|---|---|")
    for r in records:
        if r["variant"] == "cached":
            live = next(b for b in records
                        if b["variant"] == "ours" and b["mode"] == r["mode"] and b["shape"] == r["shape"])
            print(f"| {r['mode']} | {'x'.join(map(str, r['shape']))} | {r['tokens_per_s']:.0f} | "
                  f"{live['tokens_per_s']:.0f} | "
                  f"{r['tokens_per_s'] / live['tokens_per_s']:.2f}x | {r['peak_bytes'] / live['peak_bytes']:.2f} |")
    vocab = SHAPES[shape_key][5]
    print(f"\nTarget (CPU): the step from a k={TOPK} cache >= 1.8x the live-teacher step's tokens/s at <= 0.7x its "
          f"peak memory. Cache bytes per token and pass at k={TOPK}, V={vocab}: {bytes_per_token(TOPK, vocab, vocab)} "
          f"without hidden states (target <= 400), "
          f"{bytes_per_token(TOPK, vocab, vocab, hidden_size=SHAPES[shape_key][1])} "
          f"with (H={SHAPES[shape_key][1]}).")
    print("\n| mode | shape | variant | tokens/s | vs eager: speed-up | peak mem | vs ours (logits): speed-up | "
          "peak mem |\n|---|---|---|---|---|---|---|---|")
    for r in records:
        if r["variant"] == "eager":
            continue
        group = {b["variant"]: b for b in records if b["mode"] == r["mode"] and b["shape"] == r["shape"]}
        ours = group["ours"]
        print(f"| {r['mode']} | {'x'.join(map(str, r['shape']))} | {r['variant']} | {r['tokens_per_s']:.0f} | "
              f"{r['speedup']:.2f}x | {r['mem_ratio']:.2f} | {ours['ms'] / r['ms']:.2f}x | "
              f"{r['peak_bytes'] / ours['peak_bytes']:.2f} |")
    _save(device, args, None, records, SHAPES[shape_key],
          "CPU: >=1.3x, <=0.6x memory; H100 (S=512): >=1.5x tokens/s, <=0.6x memory; "
          "fused-head: <=0.5x the peak memory of ours (logits) at no loss of speed")


def _save(device, args, suffix, records, shapes, targets):
    """Write ``records`` to ``step_<device>[_<suffix>]`` (``_common.write_json``) and say where."""
    stem = C.result_stem(f"step_{device}" + (f"_{suffix}" if suffix else ""), args)
    method = C.CUDA_MEMORY_METHOD if device == "cuda" else C.CPU_MEMORY_METHOD
    path = C.write_json(stem, C.machine_info(device), records, memory_method=method, shapes=shapes, targets=targets)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
