"""CPU tuning (conv2former/cpu): the depthwise tuner that times the formulations of conv2former/depthwise.py, its
disk cache and checkpoint state, the settings' one validation, and ``CpuTuning.install`` making it the process's
chooser. (The malloc policy: tests/test_cpu_malloc.py; the engine's use of both: tests/test_pretrain.py.)"""

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import conv2former  # noqa: F401  (registers the variants)
from conv2former import depthwise as dw
from conv2former.config import CpuConfig
from conv2former.cpu import ENV_MODE, CpuTuning, settings
from conv2former.cpu import depthwise_tuner as dt
from conv2former.cpu.depthwise_tuner import DepthwiseTuner, machine_fingerprint
from conv2former.depthwise import FORWARD, GRAD_WEIGHT, PLAIN, candidates
from conv2former.errors import UserError


@pytest.fixture(autouse=True)
def configured_mode(monkeypatch):
    """These tests choose their own mode (the test session's default is C2F_DEPTHWISE=fixed, see conftest.py)."""
    monkeypatch.setenv(ENV_MODE, "")


@pytest.fixture
def installed():
    """``CpuTuning.install`` for a test; the process's chooser as it was afterwards (the test session runs with none)."""
    previous = dw.use_chooser(None)
    yield lambda **settings: CpuTuning.install(CpuConfig(keep_freed_memory=False, **settings))
    dw.use_chooser(previous)


def test_measured_choice_is_made_once_and_reused_without_touching_the_random_stream():
    tuner = DepthwiseTuner("measure", rounds=1)
    x, weight = torch.randn(2, 16, 20, 20, requires_grad=True), torch.randn(16, 1, 11, 11, requires_grad=True)
    rng = torch.get_rng_state()
    choice = tuner(x, weight)
    assert torch.equal(rng, torch.get_rng_state())  # the candidates ran on their own generator
    key = dw.shape_key(x, weight)
    assert tuner.measured == [key] and key == "cpu float32 contiguous 2x16x20x20 k11"
    assert set(tuner.timings[key]) == {"forward", "grad_input", "grad_weight"}
    assert set(tuner.timings[key]["forward"]) == set(candidates(FORWARD, torch.device("cpu")))
    assert set(tuner.timings[key]["grad_weight"]) == set(candidates(GRAD_WEIGHT, torch.device("cpu")))
    for _ in range(3):
        assert tuner(x, weight) == choice
    assert tuner.measured == [key]  # reused, not measured again
    # another layout or kernel is another choice
    tuner(x.detach().contiguous(memory_format=torch.channels_last), weight)
    tuner(x, torch.randn(16, 1, 3, 3))
    assert len(tuner.measured) == 3


def test_the_fastest_candidate_wins_only_by_a_clear_margin():
    assert dt._fastest({"conv2d": 10.0, "transposed": 9.5}, "conv2d") == "conv2d"  # 5% is noise
    assert dt._fastest({"conv2d": 10.0, "transposed": 2.0, "channels_last": 3.0}, "conv2d") == "transposed"


def test_choices_round_trip_through_a_checkpoint_state():
    tuner = DepthwiseTuner("measure", rounds=1)
    x, weight = torch.randn(2, 8, 10, 10, requires_grad=True), torch.randn(8, 1, 7, 7)
    tuner(x, weight)
    state = json.loads(json.dumps(tuner.state_dict()))  # what a checkpoint stores must be plain data
    resumed = DepthwiseTuner("measure")
    resumed.load_state_dict(state)
    assert resumed(x, weight) == tuner(x, weight) and resumed.measured == [] and resumed.loaded == 1
    with pytest.raises(ValueError):
        resumed.load_state_dict({"cpu float32 contiguous 1x1x1x1 k3": ["fft", "conv2d", "conv2d_backward"]})


def test_disk_cache_carries_choices_to_a_new_process(tmp_path):
    cache = tmp_path / "depthwise.json"
    first = DepthwiseTuner("measure", cache_path=str(cache), rounds=1)
    x, weight = torch.randn(2, 8, 12, 12, requires_grad=True), torch.randn(8, 1, 11, 11)
    choice = first(x, weight)
    data = json.loads(cache.read_text())
    assert data == {machine_fingerprint(): {dw.shape_key(x, weight): list(choice)}}
    second = DepthwiseTuner("measure", cache_path=str(cache))
    assert second(x, weight) == choice and second.measured == []
    # entries of other machines are kept, never used here
    data["another processor | AVX2 | torch 0 | 1 threads"] = {dw.shape_key(x, weight): list(PLAIN)}
    cache.write_text(json.dumps(data))
    third = DepthwiseTuner("measure", cache_path=str(cache))
    assert third(x, weight) == choice
    third(x, torch.randn(8, 1, 5, 5))
    assert "another processor | AVX2 | torch 0 | 1 threads" in json.loads(cache.read_text())


@pytest.mark.parametrize("shape", [(8, 768, 14, 11), (3, 40, 13, 7)])  # L's stage 3 at 224 px; an odd one
def test_the_accuracy_gate_rejects_bf16_batch_groups_however_fast_it_is(shape, caplog):
    """bf16: ``batch_groups`` rounds each sample's weight-gradient partial sum to bf16 before the batch sum (0.08-0.66
    of an entry off). Timed as the fastest by far, it is still not chosen: the gate rejects it on the first batch,
    logs and records the error, and the formulation chosen instead matches fp32 ``F.conv2d`` within 2 bf16 ulps."""
    from conv2former import depthwise_gate

    batch, channels, size, k = shape

    def batch_groups_fastest(candidates, rounds):
        return {name: 1.0 if name == "batch_groups" else 10.0 for name in candidates}

    tuner = DepthwiseTuner("measure", timer=batch_groups_fastest)
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(batch, channels, size, size, generator=gen).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(channels, 1, k, k, generator=gen) / k).to(torch.bfloat16).requires_grad_()
    with caplog.at_level("WARNING"):
        choice = tuner(x, weight)
    key = dw.shape_key(x, weight)
    assert choice[2] == "conv2d_backward" and "batch_groups" not in tuner.timings[key]["grad_weight"]
    assert "batch_groups (grad_weight, error" in tuner.rejected[key] and "rejected" in tuner.describe(key)
    assert tuner.summary()["rejected"] == {key: tuner.rejected[key]}
    assert any("batch_groups" in record.getMessage() for record in caplog.records)

    g = torch.randn(x.shape, generator=gen).to(torch.bfloat16)
    dw.use_chooser(tuner)
    try:
        out = dw.depthwise_conv2d(x, weight)
        out.backward(g)
    finally:
        dw.use_chooser(None)
    want = depthwise_gate.reference(x.detach(), weight.detach(), torch.zeros(channels), g)
    limit = depthwise_gate.tolerance(torch.bfloat16)
    for got, part in ((out, "forward"), (x.grad, "grad_input"), (weight.grad, "grad_weight")):
        assert depthwise_gate.part_error(got.float(), want[part]) <= limit, part
    # batch_groups itself, on the same tensors, is what the gate says
    found = depthwise_gate.errors(depthwise_gate.sample_inputs(x, weight), {"grad_weight": ["batch_groups"]})
    assert found["grad_weight"]["batch_groups"] > 2 * limit


def test_the_accuracy_gate_keeps_fp32_choices_and_plain_pytorch_always():
    """fp32: every candidate passes (batch_groups included); PyTorch's own is eligible even where its error is
    counted (it is what the model computes with no chooser)."""
    from conv2former import depthwise_gate

    x, weight = torch.randn(2, 16, 20, 20), torch.randn(16, 1, 11, 11)
    names = {part: list(candidates(table, torch.device("cpu"))) for part, table in dw.PARTS}
    eligible, found = depthwise_gate.gate(depthwise_gate.sample_inputs(x, weight), names)
    assert eligible == names and max(max(e.values()) for e in found.values()) < depthwise_gate.tolerance(torch.float32)
    fixed = DepthwiseTuner("fixed")
    assert fixed(x, weight) == dt.FIXED_FAST and fixed.rejected == {}


def test_fixed_and_off_modes_never_measure():
    x, w11, w3 = torch.randn(2, 8, 12, 12), torch.randn(8, 1, 11, 11), torch.randn(8, 1, 3, 3)
    fixed = DepthwiseTuner("fixed")
    assert fixed(x, w11) == dt.FIXED_FAST and fixed(x, w3) == PLAIN
    assert DepthwiseTuner("off")(x, w11) is None
    assert fixed.measured == [] and fixed.choices == {}


def test_other_devices_and_flop_counting_are_left_plain():
    tuner = DepthwiseTuner("measure")
    x, weight = torch.randn(2, 8, 12, 12), torch.randn(8, 1, 11, 11)
    with torch.device("meta"):
        assert tuner(torch.empty(2, 8, 12, 12), torch.empty(8, 1, 11, 11)) is None
    with FlopCounterMode(display=False):
        assert tuner(x, weight) is None
    assert tuner.measured == []


def test_settings_are_validated_once_with_the_environment_winning(tmp_path, monkeypatch):
    assert settings(CpuConfig()).depthwise == "measure"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert settings(CpuConfig(depthwise_cache="~/.cache/c2f.json")).depthwise_cache == str(tmp_path / ".cache/c2f.json")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="^cpu.depthwise_cache: "):
        settings(CpuConfig(depthwise_cache=str(tmp_path / "file" / "depthwise.json")))
    with pytest.raises(UserError, match="^cpu.depthwise: "):
        settings(CpuConfig(depthwise="fastest"))
    monkeypatch.setenv(ENV_MODE, "off")
    assert settings(CpuConfig(depthwise="measure")).depthwise == "off"
    monkeypatch.setenv(ENV_MODE, "bogus")
    with pytest.raises(UserError, match=f"^{ENV_MODE}: "):
        settings(CpuConfig())


def test_install_makes_the_tuner_the_process_chooser_and_uninstall_restores_plain(installed):
    layer, x = dw.DepthwiseConv2d(8, 11), torch.randn(2, 8, 12, 12, requires_grad=True)
    tuning = installed(depthwise="fixed")
    out = layer(x)
    assert "DepthwiseConv2dFunction" in type(out.grad_fn).__name__
    assert tuning.summary()["depthwise"] == {
        "mode": "fixed",
        "formulations": 0,
        "measured": 0,
        "measure_seconds": 0,
        "rejected": {},
    }
    tuning.uninstall()
    assert "DepthwiseConv2dFunction" not in type(layer(x).grad_fn).__name__
    with pytest.raises(RuntimeError):  # uninstalled twice: it is not the chooser any more
        tuning.uninstall()


def test_a_model_measures_each_shape_once_and_trains_like_plain_layers(installed):
    tuning = installed(depthwise="measure")
    model = timm.create_model("conv2former_demo", num_classes=5)
    plain = timm.create_model("conv2former_demo", num_classes=5, fast_depthwise=False)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for m in (model, plain):
        m(x).square().mean().backward()
    measured = list(tuning.tuner.measured)
    kernels = {key.rsplit(" ", 1)[1] for key in measured}
    assert kernels == {"k3", "k11"} or kernels == {"k3", "k7"}  # the modulation and the MLP's 3x3
    assert len(measured) == len(set(measured)) and len(tuning.new_measurements()) == len(measured)
    model(x).square().mean().backward()
    assert tuning.tuner.measured == measured and tuning.new_measurements() == []
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad / 2, q.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_torch_compile_traces_the_fast_depthwise_backward(installed):
    """torch.compile (inductor on CPU) compiles the model with the custom depthwise backward: same outputs, grads."""
    installed(depthwise="fixed")
    model = timm.create_model("conv2former_demo", num_classes=10)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    expected = model(x)
    layer = model.stages[0][0].attn.att[2]
    probe = layer(torch.randn(1, layer.weight.shape[0], 16, 16, requires_grad=True))
    assert "DepthwiseConv2dFunction" in type(probe.grad_fn).__name__  # the custom backward is what compiles
    expected.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = torch.compile(model)(x)
    out.square().mean().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.slow
def test_processes_sharing_a_cache_measure_one_at_a_time_and_agree(tmp_path):
    """Two processes (the ranks of a node) with one cache: one measures, the other takes its choice."""
    cache = tmp_path / "depthwise.json"
    script = (
        "import json, torch; from conv2former.cpu.depthwise_tuner import DepthwiseTuner; "
        f"t = DepthwiseTuner('measure', cache_path={str(cache)!r}); "
        "c = t(torch.randn(4, 32, 28, 28, requires_grad=True), torch.randn(32, 1, 11, 11)); "
        "print(json.dumps([list(c), len(t.measured)]))"
    )
    env = dict(os.environ, C2F_DEPTHWISE="", OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)
    ]
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert results[0][0] == results[1][0]
    assert sorted(n for _, n in results) == [0, 1]  # exactly one of them measured
    (entries,) = json.loads(cache.read_text()).values()  # one machine, one shape
    assert list(entries.values()) == [results[0][0]]


@pytest.mark.slow
def test_importing_the_model_installs_nothing():
    """The model file does not import a tuner: a fresh process that builds and runs a model has no chooser, and a
    bad C2F_DEPTHWISE matters only when tuning is installed."""
    script = (
        "import timm, torch, sys, conv2former; from conv2former import depthwise as dw\n"
        "timm.create_model('conv2former_demo')(torch.randn(1, 3, 32, 32))\n"
        "print(dw.use_chooser(None) is None, 'conv2former.cpu' in sys.modules)"
    )
    env = dict(os.environ, C2F_DEPTHWISE="bogus")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.split() == ["True", "False"]


@pytest.mark.slow
def test_a_fixed_tuner_adds_no_recompiles(installed):
    """torch.compile with the "fixed" rule installed (what a run's tuning leaves in the process): the rule is applied
    while tracing without reading the tuner's state, so the gate filling its cache on the calls that run eagerly does
    not invalidate the graphs (it did: the graphs of 32 px were compiled again at the second call at 32 px)."""
    import torch._dynamo

    installed(depthwise="fixed")
    model = timm.create_model("conv2former_demo", num_classes=4)
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=False)
    counts = []
    try:
        for size in (32, 64, 32):
            compiled(torch.randn(2, 3, size, size)).sum().backward()
            counts.append(len(compiles))
    finally:
        torch._dynamo.reset()
    assert counts[2] == counts[1] == 2 * counts[0], counts
