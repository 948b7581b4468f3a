"""The export folder in timm's format (``timm.create_model("local-dir:...")``), torch.export and ONNX."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import webdataset as wds

import conv2former  # noqa: F401
from conv2former.config import TrainConfig, to_dict
from conv2former.data.shard_format import read_classes, read_info
from conv2former.errors import UserError
from conv2former.export import model_from_export, write_export
from conv2former.weights import read_weights

REPO = Path(__file__).resolve().parents[1]
EXPORT = str(REPO / "launch" / "export.py")


def make_run(
    run_dir: Path, classes, kernel_size=None, image_size=48, crop_pct=1.0, crop_mode="squash", ema=False, data_root=""
):
    """A run folder whose export/ was written by the engine's own writer, from a freshly initialised demo model."""
    cfg = TrainConfig(stage="finetune", output=str(run_dir))
    cfg.model.variant, cfg.model.kernel_size = "conv2former_demo", kernel_size
    cfg.data.root, cfg.data.image_size, cfg.data.crop_pct, cfg.data.crop_mode = (
        data_root,
        image_size,
        crop_pct,
        crop_mode,
    )
    torch.manual_seed(0)
    model = timm.create_model(
        "conv2former_demo", num_classes=len(classes), **({"kernel_size": kernel_size} if kernel_size else {})
    )
    ema_state = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()} if ema else None
    return model.eval(), write_export(str(run_dir), model.state_dict(), list(classes), to_dict(cfg), ema_state)


def test_export_folder_loads_by_name_in_timm(tmp_path):
    classes = [f"n{i:08d}" for i in range(7)]
    model, export = make_run(
        tmp_path / "run", classes, kernel_size=5, image_size=48, crop_pct=1.0, crop_mode="squash", ema=True
    )
    config = json.loads((Path(export) / "config.json").read_text())
    assert config["architecture"] == "conv2former_demo" and config["num_classes"] == 7
    assert config["num_features"] == model.num_features and config["global_pool"] == "avg"
    assert config["model_args"]["kernel_size"] == 5 and config["label_names"] == classes
    loaded = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    assert loaded.stages[0][0].attn.att[2].kernel_size == (5, 5)
    own = model.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in loaded.state_dict().items())
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.pretrained_cfg["label_names"] == classes and loaded.pretrained_cfg["tag"] == "finetune"
    data_config = timm.data.resolve_data_config({}, model=loaded)
    assert tuple(data_config["input_size"]) == (3, 48, 48) and data_config["crop_pct"] == 1.0
    assert data_config["crop_mode"] == "squash" and data_config["interpolation"] == "bicubic"
    # the EMA weights sit beside them and load through timm's file override (num_classes in the overlay too, or timm
    # drops the head as "another number of classes than the pretrained config's 1000")
    ema = timm.create_model(
        "conv2former_demo",
        num_classes=7,
        kernel_size=5,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(Path(export) / "model_ema.safetensors"), num_classes=7),
    )
    assert torch.equal(ema.pred.bias, model.pred.bias + 1)
    # our own readers take timm's spelling of the folder too
    assert read_weights(f"local-dir:{export}").classes == classes


@pytest.mark.slow
def test_local_dir_mistakes_are_one_line_errors(tmp_path):
    _, export = make_run(tmp_path / "run", ["n00000001", "n00000002"])
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((Path(export) / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match="has no config.json: it is not a timm export folder"):
        model_from_export(str(bare))
    other = tmp_path / "other"
    other.mkdir()
    for name in ("model.safetensors", "classes.txt"):
        (other / name).write_bytes((Path(export) / name).read_bytes())
    config = json.loads((Path(export) / "config.json").read_text())
    config["architecture"] = "conv2former_n"
    (other / "config.json").write_text(json.dumps(config))
    for load in (
        lambda: timm.create_model(f"local-dir:{other}", pretrained=True),
        lambda: model_from_export(str(other)),
    ):
        with pytest.raises(UserError) as err:
            load()
        message = str(err.value)
        assert "\n" not in message and "(loaded as conv2former_n)" in message and "(conv2former_demo)" in message
        assert "correct 'architecture' in the folder's config.json" in message
    config["architecture"] = "resnet_nope"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="'resnet_nope', which is not a registered model"):
        model_from_export(str(other))


def test_torch_export_keeps_the_batch_dynamic():
    model = timm.create_model("conv2former_demo", num_classes=10).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes={"x": {0: batch}})
        x = torch.randn(5, 3, 64, 64)
        assert torch.allclose(program.module()(x), model(x), atol=1e-5)


# Every code path of the registry: hierarchical with 7x7 (n) and 11x11 (t) kernels, isotropic with the patch and the
# convolutional stem; the other variants differ from these only in widths and depths.
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["conv2former_n", "conv2former_t", "conv2former_is", "conv2former_is_convs"])
def test_torch_export_of_every_architecture_path(variant):
    model = timm.create_model(variant, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch", max=4096)}})
        assert torch.allclose(program.module()(x[:1]), model(x[:1]), atol=1e-4)


@pytest.mark.slow
def test_onnx_export_is_checked_on_eval_images(demo_in1k, tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnx extra is part of .[dev]")
    import onnxruntime

    model, export = make_run(
        tmp_path / "run",
        read_classes(demo_in1k),
        image_size=48,
        crop_pct=0.875,
        crop_mode="center",
        data_root=demo_in1k,
    )
    proc = subprocess.run(
        [sys.executable, EXPORT, str(tmp_path / "run"), "--onnx", "--images", "8"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "onnxruntime vs PyTorch on 8 val images at 48 px: max abs diff" in proc.stdout
    report = json.loads((Path(export) / "onnx.json").read_text())
    assert report["images"] == 8 and report["opset"] == 18 and report["top1_agreement"] == 1.0
    assert report["max_abs_diff"] < 1e-4
    session = onnxruntime.InferenceSession(str(Path(export) / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 48, 48)  # another batch size than the 2 it was traced with
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4)


def test_onnx_without_the_runtime_is_one_line(tmp_path, monkeypatch, capsys):
    from launch.export import main

    make_run(tmp_path / "run", ["n00000001"])
    before = sorted(p.name for p in (tmp_path / "run" / "export").iterdir())
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` meets where it is not installed
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "run"), "--onnx"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "onnxruntime" in lines[0] and "install the 'onnx' extra" in lines[0]
    assert sorted(p.name for p in (tmp_path / "run" / "export").iterdir()) == before


def timm_top1(export_dir: str, root: str, split: str = "val") -> float:
    """Top-1 of ``timm.create_model("local-dir:" + export_dir)`` on a shard split, read the timm way: webdataset
    samples, PIL decoding and the eval transform timm resolves from the folder's config.json."""
    model = timm.create_model(f"local-dir:{export_dir}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    urls = [str(Path(root) / name) for name in read_info(root)["splits"][split]["filenames"]]
    samples = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil").to_tuple("jpg", "cls")
    correct = total = 0
    with torch.no_grad():
        for batch in wds.WebLoader(samples.map_tuple(transform, int).batched(64), batch_size=None, num_workers=0):
            images, labels = batch
            correct += (model(images).argmax(1) == torch.as_tensor(labels)).sum().item()
            total += len(labels)
    return correct / total


def test_evaluate_defaults_to_the_crop_the_export_was_evaluated_with(tmp_path):
    from launch.evaluate import default_crop

    _, export = make_run(tmp_path / "run", ["n00000001"], image_size=48, crop_pct=1.0, crop_mode="squash")
    assert default_crop(export, 48) == (1.0, "squash")  # the stage's own eval transform (config.json)
    assert default_crop(f"local-dir:{export}", 48) == (1.0, "squash")
    assert default_crop(str(tmp_path / "run"), 48) == (1.0, "squash")  # a run folder finds its export
    assert default_crop(export, 64) == (0.875, "center")  # another resolution: the rule by size
    assert default_crop(str(tmp_path / "none.pth"), 384) == (1.0, "squash")
