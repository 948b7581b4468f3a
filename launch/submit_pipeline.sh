#!/usr/bin/env bash
# submit_pipeline.sh: submit the paper's chain as Slurm jobs and print their ids: pretrain on 22k, then fine-tune at
# 224 and at 384, both from the 22k export (ConvNeXt's 22k -> 1k recipe; the two run in parallel once pretraining
# is done), and evaluate each fine-tune. Each job starts only if the one it needs succeeded (--dependency=afterok).
#
#   DATA_22K=s3://bucket/in22k DATA_1K=s3://bucket/in1k RUN_DIR=/shared/runs/l VARIANT=l \
#   SBATCH_PARTITION=gpu SBATCH_ACCOUNT=me launch/submit_pipeline.sh
#
# Environment:
#   DATA_22K, DATA_1K, RUN_DIR (required); VARIANT (default l)
#   PRETRAIN_SBATCH, FINETUNE_SBATCH, EVAL_SBATCH   extra sbatch options per stage (nodes, tasks, GPUs, time)
#   PRETRAIN_ARGS, FT224_ARGS, FT384_ARGS, EVAL_ARGS extra arguments for each stage's command
#   RES_LOW, RES_HIGH (default 224, 384)
#   HIGH_FROM   pretrain (default: the paper's chain) | low (fine-tune RES_HIGH from the RES_LOW fine-tune, after it)
# sbatch itself reads SBATCH_PARTITION, SBATCH_ACCOUNT, ... for options common to every stage.
set -euo pipefail
: "${DATA_22K:?set DATA_22K to the ImageNet-22k shard root}"
: "${DATA_1K:?set DATA_1K to the ImageNet-1k shard root}"
: "${RUN_DIR:?set RUN_DIR to a folder every node can write}"
VARIANT=${VARIANT:-l}
RES_LOW=${RES_LOW:-224}
RES_HIGH=${RES_HIGH:-384}
HIGH_FROM=${HIGH_FROM:-pretrain}
case "$HIGH_FROM" in
    pretrain | low) ;;
    *) echo "HIGH_FROM=$HIGH_FROM: choose pretrain (both fine-tunes from the 22k run) or low (chain $RES_HIGH after $RES_LOW)" >&2; exit 2 ;;
esac
HERE=$(cd "$(dirname "$0")" && pwd)
export C2F_REPO=${C2F_REPO:-$(dirname "$HERE")}
SLURM_DIR="$HERE/slurm"
mkdir -p "$RUN_DIR"
cd "$C2F_REPO"

submit() {  # submit DEPENDENCY SBATCH_OPTIONS SCRIPT ARGS...
    local dep=$1 opts=$2
    shift 2
    # shellcheck disable=SC2086
    sbatch --parsable --export=ALL --chdir="$C2F_REPO" --output="$RUN_DIR/slurm-%x-%j.out" ${dep:+--dependency=afterok:$dep} $opts "$@"
}

# shellcheck disable=SC2086
pre=$(submit "" "${PRETRAIN_SBATCH:-}" "$SLURM_DIR/pretrain.sbatch" --variant "$VARIANT" --data "$DATA_22K" \
      --output "$RUN_DIR/pretrain" ${PRETRAIN_ARGS:-})
# shellcheck disable=SC2086
ft1=$(submit "$pre" "${FINETUNE_SBATCH:-}" "$SLURM_DIR/finetune.sbatch" --variant "$VARIANT" --data "$DATA_1K" \
      --pretrained "$RUN_DIR/pretrain" --resolution "$RES_LOW" --output "$RUN_DIR/finetune_$RES_LOW" ${FT224_ARGS:-})
if [ "$HIGH_FROM" = low ]; then high_dep=$ft1 high_src="$RUN_DIR/finetune_$RES_LOW"; else high_dep=$pre high_src="$RUN_DIR/pretrain"; fi
# shellcheck disable=SC2086
ft2=$(submit "$high_dep" "${FINETUNE_SBATCH:-}" "$SLURM_DIR/finetune.sbatch" --variant "$VARIANT" --data "$DATA_1K" \
      --pretrained "$high_src" --resolution "$RES_HIGH" --recipe 384 \
      --output "$RUN_DIR/finetune_$RES_HIGH" ${FT384_ARGS:-})
evaluate() {  # evaluate DEPENDENCY RESOLUTION: the fine-tune's best-evaluated weights (export/best/)
    # shellcheck disable=SC2086
    submit "$1" "${EVAL_SBATCH:-}" "$SLURM_DIR/evaluate.sbatch" --variant "$VARIANT" --data "$DATA_1K" \
        --weights "$RUN_DIR/finetune_$2/export/best" --resolution "$2" --json "$RUN_DIR/eval_$2.json" ${EVAL_ARGS:-}
}
ev1=$(evaluate "$ft1" "$RES_LOW")
ev2=$(evaluate "$ft2" "$RES_HIGH")
echo "pretrain $pre"
echo "finetune_$RES_LOW $ft1"
echo "finetune_$RES_HIGH $ft2"
echo "evaluate_$RES_LOW $ev1"
echo "evaluate_$RES_HIGH $ev2"
