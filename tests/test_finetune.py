"""Fine-tuning and evaluation: head transfer by synset, layer decay, the real commands end to end on 2 CPU ranks."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import timm
import torch
from conftest import REPO, stage_env, summary_from
from conftest import run_ranks as launch
from safetensors.torch import load_file
from test_export import timm_top1

import conv2former  # noqa: F401
from conv2former.data.shard_format import canonical_synsets
from conv2former.errors import UserError
from conv2former.head_transfer import HEAD_INIT_SCALE, transfer_head
from conv2former.weights import check_compatible, read_weights
from launch.demo_report import COMMANDS

FINETUNE = str(REPO / "launch" / "finetune.py")
EVALUATE = str(REPO / "launch" / "evaluate.py")


def summary_of(proc) -> dict:
    return summary_from(proc.stdout)


def test_head_rows_follow_synsets_and_unknown_classes_stay_fresh():
    src_classes = ["n01440764", "n01443537", "n02085620", "n04399382x"]
    source = timm.create_model("conv2former_demo", num_classes=4)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    target_classes = ["n02085620", "n04399382", "n01440764"]  # n04399382 (teddy bear) is not in the source
    target = timm.create_model("conv2former_demo", num_classes=3)
    fresh = target.pred.weight.detach().clone()
    report = transfer_head(state, src_classes, target_classes, target, "synset")
    assert report.mapped == 2 and report.fresh == ["n04399382"]
    assert torch.equal(state["pred.weight"][0], source.pred.weight[2]) and torch.equal(
        state["pred.weight"][2], source.pred.weight[0]
    )
    assert torch.equal(state["pred.bias"][0], source.pred.bias[2])
    # the row with no source is ConvNeXt's fresh head row: trunc-normal(0.02) x head_init_scale, bias 0
    assert torch.equal(state["pred.weight"][1], fresh[1] * HEAD_INIT_SCALE) and state["pred.bias"][1] == 0
    timm.create_model("conv2former_demo", num_classes=3).load_state_dict(state, strict=True)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    report = transfer_head(state, src_classes, target_classes, target, "reinit")
    assert report.mode == "reinit" and torch.equal(state["pred.weight"], fresh * HEAD_INIT_SCALE)
    assert torch.equal(state["pred.bias"], torch.zeros(3))
    state = {k: v.clone() for k, v in source.state_dict().items()}
    transfer_head(state, src_classes, target_classes, target, "synset", init_scale=1.0)
    assert torch.equal(state["pred.weight"][1], fresh[1])
    with pytest.raises(UserError, match="head_init_scale"):
        transfer_head(dict(source.state_dict()), src_classes, target_classes, target, "synset", init_scale=-1.0)
    with pytest.raises(UserError, match="share no synset"):
        transfer_head(
            dict(source.state_dict()), src_classes, ["n09999999"], timm.create_model("conv2former_demo", num_classes=1)
        )
    with pytest.raises(UserError, match="no class list"):
        transfer_head(dict(source.state_dict()), None, target_classes, target)


def test_22k_order_is_assumed_for_official_22k_heads():
    in1k, in22k = canonical_synsets("imagenet1k"), canonical_synsets("imagenet22k")
    assert "n04399382" in in1k and "n04399382" not in in22k
    source = {
        "pred.weight": torch.arange(21841, dtype=torch.float32).view(-1, 1).repeat(1, 1280),
        "pred.bias": torch.arange(21841, dtype=torch.float32),
    }
    target = timm.create_model("conv2former_demo", num_classes=1000)
    report = transfer_head(source, None, list(in1k), target, "synset")
    assert report.mapped == 999 and report.fresh == ["n04399382"]
    index = {s: i for i, s in enumerate(in22k)}
    for i in (0, 500, 999):
        assert source["pred.bias"][i].item() == index[in1k[i]]


@pytest.mark.slow
def test_official_format_pth_loads_for_every_variant(tmp_path):
    classes = list(canonical_synsets("imagenet1k"))[:10]
    for variant in [
        "conv2former_n",
        "conv2former_t",
        "conv2former_s",
        "conv2former_b",
        "conv2former_b_22k",
        "conv2former_l",
    ]:
        num = 21841 if variant in ("conv2former_b_22k", "conv2former_l") else 1000
        source = timm.create_model(variant, num_classes=num)
        path = tmp_path / f"{variant}.pth"
        torch.save({"model": source.state_dict(), "epoch": 89}, path)  # the official release's layout
        weights = read_weights(str(path))
        same = timm.create_model(variant, num_classes=num)
        check_compatible(same, weights.state_dict, str(path))
        same.load_state_dict(weights.state_dict, strict=True)
        target = timm.create_model(variant, num_classes=len(classes))
        state = dict(weights.state_dict)
        report = transfer_head(state, weights.classes, classes, target, "synset")
        assert report.mapped == len(classes)
        target.load_state_dict(state, strict=True)
        order = canonical_synsets("imagenet22k" if num == 21841 else "imagenet1k")
        assert torch.equal(target.pred.weight[0], source.pred.weight[order.index(classes[0])])
        path.unlink()
        del source, same, target, weights, state


@pytest.fixture(scope="module")
def demo_small(demo_root, tmp_path_factory):
    """``launch/demo.py --size small`` once: pretrain on demo-22k (3 epochs, 32 px), fine-tune on demo-1k at 32 px
    (the 224 recipe) and at 48 px (the 384 recipe), both from the pretrained export (the paper's chain), evaluate,
    ERF and Grad-CAM, the report. Returns (runs folder, the demo.py process)."""
    runs = tmp_path_factory.mktemp("demo-small") / "runs"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "demo.py"), "--size", "small", "--out", str(runs), "--data",
         str(demo_root)],
        env=stage_env(), capture_output=True, text=True, errors="replace", timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return runs


def last_eval(run) -> dict:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"eval"' in line][-1]


@pytest.mark.slow
def test_finetune_chain_transfers_the_head_and_evaluates_through_the_commands(demo_small, demo_in1k, tmp_path):
    """On the demo's pretrain -> fine-tune 32 px and 48 px chain: the head transfer by synset (--max-steps 0 exports
    the transferred model), both fine-tunes well above chance, the 384 recipe's squash crop, the best evaluation
    kept (export/best/, evaluation.json, the eval/best_* scalars), and evaluate.py on 1 and 2 ranks (and timm alone,
    from the export folder) giving the engine's own top-1."""
    IN1K = demo_in1k  # noqa: N806
    pre, ft1, ft2 = demo_small / "pretrain", demo_small / "finetune_32", demo_small / "finetune_48"
    mapped = launch(
        FINETUNE,
        "--variant",
        "demo",
        "--pretrained",
        str(pre),
        "--data",
        IN1K,
        "--resolution",
        "32",
        "--output",
        str(tmp_path / "mapped"),
        "--max-steps",
        "0",
        ranks=1,
    )
    head = summary_of(mapped)["initialized_from"]["head"]
    assert (head["mode"], head["mapped"], head["fresh"], head["total"]) == ("synset", 10, [], 10)
    pre_w, pre_classes = (
        load_file(pre / "export" / "model.safetensors"),
        (pre / "export" / "classes.txt").read_text().split(),
    )
    new_w, new_classes = (
        load_file(tmp_path / "mapped" / "export" / "model.safetensors"),
        (tmp_path / "mapped" / "export" / "classes.txt").read_text().split(),
    )
    for i, synset in enumerate(new_classes):
        assert torch.equal(new_w["pred.weight"][i], pre_w["pred.weight"][pre_classes.index(synset)])
    assert all(torch.equal(new_w[k], pre_w[k]) for k in pre_w if not k.startswith("pred."))
    assert last_eval(ft1)["top1"] > 0.3 and last_eval(ft2)["top1"] > 0.3  # chance is 0.1
    report = (demo_small / "report.md").read_text()
    for res in (32, 48):  # both fine-tunes start from the pretraining run
        assert re.search(rf"launch/finetune.py .*--pretrained \S*/pretrain .*--resolution {res} ", report), res
    for ft in (ft1, ft2):
        evals = [json.loads(line) for line in (ft / "log.jsonl").read_text().splitlines() if '"eval"' in line]
        running = [max(e["top1"] for e in evals[: i + 1]) for i in range(len(evals))]
        assert [e["best_top1"] for e in evals] == running and len(evals) == 2  # epochs 2 and 3
        best = next(e for e in evals if e["top1"] == running[-1])
        record = json.loads((ft / "export" / "best" / "evaluation.json").read_text())
        assert record["best"]["top1"] == best["top1"] and record["best"]["step"] == best["step"]
        assert record["best"]["epoch"] == best["epoch"] == evals[-1]["best_epoch"]
        assert json.loads((ft / "export" / "evaluation.json").read_text())["last"]["top1"] == evals[-1]["top1"]
        if best is not evals[-1]:  # the best weights are not the last ones
            assert not torch.equal(
                load_file(ft / "export" / "best" / "model.safetensors")["pred.weight"],
                load_file(ft / "export" / "model.safetensors")["pred.weight"],
            )
    # the kept weights are the ones that scored it: evaluate.py on export/best gives the best top-1
    out = tmp_path / "eval_best.json"
    launch(EVALUATE, "--variant", "demo", "--weights", str(ft1 / "export" / "best"), "--data", IN1K, "--resolution",
           "32", "--json", str(out), ranks=1)  # fmt: skip
    best1 = json.loads((ft1 / "export" / "best" / "evaluation.json").read_text())["best"]
    assert json.loads(out.read_text())["top1"] == pytest.approx(best1["top1"], abs=1e-9)
    second = {"eval": last_eval(ft2)}
    config = (ft2 / "export" / "config.yaml").read_text()
    assert "crop_mode: squash" in config and "crop_pct: 1.0" in config
    # evaluate: 2 ranks equal 1 rank equal the engine's own evaluation
    results = []
    for ranks in (1, 2):
        out = tmp_path / f"eval{ranks}.json"
        launch(
            EVALUATE,
            "--variant",
            "demo",
            "--weights",
            str(ft2 / "export"),
            "--data",
            IN1K,
            "--resolution",
            "48",
            "--crop-pct",
            "1.0",
            "--crop-mode",
            "squash",
            "--batch",
            "32",
            "--json",
            str(out),
            "--per-class",
            str(tmp_path / f"pc{ranks}.txt"),
            ranks=ranks,
        )
        results.append(json.loads(out.read_text()))
    assert results[0]["num_samples"] == results[1]["num_samples"] == 300
    assert results[0]["top1"] == results[1]["top1"] == pytest.approx(second["eval"]["top1"], abs=1e-9)
    assert results[0]["top5"] == results[1]["top5"]
    lines = (tmp_path / "pc1.txt").read_text().splitlines()
    assert len(lines) == 10 and sum(int(line.split()[2]) for line in lines) == 300
    # timm alone reproduces it from the export folder: local-dir:, the transform its config.json resolves, PIL
    # decoding (evaluate.py's torch backend decodes with PIL too; DALI's decoder rounds differently)
    out = tmp_path / "eval_torch.json"
    launch(
        EVALUATE,
        "--variant",
        "demo",
        "--weights",
        f"local-dir:{ft2 / 'export'}",
        "--data",
        IN1K,
        "--resolution",
        "48",
        "--crop-pct",
        "1.0",
        "--crop-mode",
        "squash",
        "--backend",
        "torch",
        "--json",
        str(out),
        ranks=1,
    )
    assert timm_top1(str(ft2 / "export"), IN1K) == json.loads(out.read_text())["top1"]


@pytest.mark.slow
def test_best_weights_written_after_a_stop_between_checkpoint_and_export(demo_small, demo_in1k, tmp_path):
    """A run stopped after the checkpoint that followed a new best but before export/best/ was written (simulated:
    export/best/ removed) writes it from that checkpoint when it resumes; the best record survives the resume."""
    out = tmp_path / "ft"
    args = [
        "--variant",
        "demo",
        "--pretrained",
        str(demo_small / "pretrain"),
        "--data",
        demo_in1k,
        "--resolution",
        "32",
        "--epochs",
        "3",
        "--max-steps",
        "15",
        "--set",
        "schedule.eval_every_epochs=1",
        "--output",
        str(out),
    ]
    first = summary_of(launch(FINETUNE, *args))
    assert first["step"] == 15 and first["best_eval"]["step"] == 15 and first["best_eval"]["epoch"] == 1
    best_dir = out / "export" / "best"
    kept = load_file(best_dir / "model.safetensors")
    assert all(torch.equal(kept[k], v) for k, v in load_file(out / "export" / "model.safetensors").items())
    import shutil

    shutil.rmtree(best_dir)
    again = summary_of(launch(FINETUNE, *args))
    assert again["best_eval"] == first["best_eval"]  # kept in the checkpoint
    record = json.loads((best_dir / "evaluation.json").read_text())
    assert record["best"]["step"] == 15 and record["best"]["top1"] == first["best_eval"]["top1"]
    rewritten = load_file(best_dir / "model.safetensors")
    assert rewritten.keys() == kept.keys() and all(torch.equal(rewritten[k], kept[k]) for k in kept)


def test_mismatches_are_one_line_errors(demo_in1k, tmp_path, capsys):
    IN1K = demo_in1k  # noqa: N806
    from launch.evaluate import main as evaluate_main
    from launch.finetune import main as finetune_main

    model = timm.create_model("conv2former_demo", num_classes=40)
    export = tmp_path / "export"
    export.mkdir()
    from safetensors.torch import save_file

    save_file(model.state_dict(), export / "model.safetensors")
    (export / "classes.txt").write_text("".join(f"n{i:08d}\n" for i in range(40)))

    def error(fn, *argv) -> str:
        with pytest.raises(SystemExit) as e:
            fn(list(argv))
        assert e.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert "are not the data's 10" in error(
        evaluate_main, "--variant", "demo", "--weights", str(export), "--data", IN1K
    )
    assert "pick the matching --variant" in error(
        finetune_main,
        "--variant",
        "n",
        "--pretrained",
        str(export),
        "--data",
        IN1K,
        "--output",
        str(tmp_path / "o"),
        "--head",
        "reinit",
    )
    msg = error(
        finetune_main,
        "--variant",
        "demo",
        "--pretrained",
        str(export),
        "--data",
        IN1K,
        "--output",
        str(tmp_path / "o"),
        "--max-steps",
        "0",
    )
    assert "share no synset" in msg and "--head reinit" in msg
    assert "weights not found" in error(
        finetune_main,
        "--variant",
        "demo",
        "--pretrained",
        str(tmp_path / "nope"),
        "--data",
        IN1K,
        "--output",
        str(tmp_path / "o"),
    )


@pytest.mark.slow
def test_demo_pipeline_small_writes_the_report(demo_small, demo_root):
    runs = demo_small
    names = ("report.md", "report.png", "summary.json", "eval_32.json", "eval_48.json", "gradcam.png", "gradcam.json")
    for name in (*names, "erf_init/erf.json", "erf_init/erf.png", "erf_pretrained/erf.json"):
        assert (runs / name).exists(), name
    summary = json.loads((runs / "summary.json").read_text())["stages"]
    assert list(summary) == ["pretrain", "finetune_32", "finetune_48"]
    assert summary["pretrain"]["num_classes"] == 40 and summary["pretrain"]["chance"] == pytest.approx(1 / 40)
    assert summary["pretrain"]["top1"] > 2 * summary["pretrain"]["chance"]
    for name in ("finetune_32", "finetune_48"):
        assert summary[name]["num_classes"] == 10 and summary[name]["top1"] > 0.25  # chance 0.10
    report = (runs / "report.md").read_text()
    assert "launch/pretrain.py" in report and "launch/finetune.py" in report and "tensorboard --logdir" in report
    assert report.count("| finetune_") == 2
    # the paper's analyses: ERF at initialisation and after pretraining; Grad-CAM on held-out images whose shape
    # masks are known: more heat per pixel on the drawn shape than on the background on most images
    assert "## Effective receptive fields" in report and "## Grad-CAM" in report and "What to see" in report
    erf = json.loads((runs / "erf_pretrained" / "erf.json").read_text())["models"]["conv2former_demo"]
    sides = [erf["stages"][s]["side_mean"] for s in ("1", "2", "3", "4")]
    assert sides == sorted(sides) and erf["weights"] and erf["images"] == 8
    cam = json.loads((runs / "gradcam.json").read_text())
    assert cam["layer"] == "stages.3" and len(cam["images"]) == 8
    assert sum(r["heat_ratio"] > 1 for r in cam["images"]) >= 5, cam["images"]  # most (the full demo: 8 of 8)
    # a rerun reuses the finished runs instead of training again
    again = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "demo.py"),
            "--size",
            "small",
            "--out",
            str(runs),
            "--data",
            str(demo_root),
        ],
        env=stage_env(),
        capture_output=True,
        text=True,
        errors="replace",
        timeout=600,
    )
    assert again.returncode == 0 and "# reused" in (runs / "report.md").read_text()
    # every stage with a result was reused (pretrain, 2 ERFs, 2 fine-tunes, 2 evaluations, Grad-CAM): only the shards'
    # check and the report ran again
    commands = (runs / COMMANDS).read_text().splitlines()
    assert sum(line.startswith("# reused ") for line in commands) == 8, commands
    assert [line for line in commands if not line.startswith("#")][-1].endswith("--finetunes 32 48"), commands
