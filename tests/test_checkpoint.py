"""The checkpoint manager on a real (tiny) DeepSpeed engine, one gloo rank, in seconds: tags, the `complete` marker,
`latest`, keep_last, and the fallback past an incomplete or unreadable newest checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conv2former.engine.checkpoint import COMPLETE, list_tags, newest_complete, tag_for

REPO = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, sys, warnings
import deepspeed, torch
from conv2former.engine import checkpoint as ckpt
from conv2former.engine.distributed import single_process_env

mode, ckpt_dir = sys.argv[1], sys.argv[2]
single_process_env()
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
config = {"train_batch_size": 1, "zero_optimization": {"stage": 1}, "steps_per_print": 10 ** 9}
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1), config=config)
if mode == "save":
    for step in range(1, 5):
        engine.backward(engine(torch.ones(1, 4)).sum())
        engine.step()
        ckpt.save(engine, ckpt_dir, step, {"step": step, "weight": engine.module.weight.detach().clone()}, keep_last=2)
else:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = ckpt.resume(engine, ckpt_dir)
    print(json.dumps({"step": state["step"], "tag": state["tag"],
                      "weights_match": bool(torch.equal(state["weight"], engine.module.weight.detach())),
                      "warnings": [str(w.message) for w in caught if "checkpoint" in str(w.message)]}))
"""


def worker(mode: str, ckpt_dir: Path) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, mode, str(ckpt_dir)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def test_save_keeps_the_newest_complete_tags_and_resume_falls_back(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    worker("save", ckpt_dir)
    assert list_tags(str(ckpt_dir)) == [tag_for(3), tag_for(4)]  # keep_last=2 removed steps 1 and 2
    assert (ckpt_dir / "latest").read_text() == tag_for(4)
    assert json.loads((ckpt_dir / tag_for(4) / COMPLETE).read_text()) == {"step": 4, "world_size": 1}
    assert newest_complete(str(ckpt_dir))["tag"] == tag_for(4)
    resumed = worker("resume", ckpt_dir)
    assert resumed["step"] == 4 and resumed["weights_match"] and resumed["warnings"] == []
    # a newest checkpoint whose ranks did not all finish (no marker) is skipped with a warning
    (ckpt_dir / tag_for(4) / COMPLETE).unlink()
    assert newest_complete(str(ckpt_dir))["tag"] == tag_for(3)
    resumed = worker("resume", ckpt_dir)
    assert resumed["step"] == 3 and resumed["weights_match"]
    assert any("is incomplete" in w for w in resumed["warnings"])
    # a marked but unreadable newest checkpoint (a truncated file) is skipped too
    (ckpt_dir / tag_for(4) / COMPLETE).write_text(json.dumps({"step": 4, "world_size": 1}))
    states = next(p for p in (ckpt_dir / tag_for(4)).iterdir() if p.name.endswith("model_states.pt"))
    states.write_bytes(states.read_bytes()[:100])
    resumed = worker("resume", ckpt_dir)
    assert resumed["step"] == 3 and resumed["weights_match"]
    assert any("could not be loaded" in w for w in resumed["warnings"])
