#!/usr/bin/env bash
# The GPU checklist (benchmarks/gpu_checklist.py: prioritized stages with budgets, resumed where the last reservation
# stopped). Kept for the command the docs used; every option is the Python script's (--help).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PYTHON" benchmarks/gpu_checklist.py "$@"
