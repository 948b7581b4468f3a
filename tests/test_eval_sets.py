"""launch/evaluate.py --eval-set: ImageNet-ReaL, -V2, -A, -R and -Sketch in their distributed layouts, made here as
small trees, scored by weights that predict a known class whatever the image (the head's weights are zero, its bias
ranks the classes), so every expected top-1/top-5 is known by construction."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import ranks_launch, stage_env
from PIL import Image
from safetensors.torch import save_file

import conv2former.model  # noqa: F401
from conv2former.config import TrainConfig, to_dict
from conv2former.data.shard_format import canonical_synsets
from conv2former.export import write_export

REPO = Path(__file__).resolve().parents[1]
EVALUATE = str(REPO / "launch" / "evaluate.py")
SYNSETS = canonical_synsets("imagenet1k")
FAVOURITE = 5  # the 1k class the weights predict; below it, lower class indices score higher


def _image(path: Path, seed: int, suffix: str = ".JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 52, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path.with_suffix(suffix))


def _export(folder: Path, head: list) -> Path:
    """An export whose logits rank SYNSETS[FAVOURITE] first, then the other 1k classes by index."""
    model = timm.create_model("conv2former_demo", num_classes=len(head))
    score = {s: -i / 1000 for i, s in enumerate(SYNSETS)}
    score[SYNSETS[FAVOURITE]] = 10.0
    with torch.no_grad():
        model.pred.weight.zero_()
        model.pred.bias.copy_(torch.tensor([score.get(s, -5.0) for s in head]))
    cfg = TrainConfig()
    cfg.model.variant, cfg.data.image_size = "conv2former_demo", 32
    return Path(write_export(str(folder), model.state_dict(), head, to_dict(cfg)))


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> Path:
    """root/{v2,a,r,sketch,imagenet-real}: the five layouts."""
    root = tmp_path_factory.mktemp("eval_sets")
    seed = 0
    for folder, count in (("3", 2), ("5", 3), ("7", 1)):  # V2: class-index folders
        for k in range(count):
            seed += 1
            _image(root / "v2" / folder / f"{k}", seed, ".jpeg")
    for name, classes in SYNSET_TREES.items():  # synset folders
        for c in classes:
            for k in range(_count(c)):
                seed += 1
                _image(root / name / SYNSETS[c] / f"{k}", seed, ".jpg" if name != "sketch" else ".JPEG")
    real = [[5], [5, 3], [], [3], [0], [1, 5], [7], [], [2], [4]]  # images 1-6 present, 7-10 not
    for number in range(1, 7):
        _image(root / "imagenet-real" / SYNSETS[number] / f"ILSVRC2012_val_{number:08d}", number)
    (root / "imagenet-real" / "real.json").write_text(json.dumps(real))
    return root


@pytest.fixture(scope="module")
def export_1k(tmp_path_factory) -> Path:
    return _export(tmp_path_factory.mktemp("run"), list(SYNSETS))


def _evaluate(capsys, *argv) -> dict:
    from launch.evaluate import main

    json_path = Path(argv[argv.index("--json") + 1])
    assert main(["--variant", "demo", "--resolution", "32", "--batch", "4", "--workers", "0", *argv]) == 0
    return json.loads(json_path.read_text())


SYNSET_TREES = {"a": (1, 5, 9), "r": (2, 8, 11), "sketch": (5, 6)}  # 1k class indices of each set's folders


def _count(c: int) -> int:
    """Images in class c's folder."""
    return c % 3 + 1


def _scored(classes) -> tuple:
    """(top-1, top-5, images) of a synset-folder set scored over its own classes: the masked head predicts class 5
    when the set has it, else its lowest class; with at most 5 classes every label is in the top-5."""
    predicted = FAVOURITE if FAVOURITE in classes else min(classes)
    total = sum(_count(c) for c in classes)
    return _count(predicted) / total, 1.0, total


# what each set scores, known by construction: (top-1, top-5, images)
EXPECTED = {
    "v2": (3 / 6, 5 / 6, 6),  # predicts class 5 (3 images); the top-5 is 5, 0, 1, 2, 3: class 3 too, not 7
    **{name: _scored(classes) for name, classes in SYNSET_TREES.items()},
    "real": (3 / 5, 5 / 5, 5),  # image 3 has no label; 1, 2, 6 hold 5; 4 (3) and 5 (0) are in the top-5
}


@pytest.mark.parametrize("name", ["v2", "a", "r", "sketch", "real"])
def test_each_set_scores_what_the_weights_predict(trees, export_1k, tmp_path, capsys, name):
    folder = trees / ("imagenet-real" if name == "real" else name)
    result = _evaluate(
        capsys,
        "--weights",
        str(export_1k),
        "--eval-set",
        name,
        "--eval-root",
        str(folder),
        "--json",
        str(tmp_path / "r.json"),
    )
    row = result["sets"][name]
    assert (row["top1"], row["top5"], row["num_samples"]) == pytest.approx(EXPECTED[name])
    assert result["missing"] == {}
    if name == "real":
        assert row["note"].startswith("5 labelled of 6 val images found (1 without a ReaL label left out)")


def test_all_sets_one_table_through_a_22k_style_head_and_recorded_in_the_export(trees, tmp_path, capsys):
    """A head over more synsets, in another order (as a 22k head is), scores through the synset mapping exactly as
    the 1k head; --record puts the table into the export's README.md and evaluation_sets.json."""
    head = list(reversed(SYNSETS)) + ["n99999999", "n99999998"]
    export = _export(tmp_path / "run22k", head)
    result = _evaluate(
        capsys,
        "--weights",
        str(export),
        "--eval-set",
        "all",
        "--eval-root",
        str(trees),
        "--record",
        "--json",
        str(tmp_path / "all.json"),
    )
    assert list(result["sets"]) == ["real", "v2", "a", "r", "sketch"]
    for name, (top1, top5, n) in EXPECTED.items():
        row = result["sets"][name]
        assert (row["top1"], row["top5"], row["num_samples"]) == pytest.approx((top1, top5, n)), name
    recorded = json.loads((export / "evaluation_sets.json").read_text())
    assert set(recorded) == {f"{n}@32" for n in EXPECTED}
    readme = (export / "README.md").read_text()
    assert f"| ImageNet-A | 32 | center 0.875 | {100 * EXPECTED['a'][0]:.2f} |" in readme


def test_a_set_that_is_missing_from_all_is_listed_not_skipped(trees, export_1k, tmp_path, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "imagenet-a").symlink_to(trees / "a")
    result = _evaluate(
        capsys,
        "--weights",
        str(export_1k),
        "--eval-set",
        "all",
        "--eval-root",
        str(partial),
        "--json",
        str(tmp_path / "p.json"),
    )
    assert list(result["sets"]) == ["a"]
    assert set(result["missing"]) == {"real", "v2", "r", "sketch"}
    assert all(str(partial) in why for why in result["missing"].values())


@pytest.mark.slow
def test_two_ranks_count_every_image_once(trees, export_1k, tmp_path):
    out = tmp_path / "two.json"
    args = (
        "--variant",
        "demo",
        "--weights",
        str(export_1k),
        "--eval-set",
        "all",
        "--eval-root",
        str(trees),
        "--resolution",
        "32",
        "--batch",
        "2",
        "--workers",
        "0",
        "--json",
        str(out),
    )
    proc = subprocess.run(ranks_launch(EVALUATE, *args), env=stage_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ranks"] == 2
    for name, (top1, top5, n) in EXPECTED.items():
        row = result["sets"][name]
        assert (row["top1"], row["top5"], row["num_samples"]) == pytest.approx((top1, top5, n)), name


@pytest.mark.parametrize(
    "argv, code",
    [
        (("--eval-set", "imagenet-c", "--eval-root", "{trees}"), 2),
        (("--eval-set", "a"), 2),
        (("--eval-set", "a", "--eval-root", "{trees}/v2"), 2),  # class-index folders are not synset folders
        (("--eval-set", "v2", "--eval-root", "{trees}/a"), 2),
        (("--eval-set", "real", "--eval-root", "{trees}/a"), 2),  # no real.json
        (("--eval-set", "a", "--eval-root", "{trees}/a", "--backend", "dali-cpu"), 2),
        (("--eval-set", "a", "--eval-root", "{trees}/a", "--record"), 2),  # weights outside an export folder
        ((), 2),  # neither --data nor --eval-set
        (("--eval-set", "a", "--eval-root", "{trees}/a", "--per-class", "x.txt"), 2),  # per-class needs --data
    ],
)
def test_mistakes_are_one_line_errors(trees, tmp_path, capsys, argv, code):
    from launch.evaluate import main

    weights = tmp_path / "w"
    weights.mkdir()
    model = timm.create_model("conv2former_demo", num_classes=1000)
    save_file(model.state_dict(), weights / "model.safetensors")  # no classes.txt: a 1000-class head is the 1k
    with pytest.raises(SystemExit) as e:
        main(
            ["--variant", "demo", "--weights", str(weights / "model.safetensors"), "--workers", "0"]
            + [a.format(trees=trees) for a in argv]
        )
    assert e.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]


def test_a_head_without_the_sets_classes_is_a_one_line_error(trees, tmp_path, capsys):
    export = _export(tmp_path / "other", [f"n{i:08d}" for i in range(10)])
    from launch.evaluate import main

    with pytest.raises(SystemExit) as e:
        main(
            [
                "--variant",
                "demo",
                "--weights",
                str(export),
                "--eval-set",
                "a",
                "--eval-root",
                str(trees / "a"),
                "--workers",
                "0",
            ]
        )
    assert e.value.code == 2
    assert "lacks 3 of a's 3 classes" in capsys.readouterr().err


def test_a_corrupt_image_names_the_file(trees, export_1k, tmp_path, capsys):
    import shutil

    from launch.evaluate import main

    copy = tmp_path / "a"
    shutil.copytree(trees / "a", copy)
    bad = copy / SYNSETS[9] / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(SystemExit) as e:
        main(
            [
                "--variant",
                "demo",
                "--weights",
                str(export_1k),
                "--eval-set",
                "a",
                "--eval-root",
                str(copy),
                "--resolution",
                "32",
                "--workers",
                "0",
            ]
        )
    assert e.value.code == 2
    assert str(bad) in capsys.readouterr().err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_several_resolutions_are_each_evaluated_and_the_best_reported(trees, tmp_path, capsys):
    """--resolutions: one entry per size with its crop (0.875 center up to 256 px, squash above), the best by the
    first row's top-1 (a tie here: the weights ignore the image, so the smallest size), each recorded."""
    from launch.evaluate import main

    export = _export(tmp_path / "run", list(SYNSETS))
    out = tmp_path / "res.json"
    argv = ["--variant", "demo", "--weights", str(export), "--eval-set", "a,r", "--eval-root", str(trees),
            "--resolutions", "64,32,288", "--batch", "4", "--workers", "0", "--record", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert [(r["resolution"], r["crop_mode"]) for r in result["resolutions"]] == [
        (64, "center"), (32, "center"), (288, "squash")
    ]  # fmt: skip
    assert all(r["sets"]["a"]["top1"] == pytest.approx(EXPECTED["a"][0]) for r in result["resolutions"])
    assert result["best"] == {"resolution": 32, "set": "a", "top1": pytest.approx(EXPECTED["a"][0])}
    assert set(json.loads((export / "evaluation_sets.json").read_text())) == {
        f"{s}@{r}" for s in ("a", "r") for r in (32, 64, 288)
    }
    with pytest.raises(SystemExit) as e:
        main([*argv[:-5], "--resolutions", "224,x"])
    assert e.value.code == 2
