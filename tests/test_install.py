"""How distil installs and imports, as a new user meets it.

- From the repository root (``python -m``, ``pytest``: the root is first on ``sys.path``) the Triton
  folder ``kernels/`` must never be the top-level ``kernels``: that name belongs to Hugging Face's
  ``kernels`` package, which transformers imports. ``kernels/`` has no ``__init__.py`` and is reached
  as ``distil.kernels`` through the link ``distil/kernels``.
- The install paths (``DISTIL_INSTALL_TESTS=1``, set by CI: each builds the extension): a wheel built
  with no usable CUDA toolkit (C++ only, one notice line), the CUDA build of the current install when
  a toolkit is on ``PATH``, and a build with no torch in the environment (a one-line instruction).
"""
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
INSTALL_TESTS = pytest.mark.skipif(os.environ.get("DISTIL_INSTALL_TESTS") != "1",
                                   reason="builds distil (minutes): set DISTIL_INSTALL_TESTS=1 (CI does)")


def run_in(cwd, *args, env=None, timeout=600):
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def python_in_root(code):
    return run_in(ROOT, sys.executable, "-c", code)


def test_kernels_folder_is_not_a_regular_package():
    assert (ROOT / "kernels" / "kl_ce.py").is_file()
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes the Triton folder the top-level `kernels` package from the repository "
        "root, shadowing Hugging Face's kernels (transformers imports it)")
    assert (ROOT / "distil" / "kernels").resolve() == (ROOT / "kernels").resolve()


def hugging_face_kernels_installed():
    try:  # the distribution's metadata: from the root, find_spec("kernels") would find our own folder
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not hugging_face_kernels_installed(),
                    reason="Hugging Face's kernels is not installed (pip install -e '.[test]' installs it)")
def test_repository_root_gives_hugging_face_kernels():
    code = ("import importlib.metadata as m, pathlib, kernels; "
            "installed = m.distribution('kernels').locate_file('kernels/__init__.py'); "
            "print(kernels.__file__); "
            "print(pathlib.Path(kernels.__file__).resolve() == pathlib.Path(installed).resolve())")
    out = python_in_root(code)
    assert out.returncode == 0, out.stderr
    kernels_file, is_installed_package = out.stdout.split()
    assert is_installed_package == "True", kernels_file
    assert not Path(kernels_file).resolve().is_relative_to(ROOT / "kernels")


def test_transformers_imports_from_repository_root():
    out = python_in_root("from transformers import BertModel, BertForMaskedLM; print('ok')")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_cli_module_help_from_repository_root():
    out = run_in(ROOT, sys.executable, "-m", "distil.cli", "--help")
    assert out.returncode == 0, out.stderr
    assert "--teacher" in out.stdout


def test_distil_kernels_are_ours():
    out = python_in_root("import distil.kernels.kl_ce as k, distil.kernels.rows as r; print(k.__file__); "
                         "print(r.__file__); print(hasattr(k, 'kl_ce_rows'))")
    assert out.returncode == 0, out.stderr
    kl_ce, rows, has_launcher = out.stdout.split()
    assert Path(kl_ce).resolve() == ROOT / "kernels" / "kl_ce.py"
    assert Path(rows).resolve() == ROOT / "kernels" / "rows.py"
    assert has_launcher == "True"


def copy_source(dest):
    """The checkout without builds and venvs: what a clean clone holds."""
    skip = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "*.so", "__pycache__",
                                  ".pytest_cache", "results", ".whl", ".gl")
    shutil.copytree(ROOT, dest, symlinks=True, ignore=skip)
    return dest


def has_cuda_kernel(op):
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")


@INSTALL_TESTS
def test_wheel_without_cuda_toolkit(tmp_path):
    src = copy_source(tmp_path / "src")
    env = dict(os.environ, CUDA_HOME=str(tmp_path / "no-cuda-here"), MAX_JOBS="2")
    out = run_in(tmp_path, sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(tmp_path / "wheels"),
                 str(src), env=env, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "distil setup: building the C++ kernels only: no usable CUDA toolkit" in out.stdout + out.stderr
    (wheel,) = (tmp_path / "wheels").glob("distil-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(name.startswith("distil/_C.") and name.endswith(".so") for name in names)
    assert {"distil/kernels/kl_ce.py", "distil/kernels/rows.py", "distil/_ops/kl_ce.py"} <= set(names)
    assert not any(name.startswith("kernels/") for name in names)
    assert "distil/kernels/__init__.py" not in names

    target = tmp_path / "site"
    out = run_in(tmp_path, sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                 str(wheel))
    assert out.returncode == 0, out.stderr
    code = ("import torch, distil.fused_loss, distil.kernels.kl_ce as k; print(k.__file__); "
            "print(torch._C._dispatch_has_kernel_for_dispatch_key('distil::masked_gather', 'CUDA'))")
    out = run_in(tmp_path, sys.executable, "-c", code, env=dict(os.environ, PYTHONPATH=str(target)))
    assert out.returncode == 0, out.stderr
    kl_ce, cuda_kernel = out.stdout.split()
    assert Path(kl_ce).is_relative_to(target)
    assert cuda_kernel == "False"


@INSTALL_TESTS
@pytest.mark.skipif(torch.version.cuda is None or shutil.which("nvcc") is None,
                    reason="needs a CUDA build of torch and nvcc on PATH")
def test_install_with_nvcc_on_path_has_cuda_kernels():
    """CI installs with `pip install -e .` and CUDA_HOME unset: the toolkit is found from nvcc on PATH."""
    assert has_cuda_kernel("distil::masked_gather")


@INSTALL_TESTS
def test_build_without_torch_says_what_to_do(tmp_path):
    src = copy_source(tmp_path / "src")
    run_in(tmp_path, sys.executable, "-m", "venv", str(tmp_path / "venv"))
    out = run_in(tmp_path, str(tmp_path / "venv" / "bin" / "python"), "-m", "pip", "install", "--no-deps", "-e",
                 str(src))
    assert out.returncode != 0
    assert "torch is not installed in the environment being built for" in out.stdout + out.stderr
    assert "then `pip install -e .` again" in out.stdout + out.stderr
