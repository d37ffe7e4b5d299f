"""distil: fused kernels and a thin harness for DistilBERT-style knowledge distillation.

Public API: :mod:`distil.fused_loss` (losses), :mod:`distil.ops` (masked-token gather); importing
either loads the compiled operator library ``distil._C`` and registers its ops. ``import distil``
itself loads nothing heavy, so that ``distil-train --help`` answers at once; ``distil.fused_loss``
and the other submodules import on first use.
"""
import importlib

__version__ = "0.1.0"


def __getattr__(name):
    # PEP 562: ``import distil; distil.fused_loss.kl_ce_loss(...)`` imports the submodule on first use.
    if not name.startswith("__"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
