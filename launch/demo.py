#!/usr/bin/env python
"""The whole pipeline on the built-in demo dataset, on CPU, with a report: ``python launch/demo.py`` (``make demo``).

The demo is a list of stages (``plan``), each a real command, printed and recorded in RUN/commands.sh so that any of
them can be replayed:

  data_prep/shard.py demo                     the demo "22k" and "1k" shards (reused when present)
  deepspeed launch/pretrain.py                2 CPU ranks, ZeRO-1, EMA, checkpoints, TensorBoard
  python -m conv2former.analysis erf  x 2     effective receptive fields at initialisation and after pretraining
  deepspeed launch/finetune.py  x 2           head transfer by synset, layer decay, a "224" and a "384" stand-in,
                                              both from the pretraining export (the paper's chain)
  launch/evaluate.py            x 2           top-1 / top-5 of both fine-tunes' best-evaluated weights
  launch/demo_report.py gradcam / render      Grad-CAM on held-out images; RUN/report.md, report.png, summary.json

A rerun reuses finished work (shards; runs whose export exists, analyses and evaluations whose result file exists)
as long as nothing before it had to run again (a stage that ran makes every later one run); the report is always
rendered; ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from conv2former.checkout import checkout_first

REPO = checkout_first(__file__)  # launch and data_prep run from the checkout

from conv2former.data.eval_crop import eval_crop  # noqa: E402
from conv2former.engine.distributed import deepspeed_command, free_port, python_path  # noqa: E402
from launch.demo_report import COMMANDS, ERF_PX  # noqa: E402

CAM_PX = 96  # Grad-CAM input side: the last stage is then a 3 x 3 map
SIZES = {
    # pretrain epochs, pretrain px, fine-tune epochs, (low px, high px); both fine-tunes start from the pretraining
    "full": dict(pre_epochs=10, pre_px=64, ft_epochs=6, low=64, high=96, hi_epochs=6),
    "small": dict(pre_epochs=3, pre_px=32, ft_epochs=3, low=32, high=48, hi_epochs=3),
}


@dataclass
class Stage:
    title: str
    command: List[str]
    done: Optional[Path] = None  # when this file exists (and no earlier stage ran), the earlier result is reused


PORT_AT_START = 0  # a deepspeed stage's rendezvous port: a free one is picked when the stage starts (run)


def deepspeed(script: str, *args: str) -> List[str]:
    return deepspeed_command(script, *args, port=PORT_AT_START)


def plan(size_name: str, data: Path, out: Path) -> List[Stage]:
    """The demo's stages, in order."""
    size, py, pre = SIZES[size_name], sys.executable, out / "pretrain"
    finetunes = ((size["low"], "224", size["ft_epochs"]), (size["high"], "384", size["hi_epochs"]))
    stages = [
        Stage("demo dataset and shards", [py, "data_prep/shard.py", "demo", "--out", str(data)]),
        Stage(
            "pretrain on demo-22k (2 CPU ranks, ZeRO-1, EMA)",
            deepspeed("launch/pretrain.py", "--variant", "demo", "--data", str(data / "in22k"), "--output", str(pre),
                      "--epochs", str(size["pre_epochs"]), "--image-size", str(size["pre_px"])),
            pre / "export" / "model.safetensors",
        ),
    ]  # fmt: skip
    for tag, weights in (("init", []), ("pretrained", ["--weights", str(pre / "export")])):
        stages.append(Stage(
            f"effective receptive fields of the demo model, {tag}",
            [py, "-m", "conv2former.analysis", "erf", "--model", "conv2former_demo", *weights, "--data",
             str(data / "in22k"), "--images", "8", "--resolution", str(ERF_PX), "--out", str(out / f"erf_{tag}")],
            out / f"erf_{tag}" / "erf.json",
        ))  # fmt: skip
    for res, recipe, epochs in finetunes:
        ft = out / f"finetune_{res}"
        crop_pct, crop_mode = eval_crop(recipe)  # the recipe's crop: the stand-in sizes are not 224/384
        stages += [
            Stage(
                f"fine-tune on demo-1k at {res} px (the {recipe} recipe)",
                deepspeed("launch/finetune.py", "--variant", "demo", "--pretrained", str(pre), "--data",
                          str(data / "in1k"), "--resolution", str(res), "--recipe", recipe, "--epochs", str(epochs),
                          "--output", str(ft)),
                ft / "export" / "model.safetensors",
            ),
            Stage(
                f"evaluate the {res} px fine-tune",
                [py, "launch/evaluate.py", "--variant", "demo", "--weights", str(ft / "export" / "best"), "--data",
                 str(data / "in1k"), "--resolution", str(res), "--crop-pct", str(crop_pct), "--crop-mode", crop_mode,
                 "--json", str(out / f"eval_{res}.json"), "--per-class", str(out / f"eval_{res}_per_class.txt")],
                out / f"eval_{res}.json",
            ),
        ]  # fmt: skip
    last = out / f"finetune_{size['high']}" / "export" / "best"
    report = [py, "launch/demo_report.py"]
    stages += [
        Stage("Grad-CAM of the last fine-tune on held-out images",
              [*report, "gradcam", "--export", str(last), "--out", str(out), "--resolution", str(CAM_PX)],
              out / "gradcam.json"),
        Stage("report", [*report, "render", "--out", str(out), "--finetunes", *(str(res) for res, _, _ in finetunes)]),
    ]  # fmt: skip
    return stages


def run(stage: Stage, number: str, log: Path, commands: Path) -> None:
    """Run one stage's command (its output appended to ``log``; the report stage's shown too), recorded first."""
    if "--master_port" in stage.command:  # the port is chosen now, not when the plan was made minutes ago
        at = stage.command.index("--master_port") + 1
        stage.command[at] = str(free_port())
    printable = "OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu " + " ".join(shlex.quote(c) for c in stage.command)
    with open(commands, "a") as f:
        f.write(printable + "\n")
    print(f"\n==> {number} {stage.title}\n    {printable}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=python_path(str(REPO)),
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")  # fmt: skip
    shown = stage.title == "report"
    with open(log, "a") as f:
        proc = subprocess.run(stage.command, cwd=REPO, env=env, stdout=None if shown else f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"stage failed ({stage.title}); last lines of {log}:\n{log.read_text()[-2500:]}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="where the runs and the report go")
    parser.add_argument("--data", default="data/demo", help="where the demo shards go")
    parser.add_argument("--size", choices=list(SIZES), default="full", help="small: the quick variant the tests run")
    parser.add_argument("--fresh", action="store_true", help="delete earlier demo data and runs first")
    args = parser.parse_args(argv)
    out, data = (REPO / args.out).resolve(), (REPO / args.data).resolve()
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    commands = out / COMMANDS
    commands.write_text("")
    start = time.time()
    stages = plan(args.size, data, out)
    upstream_ran = False  # a stage with a result file that ran: every later result is made again
    for i, stage in enumerate(stages, 1):
        if stage.done is not None and stage.done.exists() and not upstream_ran:
            with open(commands, "a") as f:
                f.write(f"# reused {stage.done}\n")
            print(f"\n==> {i}/{len(stages)} {stage.title}: reused {stage.done}", flush=True)
            continue
        upstream_ran = upstream_ran or stage.done is not None
        run(stage, f"{i}/{len(stages)}", out / "demo.log", commands)
    print(
        f"    report: {out / 'report.md'} and report.png; TensorBoard: tensorboard --logdir {out}; "
        f"{time.time() - start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
