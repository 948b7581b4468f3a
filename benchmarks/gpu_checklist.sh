#!/usr/bin/env bash
# The GPU checklist: everything a first GPU reservation must run, in order, with one report. From the repository
# root, on a GPU host (after launch/install_offline.sh where the host has no package access):
#
#   benchmarks/gpu_checklist.sh             # steps 1-4, about 20-25 minutes on one H100 (estimated, not yet run)
#   FULL=1 benchmarks/gpu_checklist.sh      # step 4 is the full suite (384, torch.compile) instead of QUICK
#   DRY_RUN=1 benchmarks/gpu_checklist.sh   # print the commands, run nothing (works without a GPU)
#
# 1. the environment: nvidia-smi, torch/CUDA/cuDNN, deepspeed, DALI, timm versions
# 2. the loader tests with the dali-gpu backend (tests/test_loader.py -k dali-gpu: `mixed` decoding, eval
#    exactness against timm's transform, resume of a DALI GPU pipeline, two ranks; tests/test_dali_randaugment.py:
#    the RandAugment graph on the GPU against timm's)
# 3. the pretraining smoke runs (tests/test_gpu.py): demo and Conv2Former-L, bf16, channels_last batches,
#    ZeRO 1 and 3, EMA on, 30 steps, stop at 15 + relaunch == uninterrupted bit for bit, fp32 export loads strictly
# 4. benchmarks/gpu_suite.sh (QUICK=1 unless FULL=1): DALI mixed decode img/s, Conv2Former-L vs ConvNeXt-L, MFU,
#    top CUDA kernels, ZeRO 1/2/3 with data-wait share, the 90-epoch projection
# Every step runs even if an earlier one failed; $OUT/checklist.md lists each step's status and duration, and
# the exit status is 1 if any failed. Settings: OUT (runs/gpu_checklist/<date>), PYTHON, FULL, DRY_RUN.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-runs/gpu_checklist/$(date +%Y%m%d-%H%M%S)}
DRY_RUN=${DRY_RUN:-0}
FULL=${FULL:-0}

if [ "$DRY_RUN" != 1 ]; then
    if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        echo "error: gpu_checklist.sh needs a CUDA GPU visible to $PYTHON (DRY_RUN=1 lists the commands)" >&2
        exit 2
    fi
    mkdir -p "$OUT"
    printf '# GPU checklist, %s\n\n| step | status | seconds | command |\n|---|---|---|---|\n' "$(date -u +%FT%TZ)" \
        > "$OUT/checklist.md"
fi

FAILED=()
step() {
    local label=$1; shift
    echo "== $label: $*"
    [ "$DRY_RUN" = 1 ] && return 0
    local start=$SECONDS status=passed
    if ! "$@" 2>&1 | tee "$OUT/$label.log"; then status=FAILED; FAILED+=("$label"); fi
    printf '| %s | %s | %d | `%s` |\n' "$label" "$status" $((SECONDS - start)) "$*" >> "$OUT/checklist.md"
}

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset DS_ACCELERATOR
PYTEST=("$PYTHON" -m pytest -q -ra -p no:cacheprovider)

step 1-environment bash -c "nvidia-smi; \"$PYTHON\" -c 'import torch, deepspeed, timm, nvidia.dali as d; \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"cudnn\", torch.backends.cudnn.version(), \
torch.cuda.get_device_name(0)); print(\"deepspeed\", deepspeed.__version__, \"dali\", d.__version__, \"timm\", timm.__version__)'"
step 2-loader-dali-gpu "${PYTEST[@]}" tests/test_loader.py tests/test_dali_randaugment.py -k dali-gpu
step 3-pretrain-smoke "${PYTEST[@]}" tests/test_gpu.py
if [ "$FULL" = 1 ]; then
    step 4-gpu-suite env OUT="$OUT/suite" PYTHON="$PYTHON" benchmarks/gpu_suite.sh
else
    step 4-gpu-suite env QUICK=1 OUT="$OUT/suite" PYTHON="$PYTHON" benchmarks/gpu_suite.sh
fi

[ "$DRY_RUN" = 1 ] && exit 0
[ -f "$OUT/suite/report.md" ] && { printf '\n' >> "$OUT/checklist.md"; cat "$OUT/suite/report.md" >> "$OUT/checklist.md"; }
echo "report: $OUT/checklist.md"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "error: ${#FAILED[@]} step(s) failed: ${FAILED[*]} (logs in $OUT)" >&2
    exit 1
fi
