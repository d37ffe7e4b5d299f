"""Before / after of the 128-bit row access (kernels/rows.py) at BERT's odd vocabulary, on a GPU:
KL+CE forward+backward on [8192, 30522] logits in bf16 and fp32, with the aligned-interior rows and
with the scalar path the kernels had before (DISTIL_SCALAR_ROWS=1 makes every launch use ALIGN = 1:
no alignment hints, every access scalar). Prints ms, GB/s (3·N·V·bytes: student and teacher read
once, gradient written once) and the share of the copy bandwidth measured in the same run.

    python benchmarks/bench_vector_access.py

A one-off comparison for issue 14: remove it, and DISTIL_SCALAR_ROWS, once the GPU figures are in
the README.
"""
import os
import sys

import torch

from distil.fused_loss import kl_ce_loss

import _common as C  # benchmarks/ is the script's directory, so it is on sys.path

N, V = 8192, 30522


def main():
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 1
    copy_gbs = C.copy_bandwidth_gbs("cuda")
    print(f"copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    print("| dtype | rows | ms | GB/s | % of copy |")
    print("|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        gen = torch.Generator(device="cuda").manual_seed(0)
        s = torch.randn(N, V, device="cuda", generator=gen).mul_(2).to(dtype).requires_grad_()
        t = torch.randn(N, V, device="cuda", generator=gen).mul_(2).to(dtype)
        labels = torch.randint(0, V, (N,), device="cuda", generator=gen)
        labels[torch.rand(N, device="cuda", generator=gen) > 0.15] = -100

        def step():
            kl, ce = kl_ce_loss(s, t, labels, kl_weight=5.0, ce_weight=2.0)
            (5.0 * kl + 2.0 * ce).backward()

        for rows in ("scalar (before)", "128-bit (after)"):
            os.environ["DISTIL_SCALAR_ROWS"] = "1" if rows.startswith("scalar") else "0"
            step()  # compile outside the timed runs
            ms = C.median_ms_cuda(step, grad_to_none=[s])
            gbs = 3 * N * V * s.element_size() / (ms * 1e-3) / 1e9
            print(f"| {str(dtype)[6:]} | {rows} | {ms:.3f} | {gbs:.0f} | {100 * gbs / copy_gbs:.0f}% |", flush=True)
    os.environ.pop("DISTIL_SCALAR_ROWS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
