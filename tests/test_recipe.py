"""The recipe card of docs/training.md is a test: every cell of the L pretraining, L 224 and L 384 fine-tuning columns
equals what the launchers resolve, and ours equals ConvNeXt-L's published value in every row not marked differs."""

from __future__ import annotations

import re
from typing import Any, Dict, List

import pytest
import yaml
from test_pretrain import REPO

from launch import finetune, pretrain

CARD = REPO / "docs" / "training.md"
STAGES = ("L 22k", "L 224", "L 384")
PEERS = {"L 22k": "ConvNeXt-L 22k", "L 224": "ConvNeXt-L 224", "L 384": "ConvNeXt-L 384"}
COMMON = ["--variant", "l", "--data", "s3://bucket/in"]


def table_after(heading: str, first_column: str) -> List[Dict[str, str]]:
    """The rows of the first markdown table after ``heading`` whose header starts with ``first_column``."""
    text = CARD.read_text()
    section = text[text.index(heading) :]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, [c.strip() for c in line.strip("|").split("|")])))
    return rows


def resolved() -> Dict[str, Any]:
    return {
        "L 22k": pretrain.configure(COMMON)[1],
        "L 224": finetune.configure([*COMMON, "--pretrained", "runs/l22k", "--resolution", "224"])[1],
        "L 384": finetune.configure([*COMMON, "--pretrained", "runs/l22k", "--resolution", "384"])[1],
    }


def value_of(cfg, key: str) -> Any:
    if key == "lr":
        return cfg.optim.base_lr * cfg.schedule.global_batch / 1024
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return list(value) if isinstance(value, tuple) else value


def same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool) or isinstance(a, str) or isinstance(b, str) or a is None:
        return a == b
    return b is not None and a == pytest.approx(b, rel=1e-3)


CARD_ROWS = table_after("## The recipe card", "hyperparameter")


def test_the_card_has_every_row_we_promise():
    keys = [row["key"].strip("`") for row in CARD_ROWS]
    assert len(keys) == len(set(keys)) >= 30
    for needed in ("lr", "optim.layer_decay", "finetune.head_init_scale", "model.drop_path_rate", "data.crop_mode"):
        assert needed in keys


@pytest.mark.parametrize("row", CARD_ROWS, ids=[r["key"].strip("`") for r in CARD_ROWS])
def test_every_cell_is_what_the_launchers_resolve(row):
    key = row["key"].strip("`")
    if key == "pretrained":  # the chain, not a config key: both fine-tunes start from the 22k export
        script = (REPO / "launch" / "submit_pipeline.sh").read_text()
        assert "HIGH_FROM=${HIGH_FROM:-pretrain}" in script
        return
    configs = resolved()
    for stage in STAGES:
        cell = row[stage]
        if cell == "n/a":
            continue
        ours = value_of(configs[stage], key)
        assert same(ours, yaml.safe_load(cell)), f"{key} for {stage}: the config says {ours!r}, the card {cell!r}"
        peer = row[PEERS[stage]]
        if "**differs**" in row["note"] or peer == "n/a":
            continue
        assert same(ours, yaml.safe_load(peer)), f"{key} for {stage}: ours {ours!r}, ConvNeXt's {peer!r}"


def test_fine_tuning_drop_path_per_variant_and_its_source():
    rows = table_after("Fine-tuning drop path by variant", "variant")
    assert {r["variant"] for r in rows} == {"n", "t", "s", "b", "b_22k", "l"}
    for row in rows:
        argv = ["--variant", row["variant"], "--data", "s3://b/in", "--pretrained", "x", "--resolution", "224"]
        cfg = finetune.configure(argv)[1]
        assert cfg.model.drop_path_rate == pytest.approx(float(row["fine-tune drop path"])), row
        assert ("**unsourced**" in row["source"]) == (row["variant"] in ("n", "t", "s")), row
        assert re.search(r"TRAINING\.md|unsourced", row["source"])
