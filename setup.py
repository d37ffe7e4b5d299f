"""Build distil: the Python packages plus the C++/CUDA extension ``distil._C``.

The C++ sources (csrc/*.cpp) are always compiled. The CUDA sources (csrc/cuda/*.cu) are added when
torch is a CUDA build and a CUDA toolkit whose major version matches torch's is found: ``CUDA_HOME``
(or ``CUDA_PATH``) when set, else the toolkit of the ``nvcc`` on ``PATH``, else /usr/local/cuda. They
are built for sm_80 and sm_90 unless ``TORCH_CUDA_ARCH_LIST`` says otherwise. Without a usable
toolkit, or if the CUDA sources fail to compile or link, the C++-only extension is built and one line
says why. ``DISTIL_NO_CUDA=1`` skips CUDA; ``DISTIL_CUDA=1`` makes a missing or failing CUDA build an
error instead.

The extension must be compiled against the torch it will run with. pip's default build isolation
hides that torch, so torch is not a build requirement (an isolated environment would install
another, possibly of another version, and the extension would not load): when the build environment
has no torch, the build looks in the environment being installed into.

``distil.kernels`` is the folder ``kernels/`` reached through the link ``distil/kernels`` (a
namespace package: ``kernels/`` has no ``__init__.py``, so from the repository root the folder never
shadows Hugging Face's ``kernels`` package, which transformers imports).
"""
import glob
import os
import re
import shutil
import site
import subprocess
import sys

from setuptools import setup

DISTIL_CUDA = os.environ.get("DISTIL_CUDA", "") == "1"
DISTIL_NO_CUDA = os.environ.get("DISTIL_NO_CUDA", "") == "1"


def _notice(message):
    print(f"distil setup: {message}", file=sys.stderr, flush=True)


def _import_torch():
    try:
        import torch
        return torch
    except ImportError:
        pass
    # Under build isolation sys.prefix is still the environment being installed into; its
    # site-packages were only removed from sys.path. Appended, so the build tools stay isolated.
    target = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
    sys.path.extend(p for p in target if p not in sys.path)
    try:
        import torch
    except ImportError:
        sys.exit(
            "distil setup: torch is not installed in the environment being built for "
            f"({sys.prefix}). distil's extension is compiled against the torch it runs with: install torch "
            "first (e.g. `pip install torch`), then `pip install -e .` again."
        )
    _notice(f"building against torch {torch.__version__} from {os.path.dirname(torch.__path__[0])} "
            "(the environment being installed into)")
    return torch


def _nvcc_major(nvcc):
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.", out)
    return int(match.group(1)) if match else None


def _has_cudart(home):
    for lib in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"),
                os.path.join("targets", "sbsa-linux", "lib")):
        if glob.glob(os.path.join(home, lib, "libcudart.so*")):
            return True
    return False


def _cuda_home(torch):
    """(toolkit folder, None) for the CUDA build, or (None, why not)."""
    if DISTIL_NO_CUDA:
        return None, "DISTIL_NO_CUDA=1"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is not a CUDA build"
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        candidates = [explicit]
    else:
        nvcc = shutil.which("nvcc")
        candidates = ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []) + ["/usr/local/cuda"]
    reasons = []
    for home in dict.fromkeys(candidates):
        nvcc = os.path.join(home, "bin", "nvcc")
        if not os.access(nvcc, os.X_OK):
            reasons.append(f"no {nvcc}")
        elif not _has_cudart(home):
            reasons.append(f"no libcudart under {home}")
        elif _nvcc_major(nvcc) != int(torch.version.cuda.split(".")[0]):
            reasons.append(f"{nvcc} is CUDA {_nvcc_major(nvcc)}, torch was built with CUDA {torch.version.cuda}")
        else:
            return home, None
    return None, "no usable CUDA toolkit (" + "; ".join(reasons) + "; set CUDA_HOME to one)"


torch = _import_torch()
CUDA_HOME, WHY_NO_CUDA = _cuda_home(torch)
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME  # read by torch.utils.cpp_extension when it is imported
elif DISTIL_CUDA:
    sys.exit(f"distil setup: DISTIL_CUDA=1 but {WHY_NO_CUDA}")

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

CPP_SOURCES = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
CUDA_SOURCES = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
# -fno-trapping-math: no code of ours reads floating-point exception flags, and without it GCC will not
# if-convert a division or log under a condition (csrc/divergence.h's terms), so those loops stay scalar.
# It changes no result (unlike -ffast-math: NaN and inf keep their IEEE meaning).
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"]


def _cpp_extension():
    return CppExtension("distil._C", CPP_SOURCES, extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=["-fopenmp"])


def _extension():
    if not CUDA_HOME:
        _notice(f"building the C++ kernels only: {WHY_NO_CUDA}")
        return _cpp_extension()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    _notice(f"building the C++ and CUDA kernels with {CUDA_HOME} for sm {os.environ['TORCH_CUDA_ARCH_LIST']}")
    return CUDAExtension(
        "distil._C",
        CPP_SOURCES + CUDA_SOURCES,
        extra_compile_args={"cxx": CXX_FLAGS + ["-DDISTIL_WITH_CUDA"], "nvcc": ["-O3", "-DDISTIL_WITH_CUDA"]},
        extra_link_args=["-fopenmp"],
    )


class Build(BuildExtension):
    """Falls back to the C++-only extension when the CUDA sources fail to compile or link."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as err:  # a compiler or linker failure, whatever the toolchain raises
            if DISTIL_CUDA or not any(src.endswith(".cu") for src in ext.sources):
                raise
            last = str(err).strip().splitlines()[-1:] or [type(err).__name__]
            _notice(f"the CUDA build failed ({last[0]}); building the C++ kernels only "
                    "(CUDA tensors still use the Triton kernels; masked_gather has no CUDA kernel)")
            super().build_extension(_cpp_extension())


setup(
    packages=["distil", "distil._ops", "distil.kernels"],
    ext_modules=[_extension()],
    cmdclass={"build_ext": Build.with_options(no_python_abi_suffix=False)},
)
