"""What the first GPU reservation would otherwise have found, reproduced on CPU (issue: "the first GPU reservation
pays off"): launches that work with deepspeed installed by ``pip --target`` + PYTHONPATH (no ``deepspeed`` script
beside the interpreter), the rank's GPU chosen among the devices it can see, and the Slurm templates leaving NCCL's
fault handling to the engine. (The bf16 cast: tests/test_model.py; the depthwise accuracy gate:
tests/test_cpu_tuning.py; the checklist itself: tests/test_gpu_checklist.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO

from conv2former.engine.distributed import cuda_index, deepspeed_command, python_path
from conv2former.errors import UserError

RANK_SCRIPT = """
import json, os, sys
seen = {"rank": os.environ["RANK"], "world": os.environ["WORLD_SIZE"], "path": os.environ["PYTHONPATH"]}
with open(os.path.join(os.path.dirname(__file__), "rank" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump(seen, f)  # a file per rank: the ranks' stdout lines may interleave
"""


@pytest.mark.slow
def test_the_launcher_runs_where_deepspeed_is_only_on_pythonpath(tmp_path):
    """The GPU host's layout: its own interpreter (no deepspeed script beside it) and the kit's packages on
    PYTHONPATH. ``deepspeed_command`` launches 2 ranks there, and the ranks still see every PYTHONPATH entry."""
    base = getattr(sys, "_base_executable", sys.executable)
    if (
        Path(base).resolve().parent == Path(sys.executable).parent.resolve()
        or (Path(base).parent / "deepspeed").exists()
    ):
        reason = f"{base} has a deepspeed script beside it: not the layout under test"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the launch without a deepspeed script: {reason}")
        pytest.skip(reason)
    site = sysconfig.get_paths()["purelib"]  # this environment's packages, as a `pip --target` folder
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    marker = str(tmp_path / "an-entry-of-the-caller")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), site, marker]), DS_ACCELERATOR="cpu")
    env.pop("VIRTUAL_ENV", None)
    code = (
        "import subprocess, sys; from conv2former.engine.distributed import deepspeed_command; "
        f"sys.exit(subprocess.run(deepspeed_command({str(script)!r}, ranks=2)).returncode)"
    )
    done = subprocess.run([base, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(r["rank"] for r in ranks) == ["0", "1"] and {r["world"] for r in ranks} == {"2"}
    assert all(marker in r["path"].split(os.pathsep) and site in r["path"].split(os.pathsep) for r in ranks)


def test_launch_commands_and_child_paths_use_the_running_interpreter(monkeypatch):
    command = deepspeed_command("train.py", "--x", ranks=4, port=1234)
    assert command[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert command[3:] == ["--num_gpus", "4", "--master_port", "1234", "train.py", "--x"]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/kit", "/repo", ""]))
    assert python_path("/repo") == os.pathsep.join(["/repo", "/kit"])  # extended, never replaced, no duplicates
    monkeypatch.delenv("PYTHONPATH")
    assert python_path("/repo") == "/repo"


@pytest.mark.parametrize(
    "local_rank, visible, index",
    [(0, 8, 0), (5, 8, 5), (3, 1, 0), (0, 1, 0)],  # every GPU visible; one GPU bound to each task (Slurm)
)
def test_each_rank_takes_a_gpu_it_can_see(local_rank, visible, index):
    assert cuda_index(local_rank, visible) == index


def test_a_rank_with_no_gpu_of_its_own_is_one_line(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with pytest.raises(UserError) as error:
        cuda_index(3, 2)
    assert "\n" not in str(error.value) and "CUDA_VISIBLE_DEVICES=2,3" in str(error.value)


def _slurm_environment(**extra: str) -> dict:
    """The environment common.sh leaves for the job's tasks (sourced by bash; Slurm's scontrol answered by a shell
    function, since only the variables are under test here: tests/test_slurm.py runs the templates on real Slurm)."""
    script = (
        "scontrol() { echo node1; }; nvidia-smi() { return 1; }; source launch/slurm/common.sh >/dev/null; "
        f'"{sys.executable}" -c "import json, os; print(json.dumps(dict(os.environ)))"'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCH_NCCL", "TORCH_FR"))}
    env.update(SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID="7", SLURM_JOB_NODELIST="node1", **extra)
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_slurm_jobs_keep_the_engines_nccl_fault_handling():
    """common.sh sets none of NCCL's fault variables (it used to force TORCH_NCCL_ASYNC_ERROR_HANDLING=1 over the
    engine's documented 3), and keeps the user's own."""
    job = _slurm_environment()
    assert not [k for k in job if k.startswith(("TORCH_NCCL", "TORCH_FR"))]
    assert _slurm_environment(TORCH_NCCL_ASYNC_ERROR_HANDLING="2")["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"
