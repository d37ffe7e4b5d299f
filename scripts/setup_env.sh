# Sourced by scripts/test.sh and scripts/bench.sh: creates .venv (once), installs torch only if it
# is absent, builds distil (with the CUDA extension when nvcc is found), and activates the venv.
# The build is skipped when nothing it depends on changed since the last one (a hash of csrc/,
# setup.py, pyproject.toml, the torch version and the build settings, kept in .venv/distil-build.sha256).
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
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"

build_hash() {
  {
    find csrc -type f | LC_ALL=C sort | xargs cat
    cat setup.py pyproject.toml
    python -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || echo "no torch"
    echo "${DISTIL_NO_CUDA:-0} ${CUDA_HOME:-} ${TORCH_CUDA_ARCH_LIST}"
  } | sha256sum | cut -d' ' -f1
}
STAMP=.venv/distil-build.sha256
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(build_hash)" ] && compgen -G "distil/_C*.so" >/dev/null; then
  echo "setup_env: distil is built and csrc/, setup.py, pyproject.toml are unchanged: no rebuild" >&2
  return 0 2>/dev/null || exit 0
fi
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import sys, torch; sys.exit(tuple(map(int, torch.__version__.split('.')[:2])) < (2, 6))" >/dev/null 2>&1; then
  # On the project machines this resolves to a local CUDA 13.0 build of torch (it pulls triton).
  python -m pip install -q "torch==${DISTIL_TORCH_VERSION:-2.14.1}"
fi
python -m pip install -q setuptools wheel ninja
python -m pip install -q --no-build-isolation -e ".[test,bench]"
build_hash >"$STAMP"
