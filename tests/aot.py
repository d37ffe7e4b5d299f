"""Ahead-of-time compilation of Triton kernels for real GPU targets on a machine with no GPU.

``triton.compile`` builds PTX for sm_<cc> and ``ptxas -v`` reports registers and spills. The
compilation runs in a subprocess because the test session itself runs Triton in interpreter mode
(TRITON_INTERPRET=1), where @triton.jit functions cannot be compiled.

A spec is a dict: module (e.g. "distil.kernels.kl_ce"), kernel (function name), signature
({arg: "*bf16" | "i64" | "fp32" | "constexpr" ...}), constexprs ({arg: value}), cc (80 or 90),
num_warps, and optionally maxnreg. ``compile_reports(specs)`` returns one dict(registers=, spill_stores=, spill_loads=) per spec.
"""
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

PTXAS = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "ptxas")


def compile_reports(specs):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], input=json.dumps(specs), capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compilation failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _compile_one(spec):
    import triton
    from triton.backends.compiler import GPUTarget

    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    src = triton.compiler.ASTSource(fn=fn, signature=spec["signature"], constexprs=spec["constexprs"])
    compiled = triton.compile(
        src, target=GPUTarget("cuda", spec["cc"], 32),
        options={"num_warps": spec["num_warps"], "num_stages": 3, "maxnreg": spec.get("maxnreg")},
    )
    ptx = compiled.asm["ptx"]
    arch = re.search(r"\.target (sm_\w+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [PTXAS, "-v", f"--gpu-name={arch}", path, "-o", os.path.join(d, "k.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return {
        "registers": int(re.search(r"Used (\d+) registers", out).group(1)),
        "spill_stores": int(spill.group(1)),
        "spill_loads": int(spill.group(2)),
        "arch": arch,
    }


if __name__ == "__main__":
    print(json.dumps([_compile_one(s) for s in json.loads(sys.stdin.read())]))
