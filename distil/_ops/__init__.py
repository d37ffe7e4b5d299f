"""One registration module per op (see ARCHITECTURE.md). Importing this package loads distil._C: the
op schemas (declared next to their CPU kernels in csrc/<op>.cpp) and the C++ kernels."""
import torch  # noqa: F401  (loads libtorch before our extension links against it)

from distil import _C  # noqa: F401,E402  (runs the TORCH_LIBRARY registrations)
