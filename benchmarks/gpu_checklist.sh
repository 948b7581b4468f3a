#!/usr/bin/env bash
# The GPU checklist: everything a GPU reservation must run, in order, with one report, in ONE call of under 10
# minutes (reservations are short): each step has a budget in seconds that `timeout` enforces, 540 s in all. From the
# repository root, on a GPU host (after launch/install_offline.sh where the host has no package access):
#
#   benchmarks/gpu_checklist.sh             # steps 1-4 within 540 s (budgets below; not yet run on a GPU)
#   FULL=1 benchmarks/gpu_checklist.sh      # no budgets: every GPU test, the full suite (384, torch.compile)
#   DRY_RUN=1 benchmarks/gpu_checklist.sh   # print the commands, run nothing (works without a GPU)
#
# 1. (30 s) the environment: nvidia-smi, torch/CUDA/cuDNN, deepspeed, DALI, timm versions
# 2. (90 s) the loader tests with the dali-gpu backend (tests/test_loader.py -k dali-gpu: `mixed` decoding, eval
#    exactness against timm's transform, channels_last HWC batches, resume of a DALI GPU pipeline, two ranks;
#    tests/test_dali_randaugment.py: the RandAugment graph on the GPU against timm's)
# 3. (240 s) tests/test_gpu.py: the late-read flags (pinned copy + CUDA event, no pipeline drain); pretraining smoke
#    runs: demo at ZeRO 1 and 3 and Conv2Former-L at ZeRO 1 (FULL: and 3), bf16, deterministic, channels_last, EMA
#    on, 30 steps, stop at 15 + relaunch == uninterrupted bit for bit, fp32 export loads strictly
# 4. (180 s) benchmarks/gpu_suite.sh QUICK=1 (FULL: the whole suite): DALI mixed decode img/s, Conv2Former-L vs
#    ConvNeXt-L, MFU, top CUDA kernels, ZeRO 1/2/3 with data-wait share, the 90-epoch projection
# Every step runs even if an earlier one failed or ran out of its budget; $OUT/checklist.md lists each step's status
# (passed, FAILED, or OUT OF TIME) and duration, and the exit status is 1 if any did not pass. Settings: OUT
# (runs/gpu_checklist/<date>), PYTHON, FULL, DRY_RUN.
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
# step LABEL BUDGET_S CMD...: run CMD within BUDGET_S seconds (FULL: no limit), its output shown and kept.
step() {
    local label=$1 budget=$2; shift 2
    echo "== $label (${budget} s): $*"
    [ "$DRY_RUN" = 1 ] && return 0
    local start=$SECONDS status=passed limit=()
    [ "$FULL" = 1 ] || limit=(timeout --kill-after=10 "$budget")
    set +e
    "${limit[@]}" "$@" 2>&1 | tee "$OUT/$label.log"
    local rc=${PIPESTATUS[0]}
    set -e
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="OUT OF TIME"; FAILED+=("$label");
    elif [ "$rc" != 0 ]; then status=FAILED; FAILED+=("$label"); fi
    printf '| %s | %s | %d | `%s` |\n' "$label" "$status" $((SECONDS - start)) "$*" >> "$OUT/checklist.md"
}

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset DS_ACCELERATOR
PYTEST=("$PYTHON" -m pytest -q -ra -p no:cacheprovider)

step 1-environment 30 bash -c "nvidia-smi; \"$PYTHON\" -c 'import torch, deepspeed, timm, nvidia.dali as d; \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"cudnn\", torch.backends.cudnn.version(), \
torch.cuda.get_device_name(0)); print(\"deepspeed\", deepspeed.__version__, \"dali\", d.__version__, \"timm\", timm.__version__)'"
step 2-loader-dali-gpu 90 "${PYTEST[@]}" tests/test_loader.py tests/test_dali_randaugment.py -k dali-gpu
if [ "$FULL" = 1 ]; then
    step 3-gpu-tests 0 "${PYTEST[@]}" tests/test_gpu.py
    step 4-gpu-suite 0 env OUT="$OUT/suite" PYTHON="$PYTHON" benchmarks/gpu_suite.sh
else
    step 3-gpu-tests 240 "${PYTEST[@]}" tests/test_gpu.py -k "not 3-l"
    step 4-gpu-suite 180 env QUICK=1 BENCH_IMAGES=4000 OUT="$OUT/suite" PYTHON="$PYTHON" benchmarks/gpu_suite.sh
fi

[ "$DRY_RUN" = 1 ] && exit 0
[ -f "$OUT/suite/report.md" ] && { printf '\n' >> "$OUT/checklist.md"; cat "$OUT/suite/report.md" >> "$OUT/checklist.md"; }
echo "report: $OUT/checklist.md"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "error: ${#FAILED[@]} step(s) failed: ${FAILED[*]} (logs in $OUT)" >&2
    exit 1
fi
