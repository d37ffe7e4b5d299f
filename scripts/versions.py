"""Prints the resolved versions of what distil's tests depend on (the first lines of the test log)."""
import importlib.metadata as metadata
import platform

NAMES = ("torch", "triton", "transformers", "tokenizers", "datasets", "accelerate", "kernels", "numpy")


def installed(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


print(f"Python {platform.python_version()}; " + ", ".join(f"{name} {installed(name)}" for name in NAMES))
