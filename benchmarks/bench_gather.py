"""Masked-token row gather: ``distil.ops.masked_gather`` against ``x[mask]`` and distiller.py's
``torch.masked_select(x, mask.unsqueeze(-1).expand_as(x)).view(-1, H)`` idiom.

    python benchmarks/bench_gather.py                 # CUDA if present, else CPU
    python benchmarks/bench_gather.py --device cpu    # force the CPU section
    python benchmarks/bench_gather.py --rows 4096     # smaller B·S (default 16384, the issue's)
    python benchmarks/bench_gather.py --quick         # tiny shapes: a smoke run

Shapes: B·S rows of H = 768 (hidden states) and V = 30522 (logits), fp32 (and bf16 on CUDA), with
15 % and 85 % of the rows selected. Variants: ``ours`` (exact mode), ``ours_capacity``
(capacity = the count rounded up to 64, no host sync), ``index`` (``x[mask]``), ``eager`` (the
masked_select idiom, the baseline of the ratios). Modes: ``fwd`` (the selection alone) and
``fwd+bwd`` (plus the backward of a dense gradient of the selected rows into ``x.grad``).
Prints a Markdown table and the targets, writes ``benchmarks/results/gather_<device>.json``.
"""
import argparse
import os
import sys

import torch

from distil.ops import masked_gather

import _common as C  # benchmarks/ is the script's directory, so it is on sys.path

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("fwd", "fwd+bwd")
VARIANTS = ("ours", "ours_capacity", "index", "eager")
SHARES = (0.15, 0.85)


def _capacity(mask):
    return -(-int(mask.sum()) // 64) * 64


SELECT = {
    "ours": lambda x, mask, k: masked_gather(x, mask).rows,
    "ours_capacity": lambda x, mask, k: masked_gather(x, mask, capacity=k).rows,
    "index": lambda x, mask, k: x[mask],
    "eager": lambda x, mask, k: torch.masked_select(x, mask.unsqueeze(-1).expand_as(x)).view(-1, x.shape[-1]),
}


def make_inputs(n, h, dtype, share, backward, device):
    """x, its mask, the capacity, and (for the backward) one dense row gradient per output size."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, h, device=device, generator=gen).to(dtype).requires_grad_(backward)
    mask = torch.rand(n, device=device, generator=gen) < share
    k = _capacity(mask)
    grads = {}
    if backward:
        for rows in (int(mask.sum()), k):
            grads[rows] = torch.randn(rows, h, device=device, generator=gen).to(dtype)
    return {"x": x, "mask": mask, "k": k, "grads": grads}


def make_step(variant, inputs):
    select = SELECT[variant]
    x, mask, k, grads = inputs["x"], inputs["mask"], inputs["k"], inputs["grads"]

    def step():
        rows = select(x, mask, k)
        if grads:
            rows.backward(grads[rows.shape[0]])
            x.grad = None

    return step


def bytes_moved(n, h, m, dtype, mode):
    """Bytes a gather must move: read + write the selected rows; the backward writes the whole
    gradient and reads the row gradients once."""
    size = torch.empty((), dtype=dtype).element_size()
    fwd = 2 * m * h * size
    return fwd if mode == "fwd" else fwd + (n + m) * h * size


def run_cell(n, h, dtype_name, share, device, copy_gbs, memory):
    dtype = DTYPES[dtype_name]
    records = []
    for mode in MODES:
        backward = mode == "fwd+bwd"
        inputs = make_inputs(n, h, dtype, share, backward, device)
        x, mask = inputs["x"].detach(), inputs["mask"]
        m = int(mask.sum())
        for v in VARIANTS:  # every variant selects the same rows
            assert torch.equal(SELECT[v](x, mask, inputs["k"])[:m], x[mask]), v
        steps = {v: make_step(v, inputs) for v in VARIANTS}
        if device == "cuda":
            ms = {}
            for v, step in steps.items():
                step()
                ms[v] = C.median_ms_cuda(step)
        else:
            ms = C.median_ms_interleaved(steps, min_repeats=3, max_repeats=15, budget_s=6.0)
        for v in VARIANTS:
            rec = dict(op="gather", dtype=dtype_name, shape=[n, h], mode=f"{mode} {share:.0%}", variant=v,
                       ms=ms[v], peak_bytes=None, status="ok", selected=m)
            if device == "cuda":
                if memory:
                    rec["peak_bytes"] = C.cuda_peak_bytes(steps[v])
                rec["gbps"] = bytes_moved(n, h, m, dtype, mode) / (ms[v] * 1e-3) / 1e9
                rec["copy_share"] = rec["gbps"] / copy_gbs
            records.append(rec)
        del inputs, x, mask, steps
        C.free_memory(device)
        if device == "cpu" and memory:
            for rec in records[-len(VARIANTS):]:
                argv = [os.path.abspath(__file__), "--rss-child", rec["variant"], dtype_name, str(n), str(h),
                        str(share), mode]
                try:
                    rec["peak_bytes"] = C.peak_rss_subprocess(argv)
                except RuntimeError as exc:
                    print(f"  {rec['variant']} memory: {exc}", file=sys.stderr)
    return records


def rss_child(variant, dtype_name, n, h, share, mode):
    make = lambda: make_inputs(n, h, DTYPES[dtype_name], share, mode == "fwd+bwd", "cpu")  # noqa: E731
    C.rss_child_report(make, lambda inputs: make_step(variant, inputs)())


def _find(records, h, share, variant, mode, dtype="fp32"):
    for r in records:
        if (r["shape"][1], r["mode"], r["variant"], r["dtype"]) == (h, f"{mode} {share:.0%}", variant, dtype):
            return r
    return None


def targets(records, device, n, widths):
    rows = []
    vocab = widths[-1]
    ours, eager = _find(records, vocab, 0.15, "ours", "fwd"), _find(records, vocab, 0.15, "eager", "fwd")
    ratio = None
    if ours and eager and ours["peak_bytes"] is not None and eager["peak_bytes"]:
        ratio = ours["peak_bytes"] / eager["peak_bytes"]
    rows.append((f"{device}: peak memory selecting 15% of [{n}, {vocab}] fp32 rows ≤ 0.2× the masked_select idiom",
                 "not measured" if ratio is None else f"{ratio:.3f}×",
                 "–" if ratio is None else ("yes" if ratio <= 0.2 else "NO")))
    if device == "cuda":
        for h in widths:
            for share in SHARES:
                r = _find(records, h, share, "ours", "fwd+bwd")
                if r is not None:
                    rows.append((f"cuda: gather+scatter fp32 [{n}, {h}] {share:.0%} ≥ 80% of copy bandwidth",
                                 f"{100 * r['copy_share']:.0f}%", "yes" if r["copy_share"] >= 0.8 else "NO"))
    return rows


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--rows", type=int, default=16384, help="B·S (default 16384)")
    p.add_argument("--quick", action="store_true", help="tiny shapes; results get a _quick suffix")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    C.add_output_args(p)
    p.add_argument("--rss-child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = C.resolve_device(p, args.device)
    if args.rows <= 0:
        p.error("--rows must be > 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.rss_child:
        variant, dtype, n, h, share, mode = args.rss_child
        return rss_child(variant, dtype, int(n), int(h), float(share), mode)
    device = args.device
    n, widths = (256, (64, 1000)) if args.quick else (args.rows, (768, 30522))
    dtypes = ("fp32", "bf16") if device == "cuda" else ("fp32",)
    machine = C.machine_info(device)
    copy_gbs = C.copy_bandwidth_gbs(device, 2**30 if device == "cuda" else 2**28)
    print(f"# distil gather benchmark: {device}, {machine.get('gpu', machine['cpu'])}, torch {machine['torch']}; "
          f"copy bandwidth {copy_gbs:.0f} GB/s (read+write)", flush=True)
    records = []
    for h in widths:
        for dtype in dtypes:
            for share in SHARES:
                print(f"  {dtype} {n}×{h} {share:.0%} ...", flush=True)
                records += run_cell(n, h, dtype, share, device, copy_gbs, not args.no_memory)
    C.add_ratios(records, baseline="eager")
    goal_rows = targets(records, device, n, widths)
    method = C.CUDA_MEMORY_METHOD if device == "cuda" else C.CPU_MEMORY_METHOD
    timing = ("triton.testing.do_bench median (L2 flushed between runs)" if device == "cuda" else
              "perf_counter median over round-robin repeats of all variants side by side")
    print()
    print(C.markdown_table(records))
    print()
    print("| target | measured | met |\n|---|---|---|")
    print("\n".join(f"| {a} | {b} | {c} |" for a, b, c in goal_rows))
    print(f"\nTiming: {timing}. Baseline of the ratios ('eager'): distiller.py's masked_select idiom. "
          f"GB/s = bytes a gather must move (fwd: 2·M·H; fwd+bwd adds (N+M)·H) / time, "
          f"% of a {copy_gbs:.0f} GB/s copy measured in this run. {method}.")
    stem = C.result_stem(f"gather_{device}", args)
    path = C.write_json(stem, machine, records, copy_gbs=copy_gbs, timing=timing, memory_method=method,
                        targets=[dict(target=a, measured=b, met=c) for a, b, c in goal_rows])
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
