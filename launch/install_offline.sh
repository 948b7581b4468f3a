#!/usr/bin/env bash
# Install an offline bundle (made by `make offline-bundle`) on a GPU host without package access.
#
#   launch/install_offline.sh dist/offline                  # into the environment of `python3` (or $PYTHON)
#   launch/install_offline.sh dist/offline --target DIR     # into DIR; then export PYTHONPATH=DIR:$PYTHONPATH
#   launch/install_offline.sh dist/offline --dry-run        # check the parts and wheels, print the plan
#
# Joins the parts (if the bundle was cut with --part-mib), checks every sha256, keeps what the environment
# already has at a version the bundle accepts (torch, numpy, pillow, ...), installs the rest with
# `pip --no-index --no-deps`, then imports conv2former, deepspeed, webdataset and nvidia.dali.
# See docs/offline_install.md.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
exec "${PYTHON:-python3}" "$here/tools/offline_install.py" "$@"
