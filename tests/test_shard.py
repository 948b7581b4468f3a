"""data_prep/shard.py on fake ImageNet trees: formats, labels, bad input, determinism, crash-resume, object stores."""

from __future__ import annotations

import collections
import filecmp
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import fake_imagenet as fake
import fsspec
import pytest
from moto_s3 import moto_s3
from PIL import Image

from conv2former.data import shard_format as fmt
from data_prep.shard import main as shard_main
from data_prep.verify import verify

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD_PY = os.path.join(REPO, "data_prep", "shard.py")


def run(*argv: str) -> int:
    return shard_main(list(argv))


def read_split(root: str, split: str):
    """[(key, label, meta, jpg bytes)] of a split, in shard order, through fsspec."""
    fs, path = fsspec.core.url_to_fs(root)
    with fs.open(f"{path}/_info.json") as f:
        info = json.load(f)
    samples = []
    for filename in info["splits"][split]["filenames"]:
        with fs.open(f"{path}/{filename}", "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            current = {}
            for member in tar:
                key, _, ext = member.name.partition(".")
                current.setdefault(key, {})[ext] = tar.extractfile(member).read()
            for key, parts in current.items():
                samples.append((key, int(parts["cls"]), json.loads(parts["json"]), parts["jpg"]))
    return info, samples


@pytest.fixture(scope="module")
def tree_22k(tmp_path_factory):
    root = tmp_path_factory.mktemp("in22k_src")
    good = fake.make_22k_synset_tars(str(root))
    fake.truncate_tar(str(root / f"{fake.SYNSETS_22K[3]}.tar"), keep_members=5)
    return root, good


@pytest.fixture(scope="module")
def shards_22k(tree_22k, tmp_path_factory):
    src, _ = tree_22k
    out = tmp_path_factory.mktemp("in22k_out")
    assert (
        run(
            "imagenet22k",
            str(src),
            str(out),
            "--val-per-class",
            "3",
            "--samples-per-shard",
            "10",
            "--workers",
            "2",
            "--quiet",
        )
        == 0
    )
    return out


def test_22k_round_trip(tree_22k, shards_22k):
    canonical = fmt.canonical_synsets("imagenet22k")
    info, train = read_split(str(shards_22k), "train")
    _, val = read_split(str(shards_22k), "val")
    assert info["num_classes"] == 21841 and info["name"] == "imagenet-22k"
    assert (shards_22k / "classes.txt").read_text().split() == list(canonical)
    for key, label, meta, _ in train + val:
        assert canonical[label] == meta["synset"] and key.startswith(meta["synset"]) and "." not in key
    per_class_val = collections.Counter(meta["synset"] for _, _, meta, _ in val)
    # exactly 3 valid images per class are held out, also in synset 0, which holds every kind of bad file
    assert per_class_val == {synset: 3 for synset in fake.SYNSETS_22K[:4]}
    assert not {k for k, *_ in train} & {k for k, *_ in val}  # the held-out split is disjoint from train
    counts = collections.Counter(meta["synset"] for _, _, meta, _ in train + val)
    # synset 0: 12 good + cmyk/png/gray re-encoded; synset 3: the tar was cut inside member 5 (5 kept)
    assert counts == {fake.SYNSETS_22K[0]: 15, fake.SYNSETS_22K[1]: 12, fake.SYNSETS_22K[2]: 12, fake.SYNSETS_22K[3]: 5}
    assert info["splits"]["train"]["num_samples"] == len(train) == sum(info["splits"]["train"]["shard_lengths"])
    assert all(f.startswith("train/train-") for f in info["splits"]["train"]["filenames"])
    for *_, data in train[:20]:
        img = Image.open(io.BytesIO(data))
        assert img.format == "JPEG" and img.mode == "RGB"
        img.load()
    skipped = [json.loads(line) for line in (shards_22k / "skipped.jsonl").read_text().splitlines()]
    for kind, reason in fake.BAD_22K.items():
        recorded = [s["reason"] for s in skipped if s["source"].endswith(f"_{kind}.JPEG")]
        assert recorded == ([] if reason == "reencoded" else [recorded[0]]) and (
            not recorded or recorded[0].startswith(reason)
        ), kind
    assert any("n99999999" in s["source"] and "not in the class list" in s["reason"] for s in skipped)
    assert any("damaged tar" in s["reason"] and fake.SYNSETS_22K[3] in s["source"] for s in skipped)


def test_the_manifest_records_each_splits_largest_stored_image_for_the_gpu_decoder(shards_22k):
    """``largest_image`` ([width, height] of the stored JPEG with the most pixels) per split; the loader reads it and
    sizes the mixed decoder's buffers from it (full-resolution ImageNet's when a manifest lacks it)."""
    from conv2former.data.dali_loader import FULL_RESOLUTION, MIN_PADDING, decoder_buffers
    from conv2former.data.shards import open_split

    for split in ("train", "val"):
        info, samples = read_split(str(shards_22k), split)
        sizes = [Image.open(io.BytesIO(data)).size for *_, data in samples]
        largest = max(sizes, key=lambda wh: wh[0] * wh[1])
        assert info["splits"][split]["largest_image"] == list(largest)
        assert open_split(str(shards_22k), split).largest_image == largest
    small = decoder_buffers((80, 64))
    assert small["device_memory_padding"] == small["host_memory_padding"] == MIN_PADDING
    assert (small["preallocate_width_hint"], small["preallocate_height_hint"]) == (80, 64)
    full = decoder_buffers(None)  # NVIDIA's settings for full-resolution ImageNet
    assert full["device_memory_padding"] == 211025920 and full["host_memory_padding"] == 140544512
    assert (full["preallocate_width_hint"], full["preallocate_height_hint"]) == FULL_RESOLUTION


def test_verify_passes_with_pil_and_dali(shards_22k):
    assert verify(str(shards_22k), use_dali=True, quiet=True) == []
    assert run("verify", str(shards_22k / "train"), "--quiet") == 0


def test_index_matches_dalis_wds2idx(shards_22k, tmp_path):
    """Our index (taken from the writer's positions) is byte-identical to what DALI's wds2idx reads from the tar."""
    wds2idx = os.path.join(os.path.dirname(sys.executable), "wds2idx")
    shards = sorted(shards_22k.glob("*/*.tar"))
    assert len(shards) >= 2
    for shard in shards:
        subprocess.run([wds2idx, str(shard), str(tmp_path / "ref.idx")], check=True, capture_output=True)
        assert (tmp_path / "ref.idx").read_text() == shard.with_suffix(".idx").read_text(), shard.name


def test_index_of_members_with_extended_tar_headers(tmp_path):
    """A name over 100 bytes makes tarfile add a pax header: the writer's positions no longer tell the layout, and
    the shard is indexed by reading it back, still equal to wds2idx."""
    from data_prep.sources import SourceItem
    from data_prep.writer import ShardTask, WriteOptions, write_shard

    items = []
    for i, key in enumerate(["short_key", "k" * 120, "after_the_long_one"]):
        path = tmp_path / f"img{i}.jpg"
        Image.new("RGB", (64, 48), (i * 60, 30, 90)).save(path, format="JPEG")
        items.append((SourceItem(key, "n01440764", str(path), -1, path.stat().st_size, path.name), i))
    result = write_shard(ShardTask(str(tmp_path / "out"), "train", 0, items, WriteOptions()))
    assert result.num_samples == 3
    shard = tmp_path / "out" / "train" / fmt.shard_name("train", 0)
    wds2idx = os.path.join(os.path.dirname(sys.executable), "wds2idx")
    subprocess.run([wds2idx, str(shard), str(tmp_path / "ref.idx")], check=True, capture_output=True)
    assert (tmp_path / "ref.idx").read_text() == shard.with_suffix(".idx").read_text()


def test_timm_wds_reader_streams_our_shards(shards_22k):
    import timm.data

    dataset = timm.data.create_dataset("wds/imagenet", root=str(shards_22k), split="train")
    _, ours = read_split(str(shards_22k), "train")
    got = [(target) for _, target in dataset]
    assert len(dataset) == len(ours) and sorted(got) == sorted(label for _, label, _, _ in ours)


def test_dali_reads_labels_identical_to_cls(shards_22k):
    from data_prep.verify import _dali_labels

    info, ours = read_split(str(shards_22k), "train")
    first = [label for _, label, _, _ in ours[: info["splits"]["train"]["shard_lengths"][0]]]
    shard = shards_22k / "train" / "train-000000.tar"
    assert _dali_labels(str(shard), str(shard.with_suffix(".idx"))) == first


@pytest.mark.parametrize("layout", ["outer-tar", "outer-targz", "synset-folders"])
def test_other_22k_layouts_give_the_same_samples(tmp_path, layout):
    tars = tmp_path / "tars"
    fake.make_22k_synset_tars(str(tars), with_bad=False)
    if layout.startswith("outer"):
        src = tmp_path / ("fall11_whole.tar" if layout == "outer-tar" else "winter21_whole.tar.gz")
        fake.make_outer_tar(str(tars), str(src))
    else:
        src = tmp_path / "folders"
        fake.make_22k_folders(str(src))
    for name, source in (("ref", tars), ("other", src)):
        assert (
            run(
                "imagenet22k",
                str(source),
                str(tmp_path / name),
                "--val-per-class",
                "2",
                "--samples-per-shard",
                "16",
                "--workers",
                "1",
                "--quiet",
            )
            == 0
        )
    plan = json.loads((tmp_path / "other" / "_plan.json").read_text())
    assert plan["source"]["layout"] == layout
    for split in ("train", "val"):
        ref = [(k, label, jpg) for k, label, _, jpg in read_split(str(tmp_path / "ref"), split)[1]]
        other = [(k, label, jpg) for k, label, _, jpg in read_split(str(tmp_path / "other"), split)[1]]
        assert ref == other


@pytest.mark.parametrize("val_format", ["folder", "csv", "devkit"])
def test_1k_val_label_formats(tmp_path, val_format):
    truth = fake.make_1k(str(tmp_path / "src"), val_format)
    assert (
        run(
            "imagenet1k",
            str(tmp_path / "src"),
            str(tmp_path / "out"),
            "--samples-per-shard",
            "7",
            "--workers",
            "1",
            "--quiet",
        )
        == 0
    )
    canonical = fmt.canonical_synsets("imagenet1k")
    info, val = read_split(str(tmp_path / "out"), "val")
    _, train = read_split(str(tmp_path / "out"), "train")
    assert info["num_classes"] == 1000 and len(train) == 18 and len(val) == len(truth) == 9
    for key, label, meta, _ in val:
        assert meta["synset"] == truth[key] and canonical[label] == truth[key]
    if val_format != "folder":  # ILSVRC2012_val_00000001 of a real devkit is class 65 (n01751748)
        assert canonical.index("n01751748") == 65


def test_demo_classes_present_gives_a_compact_label_space(tmp_path):
    fake.make_1k(str(tmp_path / "src"), "folder")
    assert (
        run(
            "imagenet1k",
            str(tmp_path / "src"),
            str(tmp_path / "out"),
            "--classes",
            "present",
            "--samples-per-shard",
            "50",
            "--workers",
            "1",
            "--quiet",
        )
        == 0
    )
    assert (tmp_path / "out" / "classes.txt").read_text().split() == fake.SYNSETS_1K
    info, train = read_split(str(tmp_path / "out"), "train")
    assert info["num_classes"] == 3 and {label for _, label, _, _ in train} == {0, 1, 2}


def test_deterministic_bytes(tree_22k, tmp_path):
    src, _ = tree_22k
    for name, workers in (("a", "1"), ("b", "2")):
        assert (
            run(
                "imagenet22k",
                str(src),
                str(tmp_path / name),
                "--val-per-class",
                "3",
                "--samples-per-shard",
                "10",
                "--workers",
                workers,
                "--quiet",
            )
            == 0
        )
    compare_trees(tmp_path / "a", tmp_path / "b")


def compare_trees(a, b):
    for split in ("train", "val"):
        names = sorted(os.listdir(a / split))
        assert names == sorted(os.listdir(b / split)) and names
        match, mismatch, errors = filecmp.cmpfiles(a / split, b / split, names, shallow=False)
        assert not mismatch and not errors
    for name in ("_info.json", "classes.txt", "skipped.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.slow
def test_kill_minus_9_then_resume_equals_uninterrupted(tmp_path):
    src = tmp_path / "src"
    fake.make_22k_synset_tars(str(src), with_bad=False)
    args = ["imagenet22k", str(src), "--val-per-class", "2", "--samples-per-shard", "1", "--workers", "1", "--quiet"]
    assert run(args[0], args[1], str(tmp_path / "whole"), *args[2:]) == 0
    total = len(os.listdir(tmp_path / "whole" / "_progress"))  # one record per shard (48: a wide window to land in)
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen(
        [sys.executable, SHARD_PY, args[0], args[1], str(killed), *args[2:]],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    progress = killed / "_progress"
    deadline = time.time() + 120
    while time.time() < deadline and (not progress.exists() or len(os.listdir(progress)) < 5):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(os.listdir(progress))
    assert 5 <= done_before < total, "the kill must land mid-run"
    assert not (killed / "_info.json").exists()
    assert run(args[0], args[1], str(killed), *args[2:]) == 0
    compare_trees(tmp_path / "whole", killed)
    assert not [n for n in os.listdir(killed / "train") if n.endswith(".partial")]


def test_memory_url_round_trip(tree_22k):
    src, _ = tree_22k
    assert (
        run(
            "imagenet22k",
            str(src),
            "memory://shards/in22k",
            "--val-per-class",
            "3",
            "--samples-per-shard",
            "10",
            "--workers",
            "2",
            "--quiet",
        )
        == 0
    )
    info, train = read_split("memory://shards/in22k", "train")
    assert len(train) == info["splits"]["train"]["num_samples"] > 0
    assert verify("memory://shards/in22k", use_dali=True, quiet=True) == []


def test_s3_round_trip_through_a_local_moto_server(tree_22k, tmp_path):
    src, _ = tree_22k
    args = ["--val-per-class", "3", "--samples-per-shard", "10", "--quiet"]
    with moto_s3("bucket"):
        assert run("imagenet22k", str(src), "s3://bucket/in22k", *args, "--workers", "2") == 0
        _, remote = read_split("s3://bucket/in22k", "train")
        assert run("imagenet22k", str(src), str(tmp_path / "local"), *args, "--workers", "1") == 0
        _, local = read_split(str(tmp_path / "local"), "train")
        assert remote == local
        assert verify("s3://bucket/in22k/val", use_dali=True, quiet=True) == []


def one_line_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run(*argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_gives_one_line_errors(tmp_path, capsys, tree_22k):
    src, _ = tree_22k
    assert "source not found" in one_line_error(capsys, "imagenet22k", str(tmp_path / "missing"), str(tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    assert "empty" in one_line_error(capsys, "imagenet22k", str(tmp_path / "empty"), str(tmp_path / "o"))
    assert "empty" in one_line_error(capsys, "imagenet1k", str(tmp_path / "empty"), str(tmp_path / "o"))
    (tmp_path / "archive.zip").write_bytes(b"PK")
    assert "not a .tar archive" in one_line_error(
        capsys, "imagenet22k", str(tmp_path / "archive.zip"), str(tmp_path / "o")
    )
    (tmp_path / "afile").write_text("x")
    assert "cannot write to output" in one_line_error(capsys, "imagenet22k", str(src), str(tmp_path / "afile" / "o"))
    flat = tmp_path / "flat1k"
    fake.make_1k(str(flat), "folder")
    for synset in fake.SYNSETS_1K:  # make val flat without any label file
        for name in os.listdir(flat / "val" / synset):
            os.rename(flat / "val" / synset / name, flat / "val" / name)
        os.rmdir(flat / "val" / synset)
    assert "no labels were found" in one_line_error(capsys, "imagenet1k", str(flat), str(tmp_path / "o1k"))


def test_refuses_to_mix_runs_unless_overwrite(tree_22k, tmp_path, capsys):
    src, _ = tree_22k
    out = str(tmp_path / "out")
    common = ["--val-per-class", "3", "--samples-per-shard", "10", "--workers", "1", "--quiet"]
    assert run("imagenet22k", str(src), out, *common) == 0
    assert run("imagenet22k", str(src), out, *common) == 0  # same plan: every shard reused
    assert "reused" in capsys.readouterr().out
    moved = tmp_path / "moved-checkout" / "src"  # the same images at another path: still the same plan
    shutil.copytree(src, moved)
    assert run("imagenet22k", str(moved), out, *common) == 0
    assert "reused" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "_plan.json").read_text())["source"]["src"] == str(moved)
    err = one_line_error(capsys, "imagenet22k", str(moved), out, *common, "--seed", "7")
    assert "different source or settings (digest, seed differ)" in err and "--overwrite" in err
    assert run("imagenet22k", str(moved), out, *common, "--seed", "7", "--overwrite") == 0
    assert json.loads((tmp_path / "out" / "_info.json").read_text())["seed"] == 7


def test_verify_reports_damage(shards_22k, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shards_22k, copy)
    shard = copy / "train" / "train-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    (copy / "train" / "train-000002.idx").write_text("v1.2 1\njpg 0 1 x.jpg\n")
    assert run("verify", str(copy), "--quiet", "--workers", "2") == 1
    out = capsys.readouterr().out
    assert "train/train-000001.tar" in out and "train/train-000002.tar: index does not match the tar" in out
    # --quick finds both from sizes and headers alone, and passes the intact shards
    assert run("verify", str(copy), "--quiet", "--quick") == 1
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("problem: train/train-000001.tar: truncated") for line in out), out
    assert any("train/train-000002.tar: index does not match its tar" in line for line in out) and len(out) == 2, out
    assert run("verify", str(shards_22k), "--quiet", "--quick", "--workers", "2") == 0
    assert "every shard and index (sizes and headers; --quick) checks out" in capsys.readouterr().out


@pytest.mark.parametrize("layout", ["synset-tars", "outer-targz"])
def test_val_per_class_is_exact_when_bad_files_are_drawn(tmp_path, layout):
    """Classes where most files are bad: the held-out split still gets exactly N valid images per class (all valid
    but one when a class has at most N), the bad candidates go to neither split and are recorded, and training keeps
    the rest. Through offsets (synset tars) and through one streaming pass (a .tar.gz)."""
    src = tmp_path / "src"
    src.mkdir()
    bad_kinds = ["not_image", "empty", "truncated", "tiny", "not_image", "empty"]
    layout_of = {fake.SYNSETS_22K[0]: 4, fake.SYNSETS_22K[1]: 2, fake.SYNSETS_22K[2]: 9}  # good images per class
    for synset, n_good in layout_of.items():
        with tarfile.open(src / f"{synset}.tar", "w") as tar:
            for name, data in fake.class_images(synset, n_good).items():
                fake.add_member(tar, name, data)
            for i, kind in enumerate(bad_kinds):
                fake.add_member(tar, f"{synset}_bad{i}.JPEG", fake.bad_file(kind))
    source = str(src)
    if layout == "outer-targz":
        source = str(tmp_path / "winter21_whole.tar.gz")
        fake.make_outer_tar(str(src), source)
    out = tmp_path / "out"
    common = ["--samples-per-shard", "5", "--classes", "present", "--workers", "2", "--quiet"]
    assert run("imagenet22k", source, str(out), "--val-per-class", "3", *common) == 0
    _, train = read_split(str(out), "train")
    _, val = read_split(str(out), "val")
    held = collections.Counter(meta["synset"] for _, _, meta, _ in val)
    kept = collections.Counter(meta["synset"] for _, _, meta, _ in train)
    assert held == {fake.SYNSETS_22K[0]: 3, fake.SYNSETS_22K[1]: 1, fake.SYNSETS_22K[2]: 3}
    assert kept == {fake.SYNSETS_22K[0]: 1, fake.SYNSETS_22K[1]: 1, fake.SYNSETS_22K[2]: 6}
    assert all("_bad" not in meta["source"] for _, _, meta, _ in train + val)
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert sorted(s["source"].rsplit("/", 1)[-1].rsplit(":", 1)[-1] for s in skipped) == sorted(
        f"{synset}_bad{i}.JPEG" for synset in layout_of for i in range(len(bad_kinds))
    )
    assert sum("a held-out candidate" in s["reason"] for s in skipped) >= 6  # drawn, checked, replaced


def test_split_holdout_without_bad_files_takes_the_first_n_of_the_seeded_order():
    from data_prep.holdout import split_holdout
    from data_prep.sources import SourceItem
    from data_prep.writer import seeded_shuffle

    items = [
        SourceItem(f"n{c:08d}_{i}", f"n{c:08d}", "x.tar", i, 1, f"n{c:08d}_{i}") for c in range(3) for i in range(7)
    ]
    calls = []

    def all_valid(batch):
        calls.append(len(batch))
        return {item.name: None for item in batch}

    train, held, skipped = split_holdout(items, 4, seed=5, check=all_valid)
    for c in range(3):
        members = [it for it in items if it.synset == f"n{c:08d}"]
        first = sorted(seeded_shuffle(list(members), 5, f"holdout:n{c:08d}")[:4], key=lambda it: it.key)
        assert [it for it in held if it.synset == f"n{c:08d}"] == first
    assert calls == [15] and not skipped  # one round: N + 1 candidates per class
    assert sorted([*train, *held], key=lambda it: it.key) == sorted(items, key=lambda it: it.key)
    assert len(split_holdout(items, 0, seed=5, check=all_valid)[1]) == 0 and calls == [15]


def test_plan_only_reports_the_plan_and_writes_nothing(tree_22k, shards_22k, tmp_path, capsys):
    src, _ = tree_22k
    args = ["--val-per-class", "3", "--samples-per-shard", "10", "--workers", "2", "--quiet", "--plan-only"]
    before = {p: p.stat().st_mtime_ns for p in shards_22k.rglob("*")}
    capsys.readouterr()
    assert run("imagenet22k", str(src), str(shards_22k), *args) == 0
    out = capsys.readouterr().out
    info = json.loads((shards_22k / "_info.json").read_text())
    shards = len(info["splits"]["train"]["filenames"]) + len(info["splits"]["val"]["filenames"])
    assert f"{shards:,} complete shards a resume keeps, 0 to write" in out and "nothing was written" in out, out
    assert {p: p.stat().st_mtime_ns for p in shards_22k.rglob("*")} == before
    fresh = tmp_path / "fresh"
    assert run("imagenet22k", str(src), str(fresh), *args) == 0
    assert f"0 complete shards a resume keeps, {shards:,} to write" in capsys.readouterr().out
    assert not fresh.exists()


def test_item_table_gives_back_every_item_in_synset_and_key_order():
    """The compact listing (data_prep/items.py): tar members, folder files and an item of neither shape come back
    equal to what was added, sorted by (synset, key), also when one synset arrives in two containers."""
    from data_prep.items import ItemTable, view
    from data_prep.sources import SourceItem

    def tar_items(synset, tar, keys):
        return [SourceItem(k, synset, tar, 512 * i, 100 + i, f"{tar}:{k}.JPEG") for i, k in enumerate(keys)]

    b1 = tar_items("n2", "/d/b1.tar", ["n2_3", "n2_1"])
    b2 = tar_items("n2", "/d/b2.tar", ["n2_2"])
    files = [SourceItem(f"n1_{i}", "n1", f"/f/n1/x/n1_{i}.jpg", -1, 7, f"n1/x/n1_{i}.jpg") for i in (2, 1)]
    odd = SourceItem("odd", "n1", "/elsewhere.bin", 5, 9, "a name of its own")
    table = ItemTable()
    table.add(b1, "n2", "/d/b1.tar", "/d/b1.tar:")
    table.add(b2, "n2", "/d/b2.tar", "/d/b2.tar:")
    table.add(files + [odd], "n1", "/f/n1", "n1/", files=True)
    ordered = table.ordered()
    assert list(ordered) == sorted(b1 + b2 + files + [odd], key=lambda it: (it.synset, it.key))
    assert [ordered.synset_at(i) for i in range(len(ordered))] == [it.synset for it in ordered]
    assert [ordered.size_at(i) for i in range(len(ordered))] == [it.size for it in ordered]
    part = view(ordered, [4, 0])
    assert list(part) == [ordered[4], ordered[0]] and list(part[1:]) == [ordered[0]]
