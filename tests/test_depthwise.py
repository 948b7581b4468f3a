"""The depthwise convolution's formulations and the tuner that chooses among them (conv2former/depthwise.py)."""

import itertools
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from conv2former import depthwise as dw
from conv2former.depthwise import FORWARD, GRAD_INPUT, GRAD_WEIGHT, PLAIN, DepthwiseConv2d, DepthwiseTuner

ALL_FORMULATIONS = list(itertools.product(FORWARD, GRAD_INPUT, GRAD_WEIGHT))


@pytest.fixture(autouse=True)
def measured_mode(monkeypatch):
    """These tests choose their own mode (the test session's default is "fixed", see conftest.py)."""
    monkeypatch.setenv(dw.ENV_MODE, "")


@pytest.fixture
def global_tuner():
    """The process's tuner in "measure" mode with nothing chosen yet; back to the session's mode afterwards."""
    tuner = dw.configure("measure")
    tuner.choices.clear()
    tuner.measured.clear()
    yield tuner
    tuner.choices.clear()
    tuner.measured.clear()
    dw.configure("fixed")


def _reference(x, weight, bias, grad_out):
    xi, wi = x.clone().requires_grad_(), weight.clone().requires_grad_()
    bi = bias.clone().requires_grad_() if bias is not None else None
    out = F.conv2d(xi, wi, bi, padding=weight.shape[-1] // 2, groups=x.shape[1])
    out.backward(grad_out)
    return out, xi.grad, wi.grad, bi.grad if bi is not None else None


@pytest.mark.parametrize("formulation", ALL_FORMULATIONS, ids="+".join)
@pytest.mark.parametrize("k,channels_last,bias", [(3, False, True), (7, True, True), (11, False, False)])
def test_every_formulation_equals_conv2d_in_value_and_gradients(formulation, k, channels_last, bias):
    gen = torch.Generator().manual_seed(k)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 12, 17, 13, generator=gen).contiguous(memory_format=fmt)
    weight = torch.randn(12, 1, k, k, generator=gen)
    b = torch.randn(12, generator=gen) if bias else None
    grad_out = torch.randn(3, 12, 17, 13, generator=gen)
    xi, wi = x.clone().requires_grad_(), weight.clone().requires_grad_()
    bi = b.clone().requires_grad_() if bias else None
    out = dw._DepthwiseConv2dFunction.apply(xi, wi, bi, formulation)
    out.backward(grad_out)
    got = (out, xi.grad, wi.grad, bi.grad if bias else None)
    for g, expected, what in zip(got, _reference(x, weight, b, grad_out), ("output", "input", "weight", "bias")):
        if expected is None:
            continue
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-4, msg=f"{what} of {formulation}")
        assert expected.abs().max() > 0.1
    assert out.is_contiguous(memory_format=fmt)  # the output keeps the input's layout


def test_pytorchs_own_formulation_is_exactly_conv2d(global_tuner):
    layer, plain = DepthwiseConv2d(8, 5), torch.nn.Conv2d(8, 8, 5, padding=2, groups=8)
    plain.load_state_dict(layer.state_dict())
    global_tuner.choices[dw.shape_key(torch.zeros(2, 8, 9, 9), layer.weight)] = PLAIN
    x = torch.randn(2, 8, 9, 9)
    a, b = layer(x.clone().requires_grad_()), plain(x.clone().requires_grad_())
    assert torch.equal(a, b) and a.grad_fn.name() == b.grad_fn.name()


def test_measured_choice_is_made_once_and_reused_without_touching_the_random_stream():
    tuner = DepthwiseTuner("measure", rounds=1)
    x, weight = torch.randn(2, 16, 20, 20, requires_grad=True), torch.randn(16, 1, 11, 11, requires_grad=True)
    rng = torch.get_rng_state()
    choice = tuner.formulation(x, weight)
    assert torch.equal(rng, torch.get_rng_state())  # the candidates ran on their own generator
    key = dw.shape_key(x, weight)
    assert tuner.measured == [key] and key == "cpu float32 contiguous 2x16x20x20 k11"
    assert set(tuner.timings[key]) == {"forward", "grad_input", "grad_weight"}
    assert set(tuner.timings[key]["forward"]) == set(FORWARD) and set(tuner.timings[key]["grad_weight"]) == set(
        GRAD_WEIGHT
    )
    for _ in range(3):
        assert tuner.formulation(x, weight) == choice
    assert tuner.measured == [key]  # reused, not measured again
    # another layout or kernel is another choice
    tuner.formulation(x.detach().contiguous(memory_format=torch.channels_last), weight)
    tuner.formulation(x, torch.randn(16, 1, 3, 3))
    assert len(tuner.measured) == 3
    assert "forward" in tuner.describe(key) and "ms" in tuner.describe(key)


def test_the_fastest_candidate_wins_only_by_a_clear_margin():
    assert dw._fastest({"conv2d": 10.0, "transposed": 9.5}, "conv2d") == "conv2d"  # 5% is noise
    assert dw._fastest({"conv2d": 10.0, "transposed": 2.0, "channels_last": 3.0}, "conv2d") == "transposed"


def test_choices_round_trip_through_a_checkpoint_state():
    tuner = DepthwiseTuner("measure", rounds=1)
    x, weight = torch.randn(2, 8, 10, 10, requires_grad=True), torch.randn(8, 1, 7, 7)
    tuner.formulation(x, weight)
    state = json.loads(json.dumps(tuner.state_dict()))  # what a checkpoint stores must be plain data
    resumed = DepthwiseTuner("measure")
    resumed.load_state_dict(state)
    assert resumed.formulation(x, weight) == tuner.formulation(x, weight) and resumed.measured == []
    with pytest.raises(ValueError, match="not a depthwise formulation"):
        resumed.load_state_dict({"cpu float32 contiguous 1x1x1x1 k3": ["fft", "conv2d", "conv2d_backward"]})


def test_disk_cache_carries_choices_to_a_new_process(tmp_path):
    cache = tmp_path / "cache" / "depthwise.json"
    first = DepthwiseTuner("measure", cache_path=str(cache), rounds=1)
    x, weight = torch.randn(2, 8, 12, 12, requires_grad=True), torch.randn(8, 1, 11, 11)
    choice = first.formulation(x, weight)
    data = json.loads(cache.read_text())
    assert list(data) == [dw.machine_fingerprint()]
    assert data[dw.machine_fingerprint()] == {dw.shape_key(x, weight): list(choice)}
    second = DepthwiseTuner("measure", cache_path=str(cache))
    assert second.formulation(x, weight) == choice and second.measured == []
    # entries of other machines are kept, never used here
    data["another processor | AVX2 | torch 0 | 1 threads"] = {dw.shape_key(x, weight): list(PLAIN)}
    cache.write_text(json.dumps(data))
    third = DepthwiseTuner("measure", cache_path=str(cache))
    assert third.formulation(x, weight) == choice
    third.formulation(x, torch.randn(8, 1, 5, 5))
    assert "another processor | AVX2 | torch 0 | 1 threads" in json.loads(cache.read_text())


def test_fixed_and_off_modes_never_measure(monkeypatch):
    x, w11, w3 = torch.randn(2, 8, 12, 12), torch.randn(8, 1, 11, 11), torch.randn(8, 1, 3, 3)
    fixed = DepthwiseTuner("fixed")
    assert fixed.formulation(x, w11) == dw.FIXED_FAST and fixed.formulation(x, w3) == PLAIN
    assert DepthwiseTuner("off").formulation(x, w11) == PLAIN
    assert fixed.measured == [] and fixed.choices == {}
    monkeypatch.setenv(dw.ENV_MODE, "off")  # the environment wins over the configured mode
    assert DepthwiseTuner("measure").mode == "off"
    with pytest.raises(ValueError, match="unknown depthwise mode"):
        DepthwiseTuner("fastest")


def test_a_cache_path_may_start_with_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    tuner = DepthwiseTuner("measure", cache_path="~/.cache/c2f-depthwise.json")
    assert tuner.cache_path == str(tmp_path / ".cache" / "c2f-depthwise.json")


def test_an_unwritable_cache_is_refused_at_once(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cannot write the depthwise cache .*: give a writable local path"):
        DepthwiseTuner("measure", cache_path=str(tmp_path / "file" / "depthwise.json"))


def test_autocast_other_devices_and_flop_counting_use_pytorchs_own():
    tuner = DepthwiseTuner("measure")
    x, weight = torch.randn(2, 8, 12, 12), torch.randn(8, 1, 11, 11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tuner.formulation(x, weight) == PLAIN
    with torch.device("meta"):
        assert tuner.formulation(torch.empty(2, 8, 12, 12), torch.empty(8, 1, 11, 11)) == PLAIN
    with FlopCounterMode(display=False):
        assert tuner.formulation(x, weight) == PLAIN
    assert tuner.measured == []


def test_a_model_measures_each_shape_once_and_trains_like_plain_layers(global_tuner):
    import timm

    model = timm.create_model("conv2former_demo", num_classes=5)
    plain = timm.create_model("conv2former_demo", num_classes=5, fast_depthwise=False)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for m in (model, plain):
        m(x).square().mean().backward()
    measured = list(global_tuner.measured)
    kernels = {key.rsplit(" ", 1)[1] for key in measured}
    assert kernels == {"k3", "k11"} or kernels == {"k3", "k7"}  # the modulation and the MLP's 3x3
    assert len(measured) == len(set(measured))
    model(x).square().mean().backward()
    assert global_tuner.measured == measured
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad / 2, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_processes_sharing_a_cache_measure_one_at_a_time_and_agree(tmp_path):
    """Two processes (the ranks of a node) with one cache: one measures, the other takes its choice."""
    import subprocess
    import sys

    cache = tmp_path / "depthwise.json"
    script = (
        "import json, torch; from conv2former import depthwise as dw; "
        f"t = dw.DepthwiseTuner('measure', cache_path={str(cache)!r}); "
        "c = t.formulation(torch.randn(4, 32, 28, 28, requires_grad=True), torch.randn(32, 1, 11, 11)); "
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


def test_a_bad_mode_in_the_environment_is_a_warning_at_import_and_an_error_when_configured():
    import subprocess
    import sys

    script = (
        "from conv2former import depthwise as dw; print(dw.tuner().mode)\n"
        "try:\n    dw.configure('measure')\nexcept ValueError as err:\n    print('refused:', err)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ, C2F_DEPTHWISE="bogus")
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr
    assert done.stdout.splitlines()[0] == "measure"
    assert "refused: unknown depthwise mode 'bogus' (C2F_DEPTHWISE)" in done.stdout
    assert done.stderr.strip().startswith("warning: unknown depthwise mode 'bogus'")
