"""One resolution of a run (conv2former/engine/run.py): the Trainer, ``--dry-run`` and ``--plan-memory`` build the same
network and schedule from it and refuse the same configs with the same line. Each case is a config on which they
used to disagree (the planner and the dry run ignored model.kernel_size; the dry run skipped the progressive
regularization, the batch scaling and the ZeRO-3 refusal; ``auto`` was resolved by mutating the config)."""

from __future__ import annotations

import json

import pytest
from single_rank import pretrain_config, single_rank

from conv2former.config import to_dict
from conv2former.depthwise import DepthwiseConv2d
from conv2former.engine.dry_run import dry_run_report
from conv2former.engine.memory_plan import plan_memory_report
from conv2former.engine.run import resolve_run
from conv2former.engine.trainer import Trainer
from conv2former.errors import UserError
from launch.pretrain import main

CASES = {
    "kernel size": ["--set", "model.kernel_size=5"],
    "size schedule with regularization and batch scaling": [
        "--image-size", "64", "--epochs", "2", "--set", "data.size_schedule=[[0.0, 32], [0.5, 64]]",
        "--set", "data.size_schedule_regularization=0.5", "--set", "data.size_schedule_scale_batch=true",
    ],
    "auto batch": ["--set", "data.batch_size=auto", "--set", "data.memory_budget=3.02GiB",
                   "--set", "deepspeed.precision=bf16"],
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.slow
def test_the_dry_run_the_planner_and_the_trainer_build_the_same_run(case, demo_shards, tmp_path):
    cfg = pretrain_config(demo_shards, str(tmp_path), *CASES[case])
    given = to_dict(cfg)
    planned = plan_memory_report(cfg, 1, "3.02GiB")
    with single_rank():
        dry = dry_run_report(cfg)
    with single_rank():
        trainer = Trainer(cfg)
        parameters = sum(p.numel() for p in trainer.model.parameters())
        schedule, sizes, run = trainer.schedule.as_dict(), trainer.run.sizes.as_dict(), trainer.run
    assert to_dict(cfg) == given  # the config is never changed: what --help-config printed is what ran
    assert dry["parameters"] == planned["parameters"] == parameters
    assert dry["schedule"] == schedule and dry["schedule"]["micro_batch"] == planned["micro_batch"] == run.micro_batch
    if case == "kernel size":
        kernels = {m.weight.shape[-1] for m in trainer.model.modules() if isinstance(m, DepthwiseConv2d)}
        assert max(kernels) == 5  # (the MLP's depthwise convolutions are 3x3)
    if run.sizes.points:  # the dry run reports the schedule the run trains, regularization included
        assert json.loads(json.dumps({k: dry["size_schedule"][k] for k in sizes})) == json.loads(json.dumps(sizes))
        assert run.sizes.regularization == 0.5 and run.sizes.scale_batch and "augment_strength_at_size" in sizes
    if case == "auto batch":  # resolved into its own field, the plan in the summary's place
        assert cfg.data.batch_size == "auto" and run.memory_plan["micro_batch"] == run.micro_batch
        assert dry["memory_plan"] == run.memory_plan


def test_zero3_with_batch_scaling_is_refused_alike_everywhere(capsys, demo_shards, tmp_path):
    """The run, its dry run and its memory plan refuse the same config with the same one line (exit 2), and so do
    the Trainer and the resolution when given the config directly."""
    scaled = ["--image-size", "64", "--set", "data.size_schedule=[[0.0, 32], [0.5, 64]]",
              "--set", "data.size_schedule_scale_batch=true"]  # fmt: skip
    flags = ["--variant", "demo", "--data", demo_shards, "--output", str(tmp_path), "--zero-stage", "3", *scaled]
    lines = []
    for mode in ([], ["--dry-run"], ["--plan-memory", "--gpu-memory", "80GiB"]):
        with pytest.raises(SystemExit) as exited:
            main(flags + mode)
        assert exited.value.code == 2
        lines.append(capsys.readouterr().err.strip().splitlines()[-1])
    cfg = pretrain_config(demo_shards, str(tmp_path), *scaled)
    cfg.deepspeed.zero_stage = 3
    refusals = []
    for build in (lambda: resolve_run(cfg, 1, gpu=False), lambda: Trainer(cfg)):
        with single_rank(), pytest.raises(UserError) as refused:
            build()
        refusals.append(f"error: {refused.value}")
    assert len(set(lines + refusals)) == 1
    assert "size_schedule_scale_batch" in lines[0] and "zero_stage" in lines[0]


def test_help_config_prints_the_config_the_fine_tune_runs(capsys, demo_in1k, tmp_path):
    """The fine-tune's stage name is part of the resolved config (it used to be set after --help-config printed)."""
    from launch.finetune import configure

    argv = ["--variant", "demo", "--pretrained", str(tmp_path), "--data", demo_in1k, "--resolution", "384"]
    assert configure(argv)[1].stage == "finetune-384"
    with pytest.raises(SystemExit):
        configure([*argv, "--help-config"])
    assert "stage = finetune-384" in capsys.readouterr().out.splitlines()[0]
