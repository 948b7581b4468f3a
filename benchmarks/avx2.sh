#!/usr/bin/env bash
# Run a command with torch's kernels, oneDNN and MKL held to AVX2, as on an AVX2-only processor:
#
#     benchmarks/avx2.sh python benchmarks/model_speed.py --variant conv2former_t --baseline convnext_tiny
#
# Every library the model step uses then takes its AVX2 code paths (the ones an AVX2-only EPYC or Xeon runs), on a
# processor that also has AVX-512. Caches, clocks and memory stay this processor's, so the rows say "held to AVX2"
# next to the real ISA: a profile of which kernels are slow on AVX2, not a measurement of another machine.
set -euo pipefail
export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
exec "$@"
