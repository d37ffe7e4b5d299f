"""Ahead-of-time compilation of Triton kernels for real GPU targets on a machine with
no GPU: triton.compile builds PTX, and ptxas -v reports registers and spills."""
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget

PTXAS = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "ptxas")


def compile_report(fn, signature, constexprs, cc, num_warps=4, num_stages=3):
    """Compile ``fn`` for sm_<cc>; return dict(registers=, spill_stores=, spill_loads=)."""
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    ptx = compiled.asm["ptx"]
    arch = "sm_90a" if cc == 90 and "sm_90a" in ptx else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [PTXAS, "-v", f"--gpu-name={arch}", path, "-o", os.path.join(d, "k.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return {"registers": regs, "spill_stores": int(spill.group(1)), "spill_loads": int(spill.group(2)), "log": out}
