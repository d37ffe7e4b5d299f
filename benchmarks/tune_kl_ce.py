"""Sweep the KL+CE kernel's (BLOCK_V, num_warps) on a GPU and print effective bandwidth, to fill
kernels/rows.py's TUNING table. GB/s = 3·N·V·bytes / time (s and t read once, grad written once)."""
import argparse

import torch
import triton

from distil.kernels import kl_ce as K


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--vocab", type=int, nargs="+", default=[30522, 50257])
    args = ap.parse_args()
    src = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    copy_gbs = 2 * src.numel() / copy_ms / 1e6
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s")
    print("| V | dtype | BLOCK_V | warps | ms | GB/s | % of copy |")
    print("|---|---|---|---|---|---|---|")
    for vocab in args.vocab:
        for dtype in (torch.bfloat16, torch.float32):
            s = torch.randn(args.n, vocab, device="cuda").to(dtype)
            t = torch.randn(args.n, vocab, device="cuda").to(dtype)
            labels = torch.randint(0, vocab, (args.n,), device="cuda")
            labels[torch.rand(args.n, device="cuda") > 0.15] = -100
            coef = torch.tensor([1.0, 1.0], device="cuda")
            kl, ce = (torch.empty(args.n, device="cuda") for _ in range(2))
            grad = torch.empty_like(s)
            nbytes = 3 * s.numel() * s.element_size()
            for block in (1024, 2048, 4096, 8192, 16384, 32768):
                for warps in (4, 8, 16, 32):
                    if block // (warps * 32) < 4 or block // (warps * 32) > 64:
                        continue
                    def fn():
                        return K.kl_ce_rows(s, t, labels, None, coef, 2.0, -100, kl, ce, grad, block_v=block,
                                            num_warps=warps)
                    try:
                        ms = triton.testing.do_bench(fn, return_mode="median")
                    except Exception as exc:  # out of resources at this config
                        print(f"| {vocab} | {dtype} | {block} | {warps} | failed: {type(exc).__name__} | | |")
                        continue
                    gbs = nbytes / ms / 1e6
                    print(f"| {vocab} | {str(dtype)[6:]} | {block} | {warps} | {ms:.3f} | {gbs:.0f} | "
                          f"{100 * gbs / copy_gbs:.0f}% |")


if __name__ == "__main__":
    main()
