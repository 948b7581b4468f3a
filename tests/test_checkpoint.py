"""The checkpoint manager on a real (tiny) DeepSpeed engine, one gloo rank, in one process: tags, the `complete`
marker, `latest`, keep_last, and the fallback past an incomplete or unreadable newest checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conv2former.engine.checkpoint_layout import COMPLETE, tag_for
from conv2former.engine.distributed import python_path

REPO = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, os, sys, warnings
import deepspeed, torch
from conv2former.engine.checkpoint import CheckpointManager
from conv2former.engine.checkpoint_layout import COMPLETE, list_tags, newest_complete, tag_for
from conv2former.engine.distributed import single_process_env
from conv2former.engine.state import CheckpointState


class Step:  # the one component: the step a checkpoint was saved at
    step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]

ckpt_dir = sys.argv[1]
single_process_env()
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
config = {"train_batch_size": 1, "zero_optimization": {"stage": 1}, "steps_per_print": 10 ** 9}
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1), config=config)
manager = CheckpointManager(ckpt_dir, keep_last=2, rank=0, world_size=1)
progress = Step()
state = CheckpointState(rank=0, world_size=1)
state.register(None, progress, required=True)
saved = {}
for step in range(1, 5):
    engine.backward(engine(torch.ones(1, 4)).sum())
    engine.step()
    progress.step = step
    manager.save(engine, step, state)
    saved[step] = engine.module.weight.detach().clone()


def resume():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        progress.step = None
        CheckpointManager(ckpt_dir, keep_last=2, rank=0, world_size=1).load(engine, state)
    return {"step": progress.step, "weights_match": bool(torch.equal(saved[progress.step], engine.module.weight)),
            "newest": newest_complete(ckpt_dir)["tag"],
            "warnings": [str(w.message) for w in caught if "checkpoint" in str(w.message)]}


out = {"tags": list_tags(ckpt_dir), "latest": open(os.path.join(ckpt_dir, "latest")).read(),
       "marker": json.load(open(os.path.join(ckpt_dir, tag_for(4), COMPLETE)))}
with torch.no_grad():
    engine.module.weight.zero_()  # so a resume must really load
out["intact"] = resume()
os.remove(os.path.join(ckpt_dir, tag_for(4), COMPLETE))  # the newest tag's ranks did not all finish
out["incomplete"] = resume()
with open(os.path.join(ckpt_dir, tag_for(4), COMPLETE), "w") as f:  # marked, but a file is truncated
    json.dump({"step": 4, "world_size": 1}, f)
states = next(os.path.join(ckpt_dir, tag_for(4), n) for n in os.listdir(os.path.join(ckpt_dir, tag_for(4)))
              if n.endswith("model_states.pt"))
data = open(states, "rb").read()
open(states, "wb").write(data[:100])
out["unreadable"] = resume()
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_save_keeps_the_newest_complete_tags_and_resume_falls_back(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=python_path(str(REPO)))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, str(tmp_path / "checkpoints")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT ") :])
    assert out["tags"] == [tag_for(3), tag_for(4)]  # keep_last=2 removed steps 1 and 2
    assert out["latest"] == tag_for(4) and out["marker"] == {"step": 4, "world_size": 1}
    assert out["intact"] == {"step": 4, "weights_match": True, "newest": tag_for(4), "warnings": []}
    incomplete = out["incomplete"]
    assert incomplete["step"] == 3 and incomplete["weights_match"] and incomplete["newest"] == tag_for(3)
    assert any("is incomplete" in w for w in incomplete["warnings"])
    unreadable = out["unreadable"]
    assert unreadable["step"] == 3 and unreadable["weights_match"]
    assert any("could not be loaded" in w for w in unreadable["warnings"])
    assert (tmp_path / "checkpoints" / tag_for(4) / COMPLETE).exists()  # nothing good was deleted by the fallback
