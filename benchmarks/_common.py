"""Shared helpers for distil's benchmarks (bench_loss.py, bench_gather.py, bench_step.py):
machine info, side-by-side timing (CPU and CUDA), peak memory, bandwidth, Markdown tables,
result files (JSON, PNG).

A benchmark produces *records*: flat dicts with at least ``op, dtype, shape, mode, variant,
ms, peak_bytes, status`` (``status`` is "ok", "oom", "n/a" or an error message), and
optionally ``gbps`` / ``copy_share``.  ``add_ratios`` adds ``speedup`` and ``mem_ratio``
against a baseline variant; ``markdown_table`` and ``plot_records`` read those records.
"""
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

CPU_MEMORY_METHOD = (
    "CPU peak memory: each variant runs in a fresh subprocess that builds its inputs, runs the "
    "step once (warm-up: torch.compile, thread pools, lazy loads), resets the kernel's peak-RSS "
    "mark (/proc/self/clear_refs 5), then reports VmHWM minus VmRSS over one more step "
    "(falls back to resource.getrusage ru_maxrss minus the RSS after input set-up, without "
    "the warm-up, where clear_refs is unavailable); glibc's mmap threshold is pinned at 64 KiB "
    "there so that freed buffers leave RSS and every allocation is seen"
)
CUDA_MEMORY_METHOD = (
    "CUDA peak memory: torch.cuda.max_memory_allocated during one step minus the bytes "
    "allocated before it (the inputs), after reset_peak_memory_stats"
)


# ---------------------------------------------------------------- machine
def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device):
    """Versions and hardware of this run, stored in every result file."""
    import triton

    info = {
        "device": device,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_bytes=props.total_memory,
            sm_count=props.multi_processor_count,
            l2_bytes=l2_cache_bytes(),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            cuda=torch.version.cuda,
        )
    return info


def machine_tag(device):
    """File-name tag: the GPU's name, or the CPU model and core count, as a slug."""
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"{cpu_model()} {os.cpu_count()}c"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug.removeprefix("nvidia-") or "unknown"


def l2_cache_bytes():
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)


def is_oom(exc):
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def free_memory(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- timing
def make_step(loss_fn, inputs, backward, clear_grads=True):
    """One benchmark step: ``loss_fn(**inputs)``, then ``.backward()`` when ``backward``.
    With ``clear_grads`` the inputs' ``.grad`` are dropped at the end of the step, so every
    step allocates its gradients afresh and keeps nothing (pass False where the timer clears
    them itself, as do_bench's ``grad_to_none`` does)."""
    leaves = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]

    def step():
        loss = loss_fn(**inputs)
        if backward:
            loss.backward()
        if clear_grads:
            for leaf in leaves:
                leaf.grad = None

    step.leaves = leaves
    return step


def median_ms_interleaved(fns, *, warmup=1, min_repeats=3, max_repeats=15, budget_s=10.0):
    """CPU timing of several callables side by side: round-robin repeats (so load from other
    processes hits every variant alike) until each has ``min_repeats`` samples and the budget
    is spent, or ``max_repeats``.  Returns {name: median ms}."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    start = time.perf_counter()
    for i in range(max_repeats):
        if i >= min_repeats and time.perf_counter() - start > budget_s:
            break
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def median_ms_cuda(fn, grad_to_none=None):
    """CUDA median ms of ``fn`` with triton.testing.do_bench (which flushes L2 between runs)."""
    from triton.testing import do_bench

    return do_bench(fn, grad_to_none=grad_to_none, return_mode="median")


def rotation_count(bytes_per_set, device):
    """How many distinct input sets to rotate among so that one set is never served from L2:
    enough to cover twice the L2 (1 when one set already does, and always 1 on CPU)."""
    if device != "cuda" or bytes_per_set <= 0:
        return 1
    return max(1, min(8, math.ceil(2 * l2_cache_bytes() / bytes_per_set)))


# ---------------------------------------------------------------- memory
def cuda_peak_bytes(fn):
    """Peak CUDA bytes that one call of ``fn`` allocates above what is live before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _proc_status_bytes(field):
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
    return int(match.group(1)) * 1024


def rss_child_report(make_inputs, step):
    """Child side of ``peak_rss_subprocess``: prints one line ``RSS_DELTA <bytes>``.
    ``step(inputs)`` must drop what it allocates (gradients included) before returning
    whatever it keeps, since only one step is measured."""
    inputs = make_inputs()
    try:
        step(inputs)
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        base = _proc_status_bytes("VmRSS")
        step(inputs)
        delta = _proc_status_bytes("VmHWM") - base
    except OSError:
        import resource

        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        step(inputs)
        delta = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(f"RSS_DELTA {delta}", flush=True)


def peak_rss_subprocess(argv, timeout=600):
    """Runs ``python argv...`` (a script whose child mode calls ``rss_child_report``) and
    returns its reported bytes, or raises RuntimeError with the child's stderr tail."""
    # A fixed mmap threshold: glibc otherwise raises it after a free, and buffers up to 32 MiB
    # would then be reused from the heap without touching RSS.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, env=env)
    match = re.search(r"^RSS_DELTA (-?\d+)$", proc.stdout, re.M)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"memory child failed (rc={proc.returncode}): {proc.stderr.strip()[-500:]}")
    return int(match.group(1))


# ---------------------------------------------------------------- bandwidth
def copy_bandwidth_gbs(device, nbytes=2**30):
    """Device-to-device (or RAM-to-RAM) copy bandwidth, counting bytes read plus written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)

    if device == "cuda":
        ms = median_ms_cuda(copy)
    else:
        ms = median_ms_interleaved({"copy": copy}, min_repeats=5, budget_s=2.0)["copy"]
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------- records and output
def add_ratios(records, baseline="eager"):
    """Adds ``speedup`` (baseline ms / ms) and ``mem_ratio`` (peak / baseline peak) to each ok
    record whose (op, dtype, shape, mode) group has an ok baseline record."""
    key = lambda r: (r["op"], r["dtype"], tuple(r["shape"]), r["mode"])  # noqa: E731
    base = {key(r): r for r in records if r["variant"] == baseline and r["status"] == "ok"}
    for r in records:
        b = base.get(key(r))
        if r["status"] != "ok" or b is None:
            continue
        r["speedup"] = b["ms"] / r["ms"]
        if r.get("peak_bytes") is not None and b.get("peak_bytes"):
            r["mem_ratio"] = r["peak_bytes"] / b["peak_bytes"]
    return records


def _fmt(value, spec):
    return "–" if value is None else format(value, spec)


def markdown_table(records):
    """GitHub Markdown table of the records, one row per (op, dtype, shape, mode, variant)."""
    with_bw = any(r.get("gbps") is not None for r in records)
    head = ["op", "dtype", "shape", "mode", "variant", "median ms", "× vs eager", "peak MiB", "mem vs eager"]
    if with_bw:
        head += ["GB/s", "% copy BW"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        shape = "×".join(str(d) for d in r["shape"])
        ok = r["status"] == "ok"
        peak = r.get("peak_bytes")
        cells = [
            r["op"], r["dtype"], shape, r["mode"], r["variant"],
            _fmt(r.get("ms"), ".3f") if ok else r["status"],
            _fmt(r.get("speedup"), ".2f"),
            _fmt(None if peak is None else peak / 2**20, ".1f"),
            _fmt(r.get("mem_ratio"), ".2f"),
        ]
        if with_bw:
            share = r.get("copy_share")
            cells += [_fmt(r.get("gbps"), ".3g"), _fmt(None if share is None else 100 * share, ".0f")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def add_output_args(parser):
    """``--save``: where a benchmark's result files go (see :func:`result_stem`)."""
    parser.add_argument("--save", action="store_true",
                        help="update the committed reference results in benchmarks/results/ (default: write "
                             "<name>_local.json/.png there, which git ignores; --quick writes <name>_quick.*)")


def result_stem(stem, args):
    """The file stem a run writes: ``stem`` itself (the committed reference) only with ``--save``, so
    that trying a benchmark never dirties the working tree; ``_quick`` for smoke runs, else ``_local``."""
    if args.quick:
        return stem + "_quick"
    return stem if args.save else stem + "_local"


def format_seconds(seconds):
    """``75.3`` -> ``"1m15s"``; under a minute ``"42.0s"``."""
    return f"{seconds:.1f}s" if seconds < 60 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def write_json(stem, machine, records, **extra):
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{stem}.json"
    path.write_text(json.dumps({"machine": machine, **extra, "records": records}, indent=1) + "\n")
    return path


def plot_records(stem, records, title, mode="fwd+bwd", baseline="eager", memory_note=""):
    """Two bar charts of the ratios to the baseline (``add_ratios``) for ``mode``: the speed-up (baseline
    ms / ms, higher is better) and the peak memory (peak / baseline peak, lower is better), one group of
    bars per (op, dtype, shape), one bar per variant (the baseline is the line at 1), each labelled with
    its ratio; ``memory_note`` says in the title how the peak was measured.  Returns the PNG path, or None
    when matplotlib is absent or nothing has a ratio."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in records if r["mode"] == mode and r.get("speedup") is not None and r["variant"] != baseline]
    groups = list(dict.fromkeys((r["op"], r["dtype"], tuple(r["shape"])) for r in rows))
    if not groups:
        return None
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    colors = {v: f"C{i}" for i, v in enumerate(variants)}
    metrics = [("speedup", f"speed-up over {baseline} (×, higher is better)")]
    if any(r.get("mem_ratio") is not None for r in rows):
        metrics.append(("mem_ratio", f"peak memory vs {baseline} (×, lower is better)"))
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(8.0, 1.25 * len(groups) + 2), 3.6 * len(metrics)),
                             squeeze=False, layout="constrained")
    for ax, (key, ylabel) in zip(axes[:, 0], metrics):
        width = 0.8 / max(1, max(sum(1 for r in rows if (r["op"], r["dtype"], tuple(r["shape"])) == g) for g in groups))
        top = 0.0
        for j, g in enumerate(groups):
            sel = [r for r in rows if (r["op"], r["dtype"], tuple(r["shape"])) == g]
            x0 = j - width * (len(sel) - 1) / 2
            for i, r in enumerate(sel):
                value = r.get(key)
                if value is None:  # e.g. a baseline peak of 0 bytes: no ratio to draw
                    ax.text(x0 + i * width, 0, "n/a", ha="center", va="bottom", fontsize=7)
                    continue
                bars = ax.bar(x0 + i * width, value, width, color=colors[r["variant"]])
                ax.bar_label(bars, labels=[f"{value:.2f}×" if value < 10 else f"{value:.1f}×"], fontsize=7, padding=1)
                top = max(top, value)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.text(-0.55, 1.0, f"{baseline} = 1", va="bottom", ha="left", fontsize=7)
        ax.set_ylim(0, max(top, 1.0) * 1.15)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{op} {dtype}\n{'×'.join(map(str, shape))}" for op, dtype, shape in groups], fontsize=8)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.set_ylabel(ylabel, fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[v]) for v in variants]
    axes[0, 0].legend(handles, variants, fontsize=8, ncols=len(variants), loc="upper left")
    fig.suptitle(f"{title} ({mode}{'; ' + memory_note if memory_note else ''})", fontsize=10)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{stem}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def resolve_device(parser, device):
    """--device auto|cpu|cuda -> "cpu" or "cuda"; a parser error if CUDA is asked for and absent."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    return device
