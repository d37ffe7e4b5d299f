"""One whole distillation step, distiller.py-style eager against distil's pipeline.

    python benchmarks/bench_step.py                 # CUDA if present, else CPU
    python benchmarks/bench_step.py --device cpu
    python benchmarks/bench_step.py --quick         # tiny shapes: a smoke run

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
  hidden states (fp16) given as :meth:`distil.teacher_cache.TeacherCache.batch` returns them, the KL
  by :func:`distil.fused_loss.topk_kl_ce_loss` in exact mode.

Modes: ``kl=non-pad`` (the default recipe) and ``kl=masked`` (``--restrict-kl-to-mask``).
Shapes: CPU, a small BERT (teacher 4 layers, H=256, V=30522; student 2 layers) at B=16, S=128;
CUDA, BERT-base (12 layers) -> 6 layers at B=32, S in {128, 512}, bf16 autocast, teacher in bf16.
Peak memory: CUDA max allocated during one step above the live state; CPU, the peak RSS of a fresh
process per variant (``_common.CPU_MEMORY_METHOD``). Sequence lengths are uniform in [S/2, S] (the
longest is S), as length-grouped batches are. Writes ``benchmarks/results/step_<device>.json``.
"""
import argparse
import gc
import os

import torch
from transformers import BertConfig, BertForMaskedLM

from distil.fused_loss import DistillationLoss
from distil.masking import MLMMasker
from distil.reference import distiller_step
from distil.step import DistillationStep, StudentRows
from distil.student import build_student, lm_adapter
from distil.teacher_cache import bytes_per_token

import _common as C  # benchmarks/ is the script's directory, so it is on sys.path

ALPHA_KL, ALPHA_MLM, ALPHA_COS, T = 5.0, 2.0, 1.0, 2.0
MODES = {"kl=non-pad": False, "kl=masked": True}
VARIANTS = ("eager", "ours", "fused-head", "cached")
# (teacher layers, hidden, heads, ffn, student layers, vocab, [(B, S)])
SHAPES = {
    "cpu": (4, 256, 4, 1024, 2, 30522, [(16, 128)]),
    "cuda": (12, 768, 12, 3072, 6, 30522, [(32, 128), (32, 512)]),
    "quick": (2, 64, 2, 128, 1, 1000, [(4, 32)]),
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
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
    lengths[0] = seq
    attention_mask = (torch.arange(seq) < lengths[:, None]).long()
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    ids[:, 0] = 2
    ids[torch.arange(seq) == lengths[:, None] - 1] = 3
    ids[attention_mask == 0] = 0
    masker = MLMMasker(vocab, special_ids=[0, 1, 2, 3, 4], mask_id=4)
    masked, labels = masker(ids, attention_mask, g)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6)
    batch = tuple(t.to(device) for t in (masked, attention_mask, labels))
    cached = cache_teacher(teacher, *batch[:2])
    if cached_only:
        teacher = None
        gc.collect()
    return dict(teacher=teacher, student=student, optimizer=optimizer, restrict=restrict, dtype=dtype,
                batch=batch, cached=cached)


def make_step(variant, inputs):
    """A closure running one full training step of ``variant`` (one of ``VARIANTS``)."""
    student, teacher, optimizer = inputs["student"], inputs["teacher"], inputs["optimizer"]
    restrict, dtype = inputs["restrict"], inputs["dtype"]
    ids, attn, labels = inputs["batch"]
    device = ids.device.type
    if variant != "eager":
        heads = {}
        if variant == "fused-head":
            heads = dict(student_head=student.get_output_embeddings(), teacher_head=teacher.get_output_embeddings())
        loss_fn = DistillationLoss(kl_weight=ALPHA_KL, ce_weight=ALPHA_MLM, cos_weight=ALPHA_COS, temperature=T,
                                   **heads)
        step_fn = DistillationStep(StudentRows(student), None if variant == "cached" else teacher, loss_fn,
                                   restrict_kl_to_mask=restrict, autocast_dtype=dtype)
        cached = inputs["cached"] if variant == "cached" else None

        def loss():
            return step_fn(ids, attn, labels, cached).total
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
    variant, shape_key, batch, seq, mode = argv
    C.rss_child_report(
        lambda: make_inputs("cpu", shape_key, int(batch), int(seq), MODES[mode], cached_only=variant == "cached"),
        lambda inputs: make_step(variant, inputs)(),
    )


def run(device, shape_key):
    records = []
    for batch, seq in SHAPES[shape_key][-1]:
        for mode, restrict in MODES.items():
            inputs = make_inputs(device, shape_key, batch, seq, restrict)
            steps = {v: make_step(v, inputs) for v in VARIANTS}
            if device == "cuda":
                ms = {v: C.median_ms_cuda(fn) for v, fn in steps.items()}
                peak = {v: C.cuda_peak_bytes(fn) for v, fn in steps.items()}
            else:
                ms = C.median_ms_interleaved(steps, warmup=1, min_repeats=3, max_repeats=7, budget_s=30.0)
                script = os.path.abspath(__file__)
                peak = {v: C.peak_rss_subprocess([script, "--rss-child", v, shape_key, str(batch), str(seq), mode])
                        for v in steps}
            tokens = int(inputs["batch"][1].sum())
            for v in steps:
                records.append(dict(op="step", dtype="bf16" if device == "cuda" else "fp32", shape=[batch, seq],
                                    mode=mode, variant=v, ms=ms[v], peak_bytes=peak[v], status="ok",
                                    tokens_per_s=tokens / (ms[v] * 1e-3)))
            del inputs, steps
            C.free_memory(device)
    return C.add_ratios(records, baseline="eager")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke run); results get a _quick suffix")
    C.add_output_args(p)
    p.add_argument("--rss-child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_child:
        return _rss_child(args.rss_child)
    device = C.resolve_device(p, args.device)
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
    stem = C.result_stem(f"step_{device}", args)
    method = C.CUDA_MEMORY_METHOD if device == "cuda" else C.CPU_MEMORY_METHOD
    path = C.write_json(stem, C.machine_info(device), records, memory_method=method,
                        shapes=SHAPES[shape_key],
                        targets="CPU: >=1.3x, <=0.6x memory; H100 (S=512): >=1.5x tokens/s, <=0.6x memory; "
                        "fused-head: <=0.5x the peak memory of ours (logits) at no loss of speed")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
