"""The loaders (dali-cpu and torch) on shards made by data_prep: batches, labels, dealing, resume, eval, bad input."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from conv2former.config import AugmentConfig, DataConfig
from conv2former.data import shard_format as fmt
from conv2former.data.augment import BatchAugment
from conv2former.data.loader import build_loader, resolve_backend
from conv2former.errors import DataFault, UserError
from data_prep.demo import render
from data_prep.shard import main as shard_main

# dali-gpu (``mixed`` decoding) joins every backend-parametrised test where a CUDA GPU is visible:
# `pytest tests/test_loader.py -k dali-gpu` on a GPU host (benchmarks/gpu_checklist.py stage 5 runs it).
BACKENDS = ["dali-cpu", "torch"] + (["dali-gpu"] if torch.cuda.is_available() else [])
NUM = 240  # samples per split, one per class: a label identifies its sample


@pytest.fixture(scope="session")
def unique_shards(tmp_path_factory):
    """240 synsets with one train and one val image each: label == sample identity. 12 shards per split."""
    src = tmp_path_factory.mktemp("unique_src")
    synsets = list(fmt.canonical_synsets("imagenet1k"))[:NUM]
    import random

    for i, synset in enumerate(synsets):
        for split in ("train", "val"):
            folder = src / split / synset
            folder.mkdir(parents=True)
            (folder / f"{synset}_{split}.JPEG").write_bytes(render(i % 40, random.Random(f"{split}{i}")))
    out = tmp_path_factory.mktemp("unique_shards")
    assert (
        shard_main(
            [
                "imagenet1k",
                str(src),
                str(out),
                "--classes",
                "present",
                "--samples-per-shard",
                "20",
                "--workers",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    return out


def cfg_for(root, backend, **kwargs) -> DataConfig:
    base = dict(root=str(root), backend=backend, image_size=32, batch_size=16, workers=2, shuffle_buffer=64)
    base.update(kwargs)
    return DataConfig(**base)


def manifest_labels(root, split):
    info = fmt.read_info(str(root))
    labels = []
    for filename in info["splits"][split]["filenames"]:
        with tarfile.open(os.path.join(root, filename)) as tar:
            labels += [int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls")]
    return labels


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_shapes_dtypes_and_normalization(unique_shards, backend):
    for split in ("train", "val"):
        loader = build_loader(cfg_for(unique_shards, backend), split)
        images, labels = next(iter(loader))
        images, labels = images.cpu(), labels.cpu()  # dali-gpu hands CUDA tensors
        assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32
        assert labels.shape == (16,) and labels.dtype == torch.int64
        pixels = images * torch.tensor(fmt_std()).view(1, 3, 1, 1) + torch.tensor(fmt_mean()).view(1, 3, 1, 1)
        assert pixels.min() >= -0.02 and pixels.max() <= 1.02  # normalized with ImageNet mean/std
        assert 0.3 < images.std() < 2.0 and abs(images.mean()) < 1.5


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.startswith("dali")])
def test_dali_channels_last_batches_are_the_same_pixels_without_a_copy(unique_shards, backend):
    """data.channels_last with DALI: the pipeline writes HWC and the loader hands the NCHW view of it (channels_last
    strides, no copy of the batch); the values equal the CHW pipeline's, train and eval."""
    for split in ("train", "val"):
        nchw, nhwc = (
            next(iter(build_loader(cfg_for(unique_shards, backend, channels_last=last), split)))
            for last in (False, True)
        )
        assert nhwc[0].shape == nchw[0].shape == (16, 3, 32, 32)
        assert nhwc[0].is_contiguous(memory_format=torch.channels_last) and nhwc[0]._base is not None  # a view
        assert torch.equal(nhwc[0], nchw[0]) and torch.equal(nhwc[1], nchw[1])


def fmt_mean():
    return DataConfig().mean


def fmt_std():
    return DataConfig().std


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_labels_match_the_manifest_in_order(unique_shards, backend):
    loader = build_loader(cfg_for(unique_shards, backend), "val")
    labels = torch.cat([y for _, y in loader]).tolist()
    expected = manifest_labels(unique_shards, "val")
    assert [y for y in labels if y >= 0] == expected and len(labels) == len(loader) * 16


def test_dali_and_torch_give_identical_labels(unique_shards):
    seqs = [torch.cat([y for _, y in build_loader(cfg_for(unique_shards, b), "val")]).tolist() for b in BACKENDS]
    assert all(seq == seqs[0] for seq in seqs[1:])


@pytest.mark.slow
def test_every_rank_reads_the_same_samples_on_both_backends(unique_shards):
    """Without the shuffle buffer the two backends deal each rank (of 3: uneven ranges, partly read shards at the
    ends) the same samples in the same order, train (epoch 1's shard order) and eval alike."""
    for rank in range(3):
        for split in ("train", "val"):
            seqs = []
            for backend in BACKENDS:
                loader = build_loader(cfg_for(unique_shards, backend, shuffle_buffer=1, batch_size=8), split, rank, 3)
                loader.set_epoch(1)
                seqs.append([y for _, labels in loader for y in labels.tolist()])
            assert seqs[0] == seqs[1] and len(seqs[0]) > 0, (rank, split)


RANK_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from conv2former.config import DataConfig
    from conv2former.data.loader import build_loader
    root, backend, rank, world, out = sys.argv[1:6]
    cfg = DataConfig(root=root, backend=backend, image_size=32, batch_size=16, workers=1, shuffle_buffer=64)
    result = {}
    for split in ("train", "val"):
        loader = build_loader(cfg, split, int(rank), int(world))
        epochs = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            epochs.append([y.tolist() for _, y in loader])
        result[split] = {"steps": len(loader), "epochs": epochs}
    json.dump(result, open(out, "w"))
""")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.slow
def test_two_ranks_in_separate_processes(unique_shards, backend, tmp_path):
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(unique_shards), backend, str(r), "2", str(tmp_path / f"{r}.json")]
        )
        for r in range(2)
    ]
    assert all(p.wait() == 0 for p in procs)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    results = {split: [ranks[r][split] for r in range(2)] for split in ("train", "val")}
    train = results["train"]
    assert train[0]["steps"] == train[1]["steps"] == (NUM // 2) // 16
    for epoch in range(2):
        seen = [[y for batch in train[r]["epochs"][epoch] for y in batch] for r in range(2)]
        assert len(seen[0]) == len(seen[1]) == 7 * 16
        assert not set(seen[0]) & set(seen[1]) and len(set(seen[0] + seen[1])) == 2 * 7 * 16  # disjoint, no repeats
    assert train[0]["epochs"][0] != train[0]["epochs"][1]  # each epoch reshuffles
    val = results["val"]
    assert val[0]["steps"] == val[1]["steps"]
    counted = [y for r in range(2) for batch in val[r]["epochs"][0] for y in batch if y >= 0]
    assert sorted(counted) == list(range(NUM))  # every sample exactly once across ranks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.slow
def test_order_is_deterministic_per_seed_and_epoch(unique_shards, backend):
    def labels(seed, epoch):
        loader = build_loader(cfg_for(unique_shards, backend, seed=seed), "train")
        loader.set_epoch(epoch)
        return [y.tolist() for _, y in loader]

    assert labels(0, 3) == labels(0, 3)
    assert labels(0, 3) != labels(0, 4) and labels(0, 3) != labels(1, 3)


@pytest.mark.parametrize("split, batch_size", [("train", 8), ("val", 7)])  # val: 240 = 34 x 7 + 2, 5 pads
@pytest.mark.slow
def test_uint8_images_normalized_in_the_worker_or_on_the_device_equal_timms_float_transform(
    unique_shards, split, batch_size
):
    """The torch backend's transform ends in uint8 images (timm's prefetcher form). On CPU each image is normalized in
    the worker straight into the shared-memory batch; on a GPU the uint8 batch is normalized on the device (here on
    CPU). The first equals timm's own float transform (ToTensor + Normalize) bit for bit, the second up to float
    rounding; padding is zeros."""
    from conv2former.data.torch_loader import timm_transform

    cfg = cfg_for(unique_shards, "torch", image_size=16, batch_size=batch_size, workers=1)
    timm_float, in_worker, on_device = (build_loader(cfg, split) for _ in range(3))
    timm_float.normalize_at = None
    timm_float.transform = timm_transform(cfg, split == "train")
    on_device.normalize_at = "device"
    assert in_worker.normalize_at == "worker"  # the CPU default
    count = 0
    for (x, y), (wx, wy), (dx, dy) in zip(timm_float, in_worker, on_device):
        assert x.dtype == wx.dtype == dx.dtype == torch.float32 and torch.equal(y, wy) and torch.equal(y, dy)
        assert torch.equal(wx, x)
        torch.testing.assert_close(dx[y >= 0], x[y >= 0], rtol=0, atol=1e-5)
        assert not wx[y < 0].any() and not x[y < 0].any()
        assert wx.is_shared()  # made in the worker's shared memory: the batch crossed without a copy
        count += 1
    assert count == len(in_worker) == -(-240 // batch_size)


@pytest.mark.slow
def test_next_epoch_started_early_gives_exactly_that_epoch(unique_shards):
    """The torch backend starts epoch e+1's workers during epoch e's last batches: the batches are those of a loader
    set to epoch e+1 from scratch, and a set_epoch to another epoch in between drops the early start."""
    cfg = cfg_for(unique_shards, "torch", image_size=16, batch_size=8)

    def epoch_batches(epoch):
        fresh = build_loader(cfg, "train")
        fresh.set_epoch(epoch)
        return [(x, y) for x, y in fresh]

    loader = build_loader(cfg, "train")
    continuous = [[(x, y) for x, y in loader] for _ in range(2)]
    assert loader._next_epoch is not None and loader._next_epoch[0] == 2  # epoch 2 already started
    loader.set_epoch(5)
    jumped = [(x, y) for x, y in loader]
    for got, expected in zip(continuous + [jumped], [epoch_batches(0), epoch_batches(1), epoch_batches(5)]):
        assert len(got) == len(expected)
        assert all(torch.equal(x, ex) and torch.equal(y, ey) for (x, y), (ex, ey) in zip(got, expected))


def test_an_unreadable_shard_is_not_reported_by_the_early_start_of_the_next_epoch(unique_shards, tmp_path):
    """The next epoch's early start meets an unreadable shard: it leaves the report to that epoch's beginning
    (after this epoch's own checkpoint), which raises as it always did."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(unique_shards, root)
    loader = build_loader(cfg_for(root, "torch", image_size=16, batch_size=8), "train")
    next(iter(loader))
    sorted((root / "train").glob("*.tar"))[0].unlink()
    loader._start_next_epoch()  # does not raise
    assert loader._next_epoch is None
    loader.set_epoch(1)
    with pytest.raises(DataFault, match="cannot be opened"):
        next(iter(loader))


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_yields_the_remaining_batches(unique_shards, backend):
    cfg = cfg_for(unique_shards, backend)
    reference = build_loader(cfg, "train", rank=1, world_size=2)
    reference.set_epoch(2)
    batches = []
    state = None
    for i, (x, y) in enumerate(reference):
        batches.append((x.clone(), y.clone()))
        if i == 2:
            state = reference.state_dict()
    assert state["epoch"] == 2 and state["step"] == 3
    state = torch.load(io.BytesIO(_saved(state)), weights_only=True)  # survives a real checkpoint round trip
    resumed = build_loader(cfg, "train", rank=1, world_size=2)
    resumed.load_state_dict(state)
    rest = [(x, y) for x, y in resumed]
    assert len(rest) == len(batches) - 3
    for (x, y), (rx, ry) in zip(batches[3:], rest):
        assert torch.equal(y, ry) and torch.equal(x, rx)
    assert resumed.epoch == 3 and resumed.step == 0


def test_a_dali_position_from_a_reader_laid_out_otherwise_restarts_the_epoch(unique_shards):
    """A DALI position saved before each rank's reader held only its own samples is not replayed into the new
    reader (it would point at other samples): the epoch restarts, with a warning."""
    loader = build_loader(cfg_for(unique_shards, "dali-cpu"), "train", rank=0, world_size=2)
    for i, _ in enumerate(loader):
        if i == 1:
            break
    state = loader.state_dict()
    assert state["dali_reader"] == "rank-slices" and state["step"] == 2
    del state["dali_reader"]
    resumed = build_loader(cfg_for(unique_shards, "dali-cpu"), "train", rank=0, world_size=2)
    with pytest.warns(UserWarning, match="laid out differently"):
        resumed.load_state_dict(state)
    assert resumed.step == 0 and len([y for _, y in resumed]) == len(resumed)


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_mixup_targets_sum_to_one(unique_shards):
    images, labels = next(iter(build_loader(cfg_for(unique_shards, "dali-cpu"), "train")))
    augment = BatchAugment(AugmentConfig(), num_classes=NUM, device=torch.device("cpu"))
    mixed, targets = augment(images.clone(), labels)
    assert mixed.shape == images.shape and targets.shape == (16, NUM)
    torch.testing.assert_close(targets.sum(1), torch.ones(16))
    assert not torch.equal(mixed, images)
    plain = BatchAugment(AugmentConfig(mixup=0, cutmix=0, random_erasing=0), NUM, torch.device("cpu"))
    _, smooth = plain(images, labels)
    torch.testing.assert_close(smooth.sum(1), torch.ones(16))
    assert smooth.argmax(1).tolist() == labels.tolist()
    with pytest.raises(UserError, match="even batch"):
        augment(images[:15], labels[:15])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("crop_mode,crop_pct,size", [("center", 0.875, 64), ("squash", 1.0, 96)])
def test_eval_transform_matches_timm(tmp_path, backend, crop_mode, crop_pct, size):
    from timm.data import create_transform

    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize((160, 120), Image.BICUBIC)
    buf = io.BytesIO()
    smooth.save(buf, format="JPEG", quality=95)
    src = tmp_path / "src" / "val" / "n01440764"
    src.mkdir(parents=True)
    (src / "x.JPEG").write_bytes(buf.getvalue())
    (tmp_path / "src" / "train" / "n01440764").mkdir(parents=True)
    (tmp_path / "src" / "train" / "n01440764" / "y.JPEG").write_bytes(buf.getvalue())
    out = tmp_path / "out"
    assert (
        shard_main(["imagenet1k", str(tmp_path / "src"), str(out), "--classes", "present", "--workers", "1", "--quiet"])
        == 0
    )
    cfg = cfg_for(out, backend, image_size=size, batch_size=1, crop_pct=crop_pct, crop_mode=crop_mode)
    ours = next(iter(build_loader(cfg, "val")))[0][0].cpu()
    reference = create_transform(
        size, is_training=False, crop_pct=crop_pct, crop_mode=crop_mode, interpolation="bicubic"
    )(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    diff = (ours - reference).abs()
    if backend == "torch":
        assert torch.equal(ours, reference)
    else:  # same geometry; DALI's cubic resampling differs from PIL's by rounding only
        assert diff.mean() < 0.01 and diff.max() < 0.25, (diff.mean(), diff.max())


def test_bad_input(unique_shards, tmp_path):
    with pytest.raises(UserError, match="data root not found"):
        build_loader(cfg_for(tmp_path / "missing", "torch"), "train")
    with pytest.raises(UserError, match="no 'test' split"):
        build_loader(cfg_for(unique_shards, "torch"), "test")
    with pytest.raises(UserError, match="more than the 240 samples"):
        build_loader(cfg_for(unique_shards, "dali-cpu", batch_size=128), "train", rank=0, world_size=2)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="dali-cpu or --backend torch"):
            resolve_backend("dali-gpu")
    with pytest.raises(UserError, match="unknown data backend"):
        resolve_backend("tfrecord")


def test_damaged_shards(unique_shards, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(unique_shards, copy)
    # an index that does not match its tar
    idx = copy / "train" / "train-000001.idx"
    lines = idx.read_text().splitlines()
    lines[1] = " ".join(str(int(p) + 512) if i % 4 == 1 else p for i, p in enumerate(lines[1].split()))
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="index does not match its tar"):
        build_loader(cfg_for(copy, "torch"), "train")
    shutil.copy(unique_shards / "train" / "train-000001.idx", idx)
    # an index that lost a line in the middle (opening reads only its ends): one clear line when it is read
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join(lines[:3] + lines[4:]) + "\n")
    for backend in BACKENDS:
        loader = build_loader(cfg_for(copy, backend, shuffle_buffer=1), "train")
        with pytest.raises(UserError, match="train-000001.idx: index announces 20 samples but lists 19"):
            next(iter(loader))
    shutil.copy(unique_shards / "train" / "train-000001.idx", idx)
    # a truncated shard: its complete samples are used, with a warning, and the job runs
    tar = copy / "train" / "train-000004.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) * 2 // 3])
    for backend in BACKENDS:
        with pytest.warns(UserWarning, match="truncated"):
            loader = build_loader(cfg_for(copy, backend, cache_dir=str(tmp_path / "cache")), "train")
        assert loader.shards.num_samples < NUM
        assert sum(1 for _ in loader) == len(loader)


def test_position_survives_a_save_right_after_restore_and_other_backends_restart(unique_shards):
    cfg = cfg_for(unique_shards, "dali-cpu")
    first = build_loader(cfg, "train")
    it = iter(first)
    for _ in range(2):
        next(it)
    expected = next(it)[1]
    again = build_loader(cfg, "train")
    again.load_state_dict(_two_step_state(cfg))
    resaved = again.state_dict()  # saved before any batch was drawn (e.g. preempted at once)
    third = build_loader(cfg, "train")
    third.load_state_dict(resaved)
    assert torch.equal(next(iter(third))[1], expected)
    other = build_loader(cfg_for(unique_shards, "torch"), "train")
    with pytest.warns(UserWarning, match="backend dali-cpu cannot be replayed"):
        other.load_state_dict(resaved)
    assert other.step == 0


def _two_step_state(cfg):
    loader = build_loader(cfg, "train")
    it = iter(loader)
    next(it)
    next(it)
    return loader.state_dict()
