#!/usr/bin/env bash
# One command for a GPU machine: build distil, run the test suite on the GPU (Triton interpreter
# off), run every benchmark present, and collect the result files.
#
#   bash benchmarks/gpu_suite.sh [--full] [--steps LIST]     (from anywhere; works in the repo root)
#
#   --full   bench_loss.py's whole N x V x dtype grid (several extra minutes)
#   --steps  comma-separated subset of tests,bench,tune (default tests,bench; tune: the KL+CE kernel's
#            BLOCK_V x num_warps sweep, benchmarks/tune_kl_ce.py); the build always runs
#   PYTHON   interpreter to use (default: python3)
#   DISTIL_GPU_BUDGET_S  wall-clock budget of the whole suite (default 450): each step's limit is cut
#            to what is left, and steps that would start with under 20 s left are skipped
#   .whl/    wheels placed there (git-ignored; e.g. liger-kernel for the Liger comparison) are
#            installed first, offline, for machines without network access
#
# Results land in benchmarks/results/ (commit them) and, when $OUT is set, in $OUT as at most
# 8 files: summary.md, logs.tar.gz, results.tar.gz (every result file this run wrote), and the
# main loss_cuda_*.json / .png — refreshed after every step, so a run cut short still returns
# what it measured.  A failing step is recorded and the others still run; the exit
# status is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
FULL=""
STEPS=tests,bench
while [ $# -gt 0 ]; do
  case $1 in
    --full) FULL=--full ;;
    --steps) STEPS=$2; shift ;;
    -h|--help) sed -n 2,22p "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
wants() { [[ ",$STEPS," == *",$1,"* ]]; }

WORK=$(mktemp -d)
LOGS=$WORK/logs
mkdir -p "$LOGS" benchmarks/results
touch "$WORK/start"  # result files newer than this are this run's
SUMMARY=$WORK/summary.md
FAILED=0

BUDGET=${DISTIL_GPU_BUDGET_S:-450}

# collect: copies the summary, the logs and this run's result files to $OUT (when set).
collect() {
  find benchmarks/results -type f -newer "$WORK/start" >"$WORK/new_results"
  tar -czf "$WORK/logs.tar.gz" -C "$WORK" logs
  tar -czf "$WORK/results.tar.gz" -T "$WORK/new_results"
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$SUMMARY" "$WORK/logs.tar.gz" "$WORK/results.tar.gz" "$OUT"/
    for f in benchmarks/results/loss_cuda_*.json benchmarks/results/loss_cuda_*.png; do
      [ -f "$f" ] && [ "$f" -nt "$WORK/start" ] && cp "$f" "$OUT"/
    done
  fi
}

# step NAME LIMIT_S COMMAND...: runs COMMAND under a time limit (cut to the budget left), tees it to
# logs/NAME.log, adds a row to the summary and collects.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "| $name | skipped: the suite's ${BUDGET} s budget is spent |  |" >>"$SUMMARY"
    FAILED=1
    return 1
  fi
  [ "$limit" -le "$left" ] || limit=$left
  local t0=$SECONDS
  echo "=== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]} verdict=ok
  if [ "$rc" = 124 ]; then verdict="TIMED OUT after ${limit} s"; elif [ "$rc" != 0 ]; then verdict="FAILED (rc=$rc)"; fi
  [ "$rc" = 0 ] || FAILED=1
  echo "| $name | $verdict | $((SECONDS - t0)) s |" >>"$SUMMARY"
  collect
  return "$rc"
}

{
  echo "# distil GPU suite, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git -c safe.directory='*' rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
  "$PY" -c 'import sys, torch, triton; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}")'
  echo
  echo "| step | result | time |"
  echo "|---|---|---|"
} >"$SUMMARY"

# Build for this GPU's architecture only (the default list builds two).
ARCH=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH} MAX_JOBS=${MAX_JOBS:-$(nproc)}
if compgen -G ".whl/*.whl" >/dev/null; then
  step extra_wheels 120 "$PY" -m pip install --no-deps --no-index -q .whl/*.whl
fi
step build 480 "$PY" -m pip install --no-build-isolation --no-deps --no-index -q -e .
BUILD_RC=$?

if [ "$BUILD_RC" = 0 ]; then
  if wants tests; then
    # One pytest process per test file, 8 at a time: a crash (a kernel's segfault, say) loses that
    # file only and its log names it; the AOT builds use the machine's cores.
    step tests 240 bash -c 'ls tests/test_*.py | xargs -P 8 -I{} bash -c "f={}; n=\$(basename \$f .py);
      env DISTIL_GPU_TESTS=1 $0 -m pytest \$f -q -rfE -p no:cacheprovider >$1/\$n.log 2>&1;
      rc=\$?; echo \"\$n: rc=\$rc \$(tail -n 1 $1/\$n.log)\"; [ \$rc = 0 ] || [ \$rc = 5 ]"' "$PY" "$LOGS"
  fi
  if wants bench; then
    # The headline ops first, the rest second: a run cut short still keeps the first table.
    step bench_loss_kl 240 "$PY" benchmarks/bench_loss.py --device cuda --save --ops kl_ce,kl $FULL
    step bench_loss_rest 200 "$PY" benchmarks/bench_loss.py --device cuda --save --ops linear_kl_ce,cos,topk_kl_ce,triple $FULL
    step bench_loss_divergences 300 "$PY" benchmarks/bench_loss.py --device cuda --save \
      --ops reverse_kl,jsd,skew_kl,skew_reverse_kl,tvd,ce_tvd,linear_jsd,linear_topk_jsd $FULL
    for bench in benchmarks/bench_gather.py benchmarks/bench_step.py; do
      [ -f "$bench" ] && step "$(basename "$bench" .py)" 300 "$PY" "$bench" --save
    done
    TAG=$("$PY" -c 'import sys; sys.path.insert(0, "benchmarks"); import _common; print(_common.machine_tag("cuda"))')
    step test_bench 300 "$PY" -m pytest benchmarks/test_bench.py -q -p no:cacheprovider \
      --benchmark-json="benchmarks/results/pytest_bench_cuda_${TAG}.json"
  fi
  if wants tune; then
    step tune_kl_ce 150 "$PY" benchmarks/tune_kl_ce.py --n 8192 --vocab 30522
  fi
else
  echo "| (tests and benchmarks) | skipped: the build failed |  |" >>"$SUMMARY"
fi

# The targets table that bench_loss.py printed, for the summary.
for log in "$LOGS"/bench_loss_*.log; do
  [ -f "$log" ] || continue
  echo >>"$SUMMARY"
  awk '/^\| target \|/{on=1} on&&!/^\|/{exit} on' "$log" >>"$SUMMARY"
done

collect

echo
echo "=================== summary"
cat "$SUMMARY"
echo
echo "new result files (in benchmarks/results/):"
sed 's/^/  /' "$WORK/new_results"
exit "$FAILED"
