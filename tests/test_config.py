"""The configuration and the schedule, in seconds: precedence (stage YAML < variant recipe < --config < flags < --set)
for both launchers, the documented fields, the schedule derived from them."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from conv2former.config import TrainConfig, field_docs
from conv2former.engine.cli import add_train_arguments, resolve_config
from conv2former.engine.optim import derive_schedule
from conv2former.errors import UserError

REPO = Path(__file__).resolve().parent.parent
FINETUNE_CONFIGS = REPO / "finetune" / "configs"
PRETRAIN_CONFIGS = REPO / "pretrain" / "configs"


def finetune_cfg(*argv: str, resolution: int = 224) -> TrainConfig:
    """What launch/finetune.py resolves (the same files, in the same order)."""
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(["--data", "/d", *argv])
    defaults = [str(FINETUNE_CONFIGS / "finetune_224.yaml")]
    if resolution > 256:
        defaults.append(str(FINETUNE_CONFIGS / "finetune_384.yaml"))
    return resolve_config(
        args, defaults, str(FINETUNE_CONFIGS / "variants"), ("", "_384") if resolution > 256 else ("",)
    )


def pretrain_cfg(*argv: str) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(["--data", "/d", *argv])
    return resolve_config(args, [str(PRETRAIN_CONFIGS / "pretrain_22k.yaml")], str(PRETRAIN_CONFIGS / "variants"))


def yaml_file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_finetune_recipe_per_variant_and_resolution():
    assert finetune_cfg("--variant", "l").model.drop_path_rate == 0.3
    assert finetune_cfg("--variant", "b").model.drop_path_rate == 0.2
    assert finetune_cfg("--variant", "t").model.drop_path_rate == 0.1
    assert finetune_cfg("--variant", "demo").model.drop_path_rate == 0.0
    assert not finetune_cfg("--variant", "l").model.grad_checkpointing
    at_384 = finetune_cfg("--variant", "l", resolution=384)
    assert at_384.model.grad_checkpointing and at_384.data.crop_mode == "squash" and at_384.data.crop_pct == 1.0
    assert not finetune_cfg("--variant", "b", resolution=384).model.grad_checkpointing


def test_precedence_stage_then_variant_then_config_then_flags_then_set(tmp_path):
    # a --config file beats the variant's recipe (it used to be re-set to the per-variant value afterwards)
    config = yaml_file(tmp_path, "c.yaml", "model:\n  drop_path_rate: 0.5\nschedule:\n  epochs: 7\n")
    cfg = finetune_cfg("--variant", "l", "--config", config)
    assert cfg.model.drop_path_rate == 0.5 and cfg.schedule.epochs == 7
    # flags beat --config; --set beats flags
    cfg = finetune_cfg("--variant", "l", "--config", config, "--epochs", "9")
    assert cfg.schedule.epochs == 9
    cfg = finetune_cfg(
        "--variant",
        "l",
        "--config",
        config,
        "--epochs",
        "9",
        "--set",
        "schedule.epochs=11",
        "--set",
        "model.drop_path_rate=0.4",
    )
    assert cfg.schedule.epochs == 11 and cfg.model.drop_path_rate == 0.4
    # a later --config beats an earlier one
    later = yaml_file(tmp_path, "d.yaml", "model:\n  drop_path_rate: 0.25\n")
    assert finetune_cfg("--variant", "l", "--config", config, "--config", later).model.drop_path_rate == 0.25
    # the same order for pretraining
    cfg = pretrain_cfg(
        "--variant",
        "demo",
        "--config",
        yaml_file(tmp_path, "p.yaml", "data:\n  image_size: 40\n"),
        "--image-size",
        "48",
    )
    assert cfg.data.image_size == 48 and cfg.data.batch_size == 16  # the demo recipe's micro-batch survives


def test_a_variant_chosen_in_a_config_file_brings_its_recipe(tmp_path):
    config = yaml_file(tmp_path, "v.yaml", "model:\n  variant: conv2former_demo\n")
    cfg = pretrain_cfg("--config", config)
    assert cfg.model.variant == "conv2former_demo" and cfg.schedule.global_batch == 64  # pretrain variants/demo.yaml
    assert finetune_cfg("--config", config).model.drop_path_rate == 0.0


def test_data_seed_follows_the_run_seed_unless_set():
    assert pretrain_cfg("--variant", "demo", "--seed", "5").data.seed is None  # the trainer gives it the run's seed
    assert pretrain_cfg("--variant", "demo", "--set", "data.seed=3").data.seed == 3


def test_config_mistakes_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="unknown config key 'model.drop_pth_rate'"):
        finetune_cfg("--variant", "l", "--set", "model.drop_pth_rate=0.2")
    with pytest.raises(UserError, match="unknown variant 'xl'"):
        finetune_cfg("--variant", "xl")
    with pytest.raises(UserError, match="expected float"):
        finetune_cfg("--variant", "l", "--set", "model.drop_path_rate=high")
    with pytest.raises(UserError, match="config file not found"):
        finetune_cfg("--variant", "l", "--config", str(tmp_path / "none.yaml"))


def test_every_field_is_documented_where_it_is_declared():
    docs = field_docs()
    assert len(docs) > 50
    assert [key for key, doc in docs.items() if not doc] == []


def test_help_config_lists_the_resolved_fields(capsys):
    with pytest.raises(SystemExit) as exit_info:
        finetune_cfg("--variant", "l", "--help-config", resolution=384)
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(field_docs())
    assert "model.grad_checkpointing = true  # per-block activation checkpointing (memory for compute)" in lines


@pytest.mark.parametrize(
    "world,micro,global_batch,loader_steps,accum,steps_per_epoch",
    [
        (2, 16, 64, 31, 2, 15),  # the demo: 2 ranks x 16 x 2 micro-steps; an epoch's odd micro-batch is dropped
        (128, 32, 4096, 1100, 1, 1100),
        (8, 32, 4096, 8000, 16, 500),
    ],
)
def test_schedule_derivation(world, micro, global_batch, loader_steps, accum, steps_per_epoch):
    cfg = TrainConfig()
    cfg.data.batch_size, cfg.schedule.global_batch, cfg.schedule.epochs = micro, global_batch, 3
    cfg.schedule.warmup_epochs, cfg.optim.base_lr = 0.5, 1e-3
    schedule = derive_schedule(cfg.schedule, cfg.optim.base_lr, micro, world, loader_steps)
    assert schedule.grad_accum == accum and schedule.steps_per_epoch == steps_per_epoch
    assert schedule.micro_steps_per_epoch == steps_per_epoch * accum <= loader_steps
    assert schedule.total_steps == schedule.stop_step == 3 * steps_per_epoch
    assert schedule.warmup_steps == round(0.5 * steps_per_epoch)
    assert schedule.lr == pytest.approx(1e-3 * global_batch / 1024)
    cfg.schedule.max_steps = 5
    assert derive_schedule(cfg.schedule, cfg.optim.base_lr, micro, world, loader_steps).stop_step == 5


def test_impossible_schedules_are_one_line_errors():
    cfg = TrainConfig()
    cfg.schedule.global_batch = 4096
    with pytest.raises(UserError, match="not divisible by 3 ranks x micro-batch 32"):
        derive_schedule(cfg.schedule, cfg.optim.base_lr, 32, 3, 1000)
    with pytest.raises(UserError, match="lower --global-batch"):
        derive_schedule(cfg.schedule, cfg.optim.base_lr, 32, 8, 10)


def test_stage_recipes_hold_no_unknown_keys():
    """Every recipe file in the repository applies cleanly (a typo in one is caught here, not on a cluster)."""
    from conv2former.config import apply_overrides, load_yaml

    files = sorted(PRETRAIN_CONFIGS.rglob("*.yaml")) + sorted(FINETUNE_CONFIGS.rglob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        apply_overrides(TrainConfig(), load_yaml(str(path)))
    assert os.path.exists(FINETUNE_CONFIGS / "variants" / "l_384.yaml")
