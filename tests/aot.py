"""Ahead-of-time compilation of Triton kernels for real GPU targets on a machine with no GPU.

``triton.compile`` builds PTX for sm_<cc>; ``ptxas -v`` reports registers and spills, and the PTX
itself shows how wide every global memory access is. The compilation runs in a subprocess because
the test session runs Triton in interpreter mode (TRITON_INTERPRET=1), where @triton.jit functions
cannot be compiled.

A spec is a dict: module (e.g. "distil.kernels.kl_ce"), kernel (function name), signature
({arg: "*bf16" | "i32" | "fp32" | "constexpr" ...}), constexprs ({arg: value}), attrs ({arg: "D"}:
divisible by 16), cc (80 or 90), num_warps, maxnreg. :func:`launch_spec` builds one from the arguments of a
launch, specialised exactly as Triton specialises a real launch. ``compile_reports(specs)`` returns
per spec: registers, spill_stores, spill_loads, arch, and ``accesses``: every global load / store of
the PTX as ``{"op": "ld" | "st", "bits": access width, "in_loop": inside a loop body}``.
"""
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

PTXAS = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "ptxas")


def launch_spec(kernel, module, args, *, cc, num_warps, maxnreg=None):
    """The spec Triton compiles when ``kernel`` is launched with ``args`` ({parameter: value}).

    Values: tensors (meta tensors will do) or ``torch.dtype`` for tensor arguments (base pointers
    taken as 16-byte aligned, as every fresh allocation is), Python ints / floats / bools as passed,
    and the constexpr values.
    Triton's own launch-time rule (``native_specialize_impl``) decides: an int equal to 1 becomes the
    constant 1, an int divisible by 16 gets ``tt.divisibility = 16`` and no other does, an aligned
    pointer gets ``tt.divisibility = 16``."""
    import torch
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import MockTensor

    signature, constexprs, attrs = {}, {}, {}
    # kernel.fn: the Python function, also when the session's Triton is the interpreter.
    for name, param in inspect.signature(kernel.fn).parameters.items():
        value = args[name]
        if "constexpr" in str(param.annotation):
            signature[name], constexprs[name] = "constexpr", value
            continue
        arg = MockTensor(value.dtype) if isinstance(value, torch.Tensor) else MockTensor.wrap_dtype(value)
        kind, attr = native_specialize_impl(BaseBackend, arg, False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = attr
        elif attr:
            attrs[name] = attr
    return dict(module=module, kernel=kernel.__name__, signature=signature, constexprs=constexprs, attrs=attrs,
                cc=cc, num_warps=num_warps, maxnreg=maxnreg)


def main_loop_widths(report):
    """(bits of every global access inside a loop, bits of those outside): 128-bit main loops have
    only 128 in the first; the scalar head / tail code shows in the second."""
    return ([a["bits"] for a in report["accesses"] if a["in_loop"]],
            [a["bits"] for a in report["accesses"] if not a["in_loop"]])


def compile_reports(specs):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], input=json.dumps(specs), capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compilation failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")
_BLOCK = re.compile(r"^(\$L__BB\w+):(.*)")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\w+);")


def global_accesses(ptx):
    """Every ld.global / st.global of a PTX listing with its width in bits and whether it lies in a
    loop: in a basic block LLVM annotates as part of one ("in Loop: Header=...", "Loop Header"), in a
    header those annotations name, or in a single-block loop (a block that branches to itself);
    LLVM leaves the last two unannotated."""
    blocks = [["", "", []]]  # label, annotation, lines
    for line in ptx.splitlines():
        block = _BLOCK.match(line)
        if block:
            blocks.append([block.group(1), block.group(2), []])
        else:
            blocks[-1][2].append(line)
    headers = {"$L__" + h for _, note, _ in blocks for h in re.findall(r"Header=(BB\w+)", note)}
    accesses = []
    for label, note, lines in blocks:
        in_loop = ("Loop" in note or label in headers
                   or any(m and m.group(1) == label for m in map(_BRANCH.search, lines)))
        for line in lines:
            match = _ACCESS.search(line)
            if not match:
                continue
            suffixes = match.group(2).split(".")
            lanes = next((int(x[1:]) for x in suffixes if re.fullmatch(r"v\d", x)), 1)
            bits = next(int(x[1:]) for x in reversed(suffixes) if re.fullmatch(r"[bfsu]\d+", x))
            accesses.append({"op": match.group(1), "bits": lanes * bits, "in_loop": in_loop})
    return accesses


def _compile_one(spec):
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget

    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    attrs = {(fn.arg_names.index(name),): BaseBackend.parse_attr(desc) for name, desc in spec.get("attrs", {}).items()}
    src = triton.compiler.ASTSource(fn=fn, signature=spec["signature"], constexprs=spec["constexprs"], attrs=attrs)
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
        "accesses": global_accesses(ptx),
    }


if __name__ == "__main__":
    print(json.dumps([_compile_one(s) for s in json.loads(sys.stdin.read())]))
