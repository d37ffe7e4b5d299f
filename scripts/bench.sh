#!/usr/bin/env bash
# The main job: set up (see setup_env.sh), then run the loss benchmark on whatever hardware is here.
source "$(dirname "$0")/setup_env.sh"
python benchmarks/bench_loss.py "$@"
