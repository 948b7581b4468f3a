# Shared by the sbatch templates (sourced, not run). Sets the rendezvous variables and runs one training or
# evaluation command across the allocation, forwarding preemption signals and requeueing when asked to.
#
# Environment (all optional):
#   C2F_REPO      repository checkout on a filesystem every node sees (default: the submit directory)
#   C2F_PYTHON    python with the project installed (default: $C2F_REPO/.venv/bin/python if present, else python3)
#   C2F_LAUNCHER  srun (default): one task per GPU started by srun, RANK/WORLD_SIZE/LOCAL_RANK from SLURM_*;
#                 deepspeed: one task per node running `deepspeed --no_ssh --node_rank` (no ssh either way)
#   MASTER_PORT   rendezvous port (default: derived from the job id)

C2F_REPO=${C2F_REPO:-$SLURM_SUBMIT_DIR}
cd "$C2F_REPO"
if [[ -z "${C2F_PYTHON:-}" ]]; then
    if [[ -x "$C2F_REPO/.venv/bin/python" ]]; then C2F_PYTHON="$C2F_REPO/.venv/bin/python"; else C2F_PYTHON=python3; fi
fi
export C2F_PYTHON PYTHONPATH="$C2F_REPO${PYTHONPATH:+:$PYTHONPATH}"
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# NCCL's fault handling is the engine's (docs/training.md "A dead or hung rank": TORCH_NCCL_ASYNC_ERROR_HANDLING=3 and
# the flight recorder, set in each rank unless the environment already holds them): nothing is overridden here.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}   # CPU nodes (and the tests): DeepSpeed's CPU accelerator, gloo
fi
echo "[c2f] job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: ${SLURM_NTASKS:-1} task(s), master ${MASTER_ADDR}:${MASTER_PORT}"

c2f_run() {
    # c2f_run SCRIPT ARGS...: run SCRIPT on every task of the allocation; on USR1 (preemption / time limit) tell the
    # tasks, which checkpoint at the next step and exit 0, then requeue this job so it resumes from that checkpoint.
    local script=$1
    shift
    local requeue=0 step_pid status
    trap 'echo "[c2f] USR1: asking the tasks to checkpoint, then requeueing"; requeue=1; kill -USR1 "$step_pid" 2>/dev/null || true' USR1
    if [[ "${C2F_LAUNCHER:-srun}" == deepspeed ]]; then
        local gpus=${SLURM_GPUS_ON_NODE:-${GPUS_PER_NODE:-1}}
        # deepspeed learns the nodes from a hostfile even without ssh (without one it refuses --num_nodes > 1): each
        # node writes the allocation's to its own /tmp (one file per job and node, rewritten on a requeue)
        export C2F_HOSTS
        C2F_HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$gpus/")
        srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c \
            'hostfile=/tmp/c2f-hostfile-$SLURM_JOB_ID-$SLURM_NODEID && printf "%s\n" "$C2F_HOSTS" > "$hostfile" &&
             exec "$C2F_PYTHON" -m deepspeed.launcher.runner --hostfile "$hostfile" --no_ssh --num_nodes "$SLURM_NNODES" \
                 --node_rank "$SLURM_NODEID" --num_gpus "$0" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
                 "$@"' "$gpus" "$script" "$@" &
    else
        srun --kill-on-bad-exit=1 bash -c \
            'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; exec "$C2F_PYTHON" "$@"' \
            _ "$script" "$@" &
    fi
    step_pid=$!
    while true; do
        status=0
        wait "$step_pid" || status=$?
        kill -0 "$step_pid" 2>/dev/null || break   # a trapped signal interrupts `wait`: keep waiting for the step
    done
    if [[ $requeue == 1 ]]; then
        echo "[c2f] step ended with status $status after USR1: requeueing job ${SLURM_JOB_ID}"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    return "$status"
}
