#!/usr/bin/env bash
# The test command: set up (see setup_env.sh), then run the whole suite on the CPU (Triton kernels
# through TRITON_INTERPRET=1, the CUDA extension compiled, GPU code checked by sm_80/sm_90 builds).
source "$(dirname "$0")/setup_env.sh"
python scripts/versions.py
python -m pytest tests -q "$@"
