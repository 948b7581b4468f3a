"""The GPU checklist's CPU rehearsal (benchmarks/gpu_checklist.py --rehearse, what CI runs of it) and the GPU kit
(tools/gpu_kit.py): the stages' order and budgets, a stage killed at its budget leaving its traceback, the results
folder's file limit, the record of passed stages deciding where the next reservation starts, and the kit's files
under the reservation's limits, cut and joined back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO

from conv2former.engine.distributed import python_path

sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tools"))
import gpu_checklist  # noqa: E402
import gpu_kit  # noqa: E402
from test_offline import fake_wheel  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=python_path(str(REPO)), OMP_NUM_THREADS="2")


def checklist(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "benchmarks/gpu_checklist.py", *args],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_stages_are_ordered_by_value_and_stages_1_to_4_fit_one_command():
    names = [s.name for s in gpu_checklist.STAGES]
    assert names == ["environment", "gpu-tests", "engine-l", "resume", "dali", "gpu-suite"]
    assert sum(s.budget_s for s in gpu_checklist.STAGES[:4]) <= 560 - 60  # with the kit's install, under 10 minutes
    assert [bool(s.rehearsal) for s in gpu_checklist.STAGES] == [True, True, False, False, False, False]


@pytest.mark.slow
def test_the_rehearsal_runs_the_cpu_forms_and_records_nothing_as_passed(tmp_path):
    record = tmp_path / "record.jsonl"
    out = tmp_path / "results"
    done = checklist("--rehearse", "--out", str(out), "--record-file", str(record), "--record")
    assert done.returncode == 0, done.stdout + done.stderr
    stages = json.loads((out / "stages.json").read_text())
    assert [(s["number"], s["status"]) for s in stages] == [
        (1, "rehearsed"), (2, "rehearsed"), (3, "no CPU form"), (4, "no CPU form"), (5, "no CPU form"),
        (6, "no CPU form"),
    ]  # fmt: skip
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert files == ["checklist.md", "environment.json", "junit.xml", "log.txt", "measurements.jsonl", "stages.json"]
    assert len((out / "checklist.md").read_text().splitlines()) == 2 + 6  # a title, a blank line, a line per stage
    environment = json.loads((out / "environment.json").read_text())
    assert environment["versions"]["deepspeed"] and environment["gpu"] == {"available": False}
    assert "accuracy_gate" in (out / "junit.xml").read_text()  # stage 2's CPU part ran, its JUnit kept
    # the record: rehearsals are kept but never count as passed, so the next reservation still starts at stage 2
    rows = gpu_checklist.read_record(record)
    assert [r["status"] for r in rows] == ["rehearsed", "rehearsed"] and rows[0]["device"] == "cpu"
    assert gpu_checklist.first_not_passed(rows) == 2


def test_a_reservations_passed_stages_move_the_next_start(tmp_path):
    """What a reservation brings back (its stages.json) goes into the record; the next run starts after the stages
    passed on a GPU, and stops at one that failed or ran out of time."""
    record, results = tmp_path / "record.jsonl", tmp_path / "reservation"
    results.mkdir()
    rows = [
        dict(
            number=n,
            name=s.name,
            status=status,
            seconds=5.0,
            budget_s=s.budget_s,
            verdict="",
            device="NVIDIA H100 80GB HBM3",
            date="2026-12-06",
            commit="abc",
        )  # fmt: skip
        for (n, status), s in zip([(1, "passed"), (2, "passed"), (3, "out of time")], gpu_checklist.STAGES)
    ]
    (results / "stages.json").write_text(json.dumps(rows))
    done = checklist("record", str(results), "--record-file", str(record))
    assert done.returncode == 0, done.stderr
    assert gpu_checklist.first_not_passed(gpu_checklist.read_record(record)) == 3
    checklist("record", str(results), "--record-file", str(record))  # recording twice adds nothing
    assert len(gpu_checklist.read_record(record)) == 3
    listed = checklist("--list", "--record-file", str(record)).stdout.splitlines()
    assert listed[2].startswith("> 3 engine-l") and sum(line.startswith(">") for line in listed) == 1
    assert checklist("record", str(tmp_path / "nowhere")).returncode == 2


@pytest.mark.slow
def test_a_stage_killed_at_its_budget_leaves_its_traceback(tmp_path):
    out = tmp_path / "results"
    done = checklist(
        "--rehearse", "--only", "2", "--budget", "2=1", "--out", str(out), "--record-file", str(tmp_path / "r.jsonl")
    )  # fmt: skip  (1 s: pytest is still starting, far from done)
    assert done.returncode == 1
    stages = {s["number"]: s for s in json.loads((out / "stages.json").read_text())}
    assert stages[2]["status"] == "out of time" and stages[2]["seconds"] < 1 + gpu_checklist.KILL_GRACE_S + 5
    log = (out / "log.txt").read_text()
    killed = log[log.index("==== stage 2") :]
    assert "(most recent call first)" in killed and 'File "' in killed  # faulthandler's traceback of the killed pytest
    assert set(stages) == {1, 2}


def test_without_a_gpu_the_real_checklist_is_one_line_and_a_deadline_stops_before_a_stage(tmp_path):
    done = checklist("--out", str(tmp_path / "x"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    args = gpu_checklist.parse_args(["--rehearse", "--deadline", "20", "--out", str(tmp_path / "short")])
    results = gpu_checklist.run_checklist(args)  # stage 1's 30 s do not fit in 20: nothing starts
    assert [(r.number, r.status) for r in results] == [(1, "not started")] and "next reservation" in results[0].verdict


def test_kit_limits_are_checked(tmp_path):
    kit = tmp_path / "kit"
    (kit / "core").mkdir(parents=True)
    assert gpu_kit.kit_problems(kit) and "make gpu-kit" in gpu_kit.kit_problems(kit)[0]
    (kit / "core" / "manifest.json").write_text("{}")
    with open(kit / "core" / "wheels.bin", "wb") as f:
        f.truncate(gpu_kit.CORE_LIMIT - 1024)  # sparse: sizes are what the limits see
    (kit / "dali").mkdir()
    with open(kit / "dali" / f"{gpu_kit.CHUNK_PREFIX}000", "wb") as f:
        f.truncate(gpu_kit.CHUNK_LIMIT)
    assert gpu_kit.kit_problems(kit) == []
    with open(kit / "dali" / f"{gpu_kit.CHUNK_PREFIX}001", "wb") as f:
        f.truncate(gpu_kit.CHUNK_LIMIT + 1)
    with open(kit / "core" / "more.bin", "wb") as f:
        f.truncate(4096)
    problems = gpu_kit.kit_problems(kit)
    assert len(problems) == 2 and "core" in problems[0] and "part001" in problems[1]
    assert gpu_checklist.kit_problems(kit) == problems  # what the rehearsal reports with --kit


def test_dali_wheels_cut_to_one_python_packed_in_chunks_and_installed_from_them(tmp_path):
    """The DALI part's mechanics on small real wheels: other Pythons' extension modules dropped (RECORD too), the
    wheels packed into xz chunks; a missing or corrupt chunk is named in one line; all of them install and import."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    base = fake_wheel(wheels, "kitdemo_pkg", "1.0", filler=200_000)
    with zipfile.ZipFile(base, "a") as whl:
        for tag in ("cpython-311-x86_64-linux-gnu", "cpython-312-x86_64-linux-gnu", "cpython-314t-x86_64-linux-gnu"):
            whl.writestr(f"kitdemo_pkg/backend_impl.{tag}.so", b"\0" * 1000)
    cut_dir = tmp_path / "cut"
    cut_dir.mkdir()
    cut = gpu_kit.cut_wheel(base, cut_dir, "3.12")
    with zipfile.ZipFile(cut) as whl:
        names = whl.namelist()
        record = whl.read("kitdemo_pkg-1.0.dist-info/RECORD").decode()
    assert [n for n in names if n.endswith(".so")] == ["kitdemo_pkg/backend_impl.cpython-312-x86_64-linux-gnu.so"]
    assert "cpython-311" not in record and all(
        i.compress_type == zipfile.ZIP_STORED for i in zipfile.ZipFile(cut).infolist()
    )

    dali = tmp_path / "kit" / "dali"
    manifest = gpu_kit.pack_chunks(
        [cut], dali, {"python_version": "3.12"}, chunk_bytes=64 * 1024, imports=("kitdemo_pkg",)
    )
    assert len(manifest["chunks"]) >= 2 and all(c["size"] <= 64 * 1024 for c in manifest["chunks"])
    target = tmp_path / "site"
    last = dali / manifest["chunks"][-1]["file"]
    data = last.read_bytes()
    last.unlink()
    assert gpu_kit.install_dali(dali, target) == 3
    last.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert gpu_kit.install_dali(dali, target) == 3
    last.write_bytes(data)
    assert gpu_kit.install_dali(dali, target) == 0
    assert (target / "kitdemo_pkg" / "backend_impl.cpython-312-x86_64-linux-gnu.so").exists()


@pytest.mark.parametrize("args", [["--budget", "2=x"]])
def test_bad_options_are_one_line(args, tmp_path):
    done = checklist("--rehearse", *args, "--out", str(tmp_path / "o"))
    assert done.returncode != 0 and done.stderr.strip().count("\n") == 0 and "STAGE=SECONDS" in done.stderr


def test_stage_3_sets_measured_peak_memory_beside_the_plan():
    """What train_speed.py --json and pretrain.py --plan-memory print (one-line and pretty JSON), read back from a
    stage's output and paired by ZeRO stage."""
    text = "\n".join(
        [
            "ZeRO-1: 400 images/s",
            json.dumps({"stage": 1, "memory_mb": 30720.0, "images_per_s": 400.0}),
            json.dumps({"stage": 3, "memory_mb": 20480.0, "images_per_s": 380.0}),
            json.dumps({"zero_stage": 1, "per_rank_gib": {"total": 25.0}}, indent=1),
            "noise {not json}",
        ]
    )
    found = gpu_checklist.json_objects(text)
    assert len(found) == 3
    assert gpu_checklist.memory_against_plan(found) == ["ZeRO-1 30.0 GiB measured / 25.0 planned (1.20x)"]
