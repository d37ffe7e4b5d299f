"""One registration module per op (see ARCHITECTURE.md). Importing this package loads distil._C: the
op schemas (declared next to their CPU kernels in csrc/<op>.cpp) and the C++ kernels.

A source checkout in the current folder (``python -m``, ``pytest``) or the script's folder shadows the
installed distil: its Python files load, and its compiled extension is either missing or, with an
editable install elsewhere, taken from that other copy, whose ops need not match. Both end here with an
ImportError that says so, instead of an unknown-op error later."""
from pathlib import Path

import torch  # noqa: F401  (loads libtorch before our extension links against it)

_PACKAGE = Path(__file__).resolve().parents[1]
_SHADOW_HINT = (f"If {_PACKAGE.parent} is a source checkout, it shadows the installed distil (Python puts the "
                "current folder, or the script's, first on sys.path): run from another folder, or build this "
                f"checkout with `pip install -e {_PACKAGE.parent}`.")

try:
    from distil import _C  # noqa: E402  (runs the TORCH_LIBRARY registrations)
except ImportError as err:
    raise ImportError(f"distil: {_PACKAGE} has no compiled extension distil._C ({err}). {_SHADOW_HINT}") from None
if Path(_C.__file__).resolve().parent != _PACKAGE:
    raise ImportError(f"distil: the Python files come from {_PACKAGE} but the compiled extension from "
                      f"{Path(_C.__file__).parent}, another copy whose ops need not match. {_SHADOW_HINT}")
