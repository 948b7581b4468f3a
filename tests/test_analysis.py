"""The paper's analyses: effective receptive fields (Table 5, Fig. 4) measured the RepLKNet way."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

import conv2former  # noqa: F401
from conv2former.analysis.__main__ import main as analysis_main
from conv2former.analysis.erf import measure, normalised, side_length
from conv2former.analysis.models import StageFeatures


class PlainConvs(nn.Module):
    """n k x k convolutions with constant weights and no nonlinearity: the receptive field is n(k-1)+1 exactly."""

    def __init__(self, layers: int, kernel: int) -> None:
        super().__init__()
        convs = [nn.Conv2d(3 if i == 0 else 4, 4, kernel, padding=kernel // 2, bias=False) for i in range(layers)]
        for conv in convs:
            nn.init.constant_(conv.weight, 1.0 / conv.weight[0].numel())
        self.body = nn.Sequential(*convs)

    def forward(self, x):
        return [self.body(x)]


@pytest.mark.parametrize("layers,kernel", [(1, 3), (2, 5), (3, 7), (4, 11)])
def test_plain_convolutions_give_the_analytic_receptive_field(layers, kernel):
    (erf,) = measure(PlainConvs(layers, kernel).eval(), [torch.randn(2, 3, 64, 64)], [0])
    analytic = layers * (kernel - 1) + 1
    assert abs(side_length(normalised(erf.scores), 1.0) - analytic) <= 1
    assert np.count_nonzero(erf.scores.sum(0)) == analytic  # the support itself, column by column
    assert erf.metrics["side_0.5"] <= erf.metrics["side_0.75"] <= analytic


def test_side_length_of_known_maps():
    square = np.zeros((21, 21))
    square[8:13, 8:13] = 1.0  # a centred 5 x 5 block
    assert side_length(square, 1.0) == 5 and side_length(square, 0.2) == 3 and side_length(square, 0.04) == 1
    assert side_length(np.zeros((5, 5)), 0.5) == 0


def conv2former_erf(kernel: int):
    torch.manual_seed(0)
    model = timm.create_model("conv2former_demo", kernel_size=kernel, layer_scale_init_value=1.0).eval()
    torch.manual_seed(1)
    return measure(StageFeatures(model, [0, 1, 2, 3]), [torch.randn(2, 3, 128, 128)], [0, 1, 2, 3])


def test_conv2former_erf_grows_with_the_kernel_at_initialisation():
    """Layer scale 1 at initialisation: with timm's default 1e-6 every block starts as nearly the identity and only
    the downsampling layers shape the ERF. Stages 1-3 (stage 4 of the demo at 128 px is a 4 x 4 map)."""
    sides = {k: [e.metrics["side_mean"] for e in conv2former_erf(k)] for k in (5, 11, 21)}
    for stage in range(3):
        assert sides[5][stage] < sides[11][stage] < sides[21][stage], sides


@pytest.mark.slow
def test_the_command_is_deterministic_and_writes_table_and_figure(demo_in1k, tmp_path, capsys):
    argv = [
        "erf",
        "--model",
        "conv2former_demo,convnext_atto",
        "--data",
        demo_in1k,
        "--images",
        "3",
        "--resolution",
        "64",
        "--batch",
        "2",
    ]
    assert analysis_main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert analysis_main([*argv, "--out", str(tmp_path / "b")]) == 0
    first = json.loads((tmp_path / "a" / "erf.json").read_text())
    assert first == json.loads((tmp_path / "b" / "erf.json").read_text())
    assert list(first["models"]) == ["conv2former_demo", "convnext_atto"]
    stages = first["models"]["conv2former_demo"]["stages"]
    assert list(stages) == ["1", "2", "3", "4"] and first["models"]["conv2former_demo"]["images"] == 3
    for key in ("side_0.5", "area_0.5", "side_0.75", "area_0.75", "side_mean", "area_mean"):
        assert key in stages["1"]
    assert (tmp_path / "a" / "erf.png").stat().st_size > 10_000
    assert "side@0.5" in capsys.readouterr().out


def test_mistakes_are_one_line_errors(demo_in1k, tmp_path, capsys):
    from safetensors.torch import save_file

    demo = timm.create_model("conv2former_demo", num_classes=10)
    weights = tmp_path / "demo.safetensors"
    save_file(demo.state_dict(), weights)
    base = ["erf", "--data", demo_in1k, "--resolution", "64", "--out", str(tmp_path / "o")]
    cases = {
        "--images must be at least 1": ["--model", "conv2former_demo", "--images", "0"],
        "unknown model 'no_such_net'": ["--model", "no_such_net"],
        "(conv2former_demo); model is dims 64,128": ["--model", "conv2former_n", "--weights", str(weights)],
        "; give the --model these weights belong to": ["--model", "conv2former_t", "--weights", str(weights)],
        "expected key=value": ["--model", "conv2former_demo", "--model-kwargs", "kernel_size"],
        "give one per model": ["--model", "conv2former_demo,convnext_atto", "--weights", "a.safetensors"],
    }
    for expected, argv in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            analysis_main([*base, *argv])
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert expected in lines[-1] and lines[-1].startswith("error: "), (expected, lines[-1:])


def test_gradcam_command_writes_the_grid_and_names_the_classes(demo_in1k, tmp_path, capsys):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(timm.create_model("conv2former_demo", num_classes=10).state_dict(), tmp_path / "w.safetensors")
    argv = ["gradcam", "--model", "conv2former_demo", "--data", demo_in1k, "--images", "4", "--resolution", "64"]
    assert analysis_main([*argv, "--weights", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "cam")]) == 0
    report = json.loads((tmp_path / "cam" / "gradcam.json").read_text())
    assert report["layer"] == "stages.3" and len(report["images"]) == 4
    assert all(r["true"].startswith("n") and r["predicted"].startswith("n") for r in report["images"])
    assert (tmp_path / "cam" / "gradcam.png").stat().st_size > 10_000
    assert "target layer stages.3" in capsys.readouterr().out
    save_file(timm.create_model("conv2former_demo", num_classes=40).state_dict(), tmp_path / "w40.safetensors")
    with pytest.raises(SystemExit):
        analysis_main([*argv, "--weights", str(tmp_path / "w40.safetensors"), "--out", str(tmp_path / "x")])
    assert "has 40 classes, the data 10" in capsys.readouterr().err


def test_heat_measures_on_a_known_mask():
    from conv2former.analysis.gradcam import heat_inside, heat_ratio

    cam_map = np.zeros((8, 8))
    cam_map[2:4, 2:4] = 1.0
    mask = np.zeros((16, 16), dtype=bool)
    mask[4:8, 4:8] = True  # the same square at twice the resolution
    assert heat_inside(cam_map, mask) == 1.0 and heat_ratio(cam_map, mask) == float("inf")
    cam_map[:] = 0.5
    assert heat_ratio(cam_map, mask) == pytest.approx(1.0) and heat_inside(cam_map, mask) == pytest.approx(4 / 64)
