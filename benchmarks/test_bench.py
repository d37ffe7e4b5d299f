"""pytest-benchmark microbenchmarks of bench_loss.py's comparisons (same ops, variants and modes),
grouped so that each group prints its variants side by side:

    python -m pytest benchmarks/test_bench.py [--benchmark-json=out.json]

Not part of the test suite (pyproject's ``testpaths = ["tests"]``).  Small CPU shapes by default,
the headline shapes when CUDA is present.  Each case first checks its loss value against eager,
so a fast number can never be a wrong one.
"""
import pytest
import torch

from benchmarks import _common as C
from benchmarks import bench_loss as B

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = {"cpu": [("fp32", 256, 30522)], "cuda": [("bf16", 8192, 30522), ("fp32", 8192, 30522)]}[DEVICE]
ROUNDS = {"cpu": 5, "cuda": 30}[DEVICE]
# Loss values against eager in the inputs' dtype: the tests' tolerance table (tests/helpers.py) is
# against float64, so it does not apply here; bf16/fp16 eager itself is off by ~1e-2.
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 1e-2}


@pytest.mark.parametrize("mode", B.MODES)
@pytest.mark.parametrize("dtype,n,v", SHAPES, ids=[f"{d}-{n}x{v}" for d, n, v in SHAPES])
@pytest.mark.parametrize("variant", ["ours", "unfused", "eager", "compile", "liger"])
@pytest.mark.parametrize("op", list(B.OPS))
def test_loss(benchmark, op, variant, dtype, n, v, mode):
    torch._dynamo.reset()  # a fresh static compile per case, clear of the recompile limit
    fns = B.variants(B.OPS[op], (variant, "eager"), DEVICE)
    if variant not in fns:
        pytest.skip(f"no {variant} variant of {op} on this machine")
    inputs = B.OPS[op].make_inputs(n, v, B.DTYPES[dtype], DEVICE)
    err = B.loss_rel_err(fns, inputs)
    assert err.get(variant, float("inf")) <= TOLERANCE[dtype], f"{variant} loss differs from eager: {err}"

    step = C.make_step(fns[variant], inputs, backward=mode == "fwd+bwd")
    if DEVICE == "cuda":
        timed = lambda: (step(), torch.cuda.synchronize())  # noqa: E731  (time the kernels, not the launches)
    else:
        timed = step
    benchmark.group = f"{op} {dtype} {n}x{v} {mode}"
    benchmark.extra_info.update(bytes_moved=B.OPS[op].bytes_moved(n, v, B.DTYPES[dtype]))
    benchmark.pedantic(timed, warmup_rounds=1, rounds=ROUNDS, iterations=1)
