"""The layout of a run's checkpoints, which its writers and readers share (the checkpoint manager, the remote
output's mirror, the export script, the guard's last-good line): ``OUTPUT/checkpoints/step<9 digits>/`` per tag, a
``complete`` marker (``{"step", "world_size"}``) written once every rank saved its part, and ``latest`` naming the
newest complete tag."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Optional

CHECKPOINTS = "checkpoints"  # the folder under OUTPUT
COMPLETE = "complete"  # written into a tag after every rank has saved its part
LATEST = "latest"  # the newest complete tag's name
TAG = re.compile(r"step\d{9}")


def tag_for(step: int) -> str:
    return f"step{step:09d}"


def is_tag(name: str) -> bool:
    return TAG.fullmatch(name) is not None


def list_tags(ckpt_dir: str) -> List[str]:
    """The tags in a local checkpoint folder, oldest first (complete or not)."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(t for t in os.listdir(ckpt_dir) if is_tag(t))


def complete_tags(ckpt_dir: str) -> List[str]:
    """The tags marked complete, oldest first."""
    return [t for t in list_tags(ckpt_dir) if os.path.exists(os.path.join(ckpt_dir, t, COMPLETE))]


def newest_complete(ckpt_dir: str) -> Optional[Dict[str, Any]]:
    """{"tag", "step", "world_size"} of the newest checkpoint marked complete, or None."""
    for tag in reversed(list_tags(ckpt_dir)):
        marker = os.path.join(ckpt_dir, tag, COMPLETE)
        if os.path.exists(marker):
            with open(marker) as f:
                return {"tag": tag, **json.load(f)}
    return None


def mark_complete(ckpt_dir: str, tag: str, step: int, world_size: int) -> None:
    """``tag`` complete (its marker), then ``latest`` pointing at it (replaced atomically)."""
    with open(os.path.join(ckpt_dir, tag, COMPLETE), "w") as f:
        json.dump({"step": step, "world_size": world_size}, f)
    with open(os.path.join(ckpt_dir, LATEST + ".partial"), "w") as f:
        f.write(tag)
    os.replace(os.path.join(ckpt_dir, LATEST + ".partial"), os.path.join(ckpt_dir, LATEST))
