# Sourced by scripts/test.sh and scripts/bench.sh: creates .venv (once), installs torch only if it
# is absent, builds distil (with the CUDA extension when nvcc is found), and activates the venv.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  # System site-packages stay visible, so a machine that already has a recent torch keeps it.
  "$PY" -m venv --system-site-packages .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import sys, torch; sys.exit(tuple(map(int, torch.__version__.split('.')[:2])) < (2, 6))" >/dev/null 2>&1; then
  # On the project machines this resolves to a local CUDA 13.0 build of torch (it pulls triton).
  python -m pip install -q "torch==${DISTIL_TORCH_VERSION:-2.14.1}"
fi
python -m pip install -q setuptools wheel ninja
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
python -m pip install -q --no-build-isolation -e ".[test,bench]"
