"""Progressive resizing (conv2former/data/size_schedule.py): the size of each epoch as a pure function, the loaders
following it on both backends, and torch.compile specialising once per size."""

import dataclasses

import pytest
import torch

from conv2former.config import DataConfig
from conv2former.data.loader import build_loader
from conv2former.data.size_schedule import SizeSchedule
from conv2former.errors import UserError

PAPER = [[0.0, 160], [0.6, 192], [0.8, 224]]  # issue 31's schedule for the 90-epoch run


def test_step_schedule_of_the_paper_run_saves_a_third_of_the_pixels():
    sizes = SizeSchedule.from_config(PAPER, "step", 90, 224)
    per_epoch = sizes.epoch_sizes()
    assert per_epoch[:54] == [160] * 54 and per_epoch[54:72] == [192] * 18 and per_epoch[72:] == [224] * 18
    assert sizes.sizes() == [160, 192, 224]
    assert sizes.relative_cost() == pytest.approx((54 * 160**2 + 18 * 192**2 + 18 * 224**2) / (90 * 224**2))
    assert 1 - sizes.relative_cost() > 0.30
    assert sizes.as_dict()["epochs_at_size"] == {160: 54, 192: 18, 224: 18}


def test_linear_ramp_rounds_down_to_32_px_like_ffcv():
    sizes = SizeSchedule.from_config([[0.0, 160], [0.5, 224]], "linear", 10, 224)
    # fraction e/10 between 0 and 0.5: 160 + 64 * e / 5, rounded down to a multiple of 32
    assert sizes.epoch_sizes() == [160, 160, 160, 192, 192, 224, 224, 224, 224, 224]
    assert all(s % 32 == 0 for s in sizes.epoch_sizes())


def test_progressive_regularization_grows_with_the_size():
    """EfficientNetV2's progressive learning: the augmentation strength is the given share at the smallest size and
    grows linearly with the size to 1 at the final; off, it is 1 throughout."""
    sizes = SizeSchedule.from_config(PAPER, "step", 90, 224, regularization=0.5)
    assert [sizes.strength(e) for e in (0, 53, 54, 71, 72, 89)] == [0.5, 0.5, 0.75, 0.75, 1.0, 1.0]
    assert sizes.as_dict()["augment_strength_at_size"] == {160: 0.5, 192: 0.75, 224: 1.0}
    assert SizeSchedule.from_config(PAPER, "step", 90, 224).strength(0) == 1.0
    for bad in (0.0, 1.5):
        with pytest.raises(UserError):
            SizeSchedule.from_config(PAPER, "step", 90, 224, regularization=bad)
    with pytest.raises(UserError):
        SizeSchedule.from_config((), "step", 90, 224, regularization=0.5)


def test_the_loader_and_the_batch_augment_take_the_epochs_strength(demo_shards):
    from conv2former.config import AugmentConfig
    from conv2former.data.augment import BatchAugment

    cfg = DataConfig(root=demo_shards, backend="torch", image_size=64, batch_size=8, workers=0)
    sizes = SizeSchedule.from_config([[0.0, 32], [0.5, 64]], "step", 2, 64, regularization=0.5)
    loader = build_loader(cfg, "train", 0, 1, torch.device("cpu"), sizes=sizes)
    assert loader.epoch_cfg().augment.randaugment_m == round(9 * 0.5) and loader.epoch_cfg().image_size == 32
    loader.set_epoch(1)
    assert loader.epoch_cfg() is cfg  # the final size at full strength: the configured transform itself
    augment = BatchAugment(AugmentConfig(), 40, torch.device("cpu"))
    augment.set_strength(0.5)
    assert (augment.mixup.mixup_alpha, augment.mixup.cutmix_alpha) == (0.4, 0.5)
    augment.set_strength(1.0)
    assert (augment.mixup.mixup_alpha, augment.mixup.cutmix_alpha) == (0.8, 1.0)


def test_no_schedule_is_the_final_size_throughout():
    sizes = SizeSchedule.from_config((), "step", 5, 224)
    assert sizes.epoch_sizes() == [224] * 5 and sizes.relative_cost() == 1.0 and not sizes.points


@pytest.mark.parametrize(
    "points, mode",
    [
        ([[0.0, 160], [0.6, 200]], "step"),  # 200 is off the 32-px grid
        ([[0.1, 160], [0.6, 224]], "step"),  # does not start at 0
        ([[0.0, 160], [0.6, 192], [0.5, 224]], "step"),  # not increasing
        ([[0.0, 160], [0.6, 192]], "step"),  # ends below the evaluation size
        ([[0.0, 160], [1.0, 224]], "step"),  # a fraction of 1 is past the run
        ([[0.0, 160, 3]], "step"),
        ([[0.0, 224]], "cosine"),
    ],
)
def test_bad_schedules_are_one_line_errors(points, mode):
    with pytest.raises(UserError) as err:
        SizeSchedule.from_config(points, mode, 10, 224)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("backend", ["dali-cpu", "torch"])
def test_both_backends_crop_each_epoch_at_its_size_and_evaluate_at_the_final(demo_shards, backend):
    cfg = DataConfig(root=demo_shards, backend=backend, image_size=64, batch_size=8, workers=1)
    sizes = SizeSchedule.from_config([[0.0, 32], [0.5, 64]], "step", 2, 64)
    loader = build_loader(cfg, "train", 0, 1, torch.device("cpu"), sizes=sizes)
    images, _ = next(iter(loader))
    assert images.shape[-2:] == (32, 32) and loader.state_dict()["image_size"] == 32
    loader.set_epoch(1)
    images, _ = next(iter(loader))
    assert images.shape[-2:] == (64, 64) and loader.state_dict()["image_size"] == 64
    val = build_loader(dataclasses.replace(cfg, eval_batch_size=8), "val", 0, 1, torch.device("cpu"), sizes=sizes)
    images, _ = next(iter(val))
    assert images.shape[-2:] == (64, 64)


@pytest.mark.slow
def test_compile_specialises_once_per_size_and_never_goes_dynamic():
    """The engine's compile policy (dynamic=False, compile_limit): training steps at 32, 64, 32 and 64 px compile
    for the first two and reuse those graphs for the last two; every graph input has static sizes; nine sizes fit
    under the limit."""
    import timm
    import torch._dynamo
    import torch._dynamo.config as dynamo_config

    import conv2former.model  # noqa: F401
    from conv2former.engine.build import compile_limit

    sizes = [32, 64, 96, 128, 160, 192, 224, 256, 288]
    assert compile_limit(sizes) >= len(sizes) + 1
    torch._dynamo.reset()
    model = timm.create_model("conv2former_demo", num_classes=4)
    compiles = []

    def backend(gm, example_inputs):
        compiles.append([tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)])
        return gm.forward

    before = dynamo_config.recompile_limit
    try:
        dynamo_config.recompile_limit = compile_limit(sizes)
        compiled = torch.compile(model, backend=backend, dynamic=False)
        counts = []
        for size in (32, 64, 32, 64, *sizes[2:]):
            compiled(torch.randn(2, 3, size, size)).sum().backward()
            counts.append(len(compiles))
    finally:
        dynamo_config.recompile_limit = before
        torch._dynamo.reset()
    per_size = counts[0]
    assert counts[1] == 2 * per_size and counts[2] == counts[3] == counts[1]  # reused at 32 and 64
    assert counts[-1] == len(sizes) * per_size  # one set of graphs per size, none fell back to eager
    images = {s for graph in compiles for s in graph if len(s) == 4 and s[:2] == (2, 3)}
    assert {s[-1] for s in images} == set(sizes)
    assert all(isinstance(d, int) for graph in compiles for s in graph for d in s)  # no symbolic sizes


def test_dry_run_projects_the_wall_time_with_the_schedule(capsys, demo_shards, tmp_path):
    """--dry-run times the engine's step at each size of the schedule and projects each epoch at its own size."""
    import json

    from launch.pretrain import main

    argv = ["--variant", "demo", "--data", demo_shards, "--output", str(tmp_path), "--dry-run", "--image-size", "64",
            "--set", "data.size_schedule=[[0.0, 32], [0.6, 64]]"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{") :])
    sized = result["size_schedule"]
    seconds = {int(k): v for k, v in sized["measured_step_seconds"].items()}
    assert set(seconds) == {32, 64} and sized["epochs_at_size"] == {"32": 6, "64": 4}
    steps = result["schedule"]["steps_per_epoch"]  # 10 epochs: 6 at 32 px, 4 at 64 px
    expected = steps * (6 * seconds[32] + 4 * seconds[64]) / 3600
    assert result["projected_hours"] == pytest.approx(expected, abs=0.01)
    assert sized["projected_hours_at_final_size"] == pytest.approx(10 * steps * seconds[64] / 3600, abs=0.01)


def test_the_micro_batch_grows_as_the_area_shrinks_and_divides_the_per_rank_batch():
    sizes = SizeSchedule.from_config(PAPER, "step", 90, 224, scale_batch=True)
    # per rank 128 = micro 32 x accumulation 4: at 160 px the area is 0.51 of 224's -> up to 62.7 -> 32 (64 > 62.7)
    assert [sizes.micro_batch(e, 32, 128, even=True) for e in (0, 54, 72)] == [32, 32, 32]
    assert [sizes.micro_batch(e, 32, 192, even=True) for e in (0, 54, 72)] == [48, 32, 32]  # 192 / 48 = 4 steps
    demo = SizeSchedule.from_config([[0.0, 32], [0.5, 64]], "step", 2, 64, scale_batch=True)
    assert [demo.micro_batch(e, 16, 32, even=True) for e in (0, 1)] == [32, 16]
    assert SizeSchedule.from_config(PAPER, "step", 90, 224).micro_batch(0, 32, 128, even=True) == 32  # off
    with pytest.raises(UserError):
        SizeSchedule.from_config((), "step", 90, 224, scale_batch=True)


def test_scaling_the_micro_batch_under_zero3_is_a_one_line_error(capsys, demo_shards, tmp_path):
    from launch.pretrain import main

    argv = ["--variant", "demo", "--data", demo_shards, "--output", str(tmp_path), "--image-size", "64",
            "--zero-stage", "3", "--set", "data.size_schedule=[[0.0, 32], [0.5, 64]]",
            "--set", "data.size_schedule_scale_batch=true"]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "zero_stage" in err[0]
