"""Build distil: the Python packages plus the C++/CUDA extension ``distil._C``.

C++ sources (csrc/*.cpp) are always compiled.  CUDA sources (csrc/cuda/*.cu) are
added when torch is a CUDA build and nvcc is found through CUDA_HOME; they are built
for sm_80 and sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise.
"""
import glob
import os

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _extension():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    cxx = ["-O3", "-fopenmp"]
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("DISTIL_NO_CUDA", "0") != "1"
    )
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        return CUDAExtension(
            "distil._C",
            cpp + cu,
            extra_compile_args={"cxx": cxx + ["-DDISTIL_WITH_CUDA"], "nvcc": ["-O3", "-DDISTIL_WITH_CUDA"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("distil._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


setup(
    packages=["distil", "distil._ops", "distil.kernels"],
    package_dir={"distil": "distil", "distil.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
)
