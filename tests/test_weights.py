"""Reading weights from every accepted source, safely, with one-line errors for user mistakes."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import conv2former  # noqa: F401
from conv2former.errors import UserError
from conv2former.weights import load_checkpoint, read_weights


@pytest.fixture(scope="module")
def demo_model():
    torch.manual_seed(0)
    return timm.create_model("conv2former_demo", num_classes=10).eval()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("wrap", ["raw", "model", "state_dict", "module", "ddp_prefix"])
def test_official_pth_layouts_load_strictly(tmp_path, demo_model, wrap):
    sd = demo_model.state_dict()
    obj = {
        "raw": sd,
        "model": {"model": sd, "epoch": 299},
        "state_dict": {"state_dict": sd},
        "module": {"module": sd},
        "ddp_prefix": {"model": {f"module.{k}": v for k, v in sd.items()}},
    }[wrap]
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    fresh = timm.create_model("conv2former_demo", num_classes=10)
    load_checkpoint(fresh, str(path))
    assert same_weights(fresh, demo_model)


def test_safetensors_export_with_class_list(tmp_path, demo_model):
    export = tmp_path / "export"
    export.mkdir()
    save_file({k: v.contiguous() for k, v in demo_model.state_dict().items()}, export / "model.safetensors")
    (export / "classes.txt").write_text("".join(f"n{i:08d}\n" for i in range(10)))
    for path in (export / "model.safetensors", export, tmp_path):  # the file, its dir, or a run dir holding export/
        fresh = timm.create_model("conv2former_demo", num_classes=10)
        weights = load_checkpoint(fresh, str(path))
        assert same_weights(fresh, demo_model)
        assert weights.classes == [f"n{i:08d}" for i in range(10)]


def test_fsspec_memory_url(demo_model):
    import fsspec

    with fsspec.open("memory://bucket/w/model.pth", "wb") as f:
        torch.save(demo_model.state_dict(), f)
    fresh = timm.create_model("conv2former_demo", num_classes=10)
    load_checkpoint(fresh, "memory://bucket/w/model.pth")
    assert same_weights(fresh, demo_model)


def test_same_outputs_after_round_trip(tmp_path, demo_model):
    path = tmp_path / "m.pth"
    torch.save(demo_model.state_dict(), path)
    fresh = timm.create_model("conv2former_demo", num_classes=10).eval()
    load_checkpoint(fresh, str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), demo_model(x))


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": Payload()}, f)
    with pytest.raises(UserError, match=r"weights_only=True"):
        read_weights(str(path))


def test_user_mistakes_are_one_line_errors(tmp_path, demo_model):
    def one_line(excinfo):
        assert "\n" not in str(excinfo.value)
        return str(excinfo.value)

    with pytest.raises(UserError) as e:
        read_weights(str(tmp_path / "nope.pth"))
    assert "weights not found" in one_line(e)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError) as e:
        read_weights(str(garbage))
    assert "cannot read" in one_line(e)

    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "no_model.pth")
    with pytest.raises(UserError) as e:
        read_weights(str(tmp_path / "no_model.pth"))
    assert "no model state_dict" in one_line(e)

    path = tmp_path / "m.pth"
    torch.save(demo_model.state_dict(), path)
    with pytest.raises(UserError) as e:
        load_checkpoint(timm.create_model("conv2former_demo", num_classes=1000), str(path))
    assert one_line(e).endswith("has 10 classes, model has 1000: pass num_classes=10 or use finetune's head transfer")

    with pytest.raises(UserError) as e:
        load_checkpoint(timm.create_model("conv2former_n", num_classes=10), str(path))
    msg = one_line(e)
    assert "checkpoint is dims 16,32,64,128, depths 1,1,2,1, kernel 7, 10 classes" in msg
    assert "model is dims 64,128,256,512, depths 2,2,8,2" in msg and "--variant" in msg

    with pytest.raises(UserError) as e:
        load_checkpoint(timm.create_model("conv2former_demo", num_classes=10, kernel_size=11), str(path))
    assert "pass kernel_size=7" in one_line(e)

    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError) as e:
        read_weights(str(tmp_path / "empty_dir"))
    assert "without model.safetensors" in one_line(e)


DEEPSPEED_SAVE = textwrap.dedent("""
    import os, sys, torch, timm, deepspeed, conv2former
    root, port = sys.argv[1], sys.argv[2]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    for stage in (0, 2, 3):  # one process, one engine per stage
        out = os.path.join(root, f"stage{stage}", "checkpoints")
        torch.manual_seed(0)
        model = timm.create_model("conv2former_demo", num_classes=10)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt,
                                          config={"train_batch_size": 2, "zero_optimization": {"stage": stage}})
        loss = engine(torch.randn(2, 3, 64, 64)).sum()
        engine.backward(loss)
        engine.step()
        engine.save_checkpoint(out, client_state={"classes": [f"c{i}" for i in range(10)]})
        if stage == 3:
            params = [p for p in engine.module.parameters()]
            with deepspeed.zero.GatheredParameters(params):
                sd = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        else:
            sd = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        torch.save(sd, os.path.join(out, "expected.pt"))
""")


@pytest.fixture(scope="module")
def deepspeed_checkpoints(tmp_path_factory) -> Path:
    """Real DeepSpeed checkpoint folders of the demo model at ZeRO 0, 2 and 3 (``stage{N}/checkpoints``)."""
    root = tmp_path_factory.mktemp("deepspeed")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", DEEPSPEED_SAVE, str(root), "29600"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.mark.parametrize("stage", [0, 2, 3])
@pytest.mark.slow
def test_deepspeed_checkpoint_dirs(deepspeed_checkpoints, stage):
    tmp_path = deepspeed_checkpoints / f"stage{stage}"
    out = tmp_path / "checkpoints"
    expected = torch.load(out / "expected.pt", weights_only=True)
    tag_dirs = [p for p in out.iterdir() if p.name.startswith("global_step")]
    for path in (out, tmp_path, tag_dirs[0]):  # the checkpoints dir, the run dir, one tag
        model = timm.create_model("conv2former_demo", num_classes=10)
        weights = load_checkpoint(model, str(path))
        assert weights.classes == [f"c{i}" for i in range(10)]
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, expected[key].to(value.dtype), msg=key)
