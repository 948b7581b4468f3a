#!/usr/bin/env bash
# The GPU benchmark suite in one command: run it on a GPU machine from the repository root.
#
#   benchmarks/gpu_suite.sh                 # everything, rows recorded in benchmarks/results/
#   QUICK=1 benchmarks/gpu_suite.sh         # 224 only, no torch.compile, fewer steps, 10 s per loader (~3 min, est.)
#   DRY_RUN=1 benchmarks/gpu_suite.sh       # print the commands, run nothing (works without a GPU)
#
# 1. DALI `mixed` (GPU) decoding next to dali-cpu, the torch loader and torchvision ImageFolder, train and eval
#    transforms, on generated ImageNet-sized JPEG shards (BENCH_IMAGES of 500x375, ~85 KB each).
# 2. Conv2Former-L next to timm's ConvNeXt-L: training images/s, MFU and memory, bf16 + channels_last, at 224 and
#    384, activation checkpointing off/on, torch.compile off/on.
# 3. End to end: launch/pretrain.py with the DALI loader feeding the engine, ZeRO 1/2/3, one rank per visible GPU:
#    images/s, the share of each step spent waiting for data, MFU, memory per rank; and ZeRO-1 with
#    deterministic=true (its cost).
# 4. The top CUDA kernels of one Conv2Former-L step (torch.profiler; is the 11x11 depthwise conv the bottleneck?).
# 5. A report (table + projected wall time of 90 epochs of ImageNet-22k on 8/64/256 GPUs) printed and written to
#    $OUT/report.md; every JSON result is kept in $OUT/results.jsonl.
#
# Settings (environment): OUT (runs/gpu_suite/<date>), BENCH_IMAGES (20000), BATCH_224 (128), BATCH_384 (32),
# WORKERS (CPU cores), RECORD (1: add rows to benchmarks/results/; 0: do not), PYTHON (.venv/bin/python if present),
# LOADER_SECONDS (30; QUICK: 10).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
OUT=${OUT:-runs/gpu_suite/$(date +%Y%m%d-%H%M%S)}
BENCH_IMAGES=${BENCH_IMAGES:-20000}
BATCH_224=${BATCH_224:-128}
BATCH_384=${BATCH_384:-32}
WORKERS=${WORKERS:-$(nproc)}
RECORD=${RECORD:-1}
QUICK=${QUICK:-0}
DRY_RUN=${DRY_RUN:-0}
REC=$([ "$RECORD" = 1 ] && echo --record || true)

if [ "$DRY_RUN" != 1 ]; then
    if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        echo "error: gpu_suite.sh needs a CUDA GPU visible to $PYTHON (on CPU run 'make bench'; DRY_RUN=1 lists the commands)" >&2
        exit 2
    fi
    NGPU=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
else
    NGPU=${NGPU:-1}
fi
RESULTS="$OUT/results.jsonl"
if [ "$DRY_RUN" != 1 ]; then mkdir -p "$OUT"; : > "$RESULTS"; fi

# run LABEL CMD...: print the command; unless DRY_RUN, run it, show its output and keep its JSON lines.
# A failing step (say, out of memory at 384) is reported and the suite goes on; the exit status says if any failed.
FAILED=()
run() {
    local label=$1; shift
    echo "== $label: $*"
    [ "$DRY_RUN" = 1 ] && return 0
    if ! "$@" 2>&1 | tee -a "$OUT/log.txt" | while IFS= read -r line; do
        case "$line" in
            "{"*) printf '{"suite": "%s", %s\n' "$label" "${line#\{}" >> "$RESULTS" ;;
            *) printf '%s\n' "$line" ;;
        esac
    done; then
        echo "!! $label failed (its output is above and in $OUT/log.txt); going on"
        FAILED+=("$label")
    fi
}

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RESOLUTIONS="224 384"; COMPILE="off on"; STEPS=40; LOADER_SECONDS=${LOADER_SECONDS:-30}
if [ "$QUICK" = 1 ]; then RESOLUTIONS="224"; COMPILE="off"; STEPS=25; LOADER_SECONDS=${LOADER_SECONDS_QUICK:-10}; fi

# 1. the data path (the loader benchmark generates data/bench/{tree,shards} once)
for mode in train eval; do
    run "loader-$mode" "$PYTHON" benchmarks/loader_speed.py --backend all --mode "$mode" --images "$BENCH_IMAGES" \
        --workers "$WORKERS" --batch 128 --seconds "$LOADER_SECONDS" --json $REC
done

# 2. the model, side by side with ConvNeXt-L
for res in $RESOLUTIONS; do
    batch=$([ "$res" = 224 ] && echo "$BATCH_224" || echo "$BATCH_384")
    for ckpt in off on; do
        for comp in $COMPILE; do
            flags=()
            [ "$ckpt" = on ] && flags+=(--grad-checkpointing)
            [ "$comp" = on ] && flags+=(--compile)
            run "model-$res-ckpt_$ckpt-compile_$comp" "$PYTHON" benchmarks/model_speed.py --variant conv2former_l \
                --baseline convnext_large --resolution "$res" --batch "$batch" --iters 10 --rounds 3 \
                ${flags[@]+"${flags[@]}"} --json $REC
        done
    done
done

# 2a. the depthwise convolutions: every CUDA candidate (cuDNN, native, Triton, ...) on every depthwise shape of
# Conv2Former-L (and ConvNeXt-L's 7x7) in bf16 channels_last, the chosen one; then the whole model with bf16 weights (as
# DeepSpeed trains) with PyTorch's depthwise convolutions against the measured choice (gpu.depthwise=measure)
for res in $RESOLUTIONS; do
    batch=$([ "$res" = 224 ] && echo "$BATCH_224" || echo "$BATCH_384")
    run "depthwise-$res" "$PYTHON" benchmarks/depthwise_formulations.py --variant conv2former_l \
        --baseline convnext_large --device cuda --dtype bf16 --batch "$batch" --resolution "$res" --channels-last \
        --rounds 3 --json $REC
done
run "model-224-gpu-depthwise" "$PYTHON" benchmarks/model_speed.py --variant conv2former_l --baseline convnext_large \
    --resolution 224 --batch "$BATCH_224" --iters 10 --rounds 2 --gpu-depthwise --json $REC

# 2b. where the time goes: the top CUDA kernels of one Conv2Former-L step (a trace for TensorBoard in $OUT/trace)
run "profile-224" "$PYTHON" benchmarks/profile_step.py --variant conv2former_l --batch "$BATCH_224" --top 12 \
    --trace "$OUT/trace" $REC

# 2c. progressive resizing: one Conv2Former-L step at 160/192/224 px, the paper schedule's time against 224 throughout
run "progressive-resizing" "$PYTHON" benchmarks/progressive_resizing.py speed --variant l --batch "$BATCH_224" $REC

# 3. end to end: DALI on the GPU feeding the DeepSpeed engine, ZeRO 1/2/3
run "train-224" "$PYTHON" benchmarks/train_speed.py --variant l --image-size 224 --data data/bench/shards \
    --stages 1 2 3 --ranks "$NGPU" --micro-batch "$BATCH_224" --global-batch $((BATCH_224 * NGPU)) \
    --backend dali-gpu --steps "$STEPS" --set data.workers="$((WORKERS / NGPU > 0 ? WORKERS / NGPU : 1))" --json $REC

# 3b. the cost of deterministic=true (cuDNN deterministic algorithms, no benchmark search: the bitwise-resume tests' setting)
run "train-224-deterministic" "$PYTHON" benchmarks/train_speed.py --variant l --image-size 224 --data data/bench/shards \
    --stages 1 --ranks "$NGPU" --micro-batch "$BATCH_224" --global-batch $((BATCH_224 * NGPU)) \
    --backend dali-gpu --steps "$STEPS" --set data.workers="$((WORKERS / NGPU > 0 ? WORKERS / NGPU : 1))" \
    --set deterministic=true --json $REC

# 4. the report
run "report" "$PYTHON" benchmarks/suite_report.py "$RESULTS" --output "$OUT/report.md"
[ "$DRY_RUN" = 1 ] || echo "results: $RESULTS, report: $OUT/report.md"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "error: ${#FAILED[@]} step(s) failed: ${FAILED[*]} (lower BATCH_224/BATCH_384 if they ran out of memory)" >&2
    exit 1
fi
