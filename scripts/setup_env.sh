# Sourced by scripts/test.sh and scripts/bench.sh: creates the venv (once; it sees no system
# site-packages, so it holds what a new user gets), installs torch if absent, then distil with
# `pip install -e ".[test,bench]"` exactly as a user types it (build isolation on; setup.py builds
# the CUDA sources when it finds a usable toolkit), and activates the venv.
#
#   PYTHON=python3.12          the interpreter the venv is made from (default: python3)
#   DISTIL_VENV=.venv-other    the venv's folder (default: .venv)
#   DISTIL_CONSTRAINTS=FILE    pip constraints for every install (CI's GPU-stack leg: .ci/gpu-stack.txt)
#
# The install is skipped when nothing it depends on changed since the last one (a hash of csrc/,
# setup.py, pyproject.toml, the constraints and the build settings, kept in the venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="${DISTIL_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export MAX_JOBS="${MAX_JOBS:-2}"
PIP_ARGS=(-q)
if [ -n "${DISTIL_CONSTRAINTS:-}" ]; then
  PIP_ARGS+=(-c "$ROOT/$DISTIL_CONSTRAINTS")
fi

build_hash() {
  {
    find csrc -type f | LC_ALL=C sort | xargs cat
    cat setup.py pyproject.toml
    [ -z "${DISTIL_CONSTRAINTS:-}" ] || cat "$DISTIL_CONSTRAINTS"
    python -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || echo "no torch"
    echo "${DISTIL_NO_CUDA:-0} ${DISTIL_CUDA:-0} ${CUDA_HOME:-} ${TORCH_CUDA_ARCH_LIST:-}"
  } | sha256sum | cut -d' ' -f1
}
STAMP="$VENV/distil-build.sha256"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(build_hash)" ] && (cd / && python -c "import torch, distil._C") 2>/dev/null; then
  echo "setup_env: distil is installed and csrc/, setup.py, pyproject.toml are unchanged: no reinstall" >&2
  return 0 2>/dev/null || exit 0
fi
python -m pip install "${PIP_ARGS[@]}" --upgrade pip
if ! python -c "import torch" >/dev/null 2>&1; then
  # distil's build compiles against the installed torch, so torch comes first.
  python -m pip install "${PIP_ARGS[@]}" "torch>=2.11,<3"
fi
echo "setup_env: pip install -e \".[test,bench]\" (builds distil._C; about 1-3 min)" >&2
python -m pip install "${PIP_ARGS[@]}" -e ".[test,bench]"
build_hash >"$STAMP"
