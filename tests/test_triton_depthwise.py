"""The Triton depthwise kernels (conv2former/triton_depthwise.py) under Triton's interpreter on the CPU: value and
all three gradients equal F.conv2d's (fp32 within 1e-5 of the scale, bf16 within one bf16 ulp: the kernels
accumulate in fp32 and round once), in both layouts, odd sizes, kernels larger than the map, 3 to 21 px; and the
chooser choosing them with stub timings. One subprocess (the interpreter is chosen before Triton is imported)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conv2former import depthwise
from conv2former.engine.distributed import python_path
from conv2former.errors import UserError
from conv2former.gpu_depthwise import TRITON, GpuDepthwise

REPO = Path(__file__).resolve().parents[1]
BF16_ULP = 2.0**-7  # bf16 keeps 8 significant bits: one ulp is at most 2^-7 of the value


@pytest.fixture(scope="module")
def interpreted():
    """The cases' results, from two processes side by side (the interpreter uses one core each)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=python_path(str(REPO)), OMP_NUM_THREADS="1")
    script = str(REPO / "tests" / "triton_depthwise_cases.py")
    procs = [subprocess.Popen([sys.executable, script, str(part), "2"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for part in range(2)]  # fmt: skip
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return results


@pytest.mark.slow
def test_every_kernel_equals_conv2d_in_value_and_gradients(interpreted):
    cases = [r for r in interpreted if "case" in r]
    assert len(cases) == 6 and {r["case"][4] for r in cases} == {3, 5, 7, 11, 21}
    for result in cases:
        bf16 = "bfloat16" in result["case"][-1]
        for part, error in result["errors"].items():
            assert error["shape_ok"] and error["dtype"] == result["case"][-1], (result["case"], part)
            assert error["max_rel_to_scale"] <= (BF16_ULP if bf16 else 1e-5), (result["case"], part, error)
        assert result["layout_kept"]


@pytest.mark.slow
def test_the_chooser_takes_triton_when_it_times_fastest_and_reuses_the_record(interpreted):
    chooser = next(r["chooser"] for r in interpreted if "chooser" in r)
    key = "cpu float32 contiguous 2x4x6x7 k5"
    assert chooser["choices"] == {key: list(TRITON)} and chooser["timed"] == [key]
    assert max(chooser["max_diffs"]) < 1e-4  # the layer through the Triton kernels equals nn.Conv2d
    assert chooser["reused"] == list(TRITON)  # from the record, not timed again


def test_gpu_modes_pin_or_measure_and_leave_cpu_tensors_alone():
    x, w = torch.randn(1, 4, 6, 6), torch.randn(4, 1, 5, 5)
    previous = depthwise.use_chooser(None)
    try:
        for mode, deterministic in (("measure", False), ("plain", False), ("triton", False), ("measure", True)):
            chooser = GpuDepthwise.install(mode, deterministic)
            assert chooser(x, w) is None  # a CPU tensor: plain F.conv2d
            assert chooser.mode == ("plain" if deterministic else mode)
            assert (chooser.tuner is not None) == (chooser.mode == "measure")
            chooser.uninstall()
        with pytest.raises(UserError):
            GpuDepthwise("cudnn")
    finally:
        depthwise.use_chooser(previous)


def test_native_and_triton_are_offered_only_where_they_run():
    cpu = torch.device("cpu")
    assert not depthwise.runs_on("native", cpu)
    assert depthwise.runs_on("triton", cpu) == (os.environ.get("TRITON_INTERPRET") == "1")
    assert depthwise.runs_on("native", torch.device("cuda")) and depthwise.runs_on("triton", torch.device("cuda"))
    assert "native" not in depthwise.candidates(depthwise.FORWARD, cpu)
