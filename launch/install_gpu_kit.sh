#!/usr/bin/env bash
# Install the GPU kit (made by `make gpu-kit`) on a GPU reservation's host, into the environment of `python3`
# (or $PYTHON): its core part (the checklist's stages 1-4), then DALI once all its chunks are there.
#
#   launch/install_gpu_kit.sh dist/gpu-kit                # core, then DALI if every chunk is present and intact
#   launch/install_gpu_kit.sh dist/gpu-kit --dali-only    # a later command, once the last DALI chunk arrived
#   launch/install_gpu_kit.sh dist/gpu-kit --target DIR   # into DIR; then export PYTHONPATH=DIR:$PYTHONPATH
#
# Every part and chunk is checked against its sha256; a missing one is named in one line. See docs/performance.md.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
exec "${PYTHON:-python3}" "$here/tools/gpu_kit.py" install "$@"
