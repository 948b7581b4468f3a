"""The CPU chooser of depthwise formulations: ``DepthwiseTuner`` times the candidates of conv2former/depthwise.py's
table on first use of each shape and keeps the fastest, like cuDNN's benchmark mode (no library measures these
alternative formulations for us, so this is ours).

On CPU which formulation is fastest depends on the processor (docs/performance.md): on NCHW tensors with torch's AVX2
code paths PyTorch's 11x11 forward runs 5-17x slower than the same product as a transposed convolution with the
flipped kernel or on a channels_last copy, while with AVX-512 it is the fastest; PyTorch's weight gradient for 11x11
kernels is 2-30x slower than one forward convolution with the batch folded into the groups, and at 3x3 PyTorch's own
is the fastest everywhere.

Modes: ``measure`` (time each part's candidates on first use and keep the fastest: PyTorch's own unless another is at
least ``MIN_GAIN`` faster, so noise does not flip choices), ``fixed`` (a rule with no timing, the same on every run:
the faster gradients for k >= 5 in fp32, else PyTorch's own), ``off`` (plain ``nn.Conv2d``). In ``measure`` and
``fixed`` a candidate must first pass conv2former/depthwise_gate.py's accuracy gate on the first batch of its shape
(its three parts against an fp32 ``F.conv2d`` within the dtype's tolerance); what the gate rejected, with the errors,
is kept in ``rejected`` and in the line ``describe`` gives for the choice. Measured choices can be
kept in a JSON file per ``machine_fingerprint()``, shared under a file lock by the ranks of a node. The tuner's
``state_dict`` goes into each rank's checkpoint, so a resumed run computes exactly what the interrupted one did.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import platform
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from conv2former import depthwise_gate
from conv2former.depthwise import (
    FORWARD,
    GRAD_INPUT,
    GRAD_WEIGHT,
    PARTS,
    PLAIN,
    Formulation,
    candidates,
    shape_key,
    valid_formulation,
)

log = logging.getLogger(__name__)

MODES = ("measure", "fixed", "off")
MIN_GAIN = 0.10  # another candidate replaces PyTorch's own only when at least 10% faster
FIXED_MIN_KERNEL = 5  # the "fixed" rule: the faster gradients from 5x5 up (3x3 is faster PyTorch's way)
FIXED_FAST: Formulation = ("conv2d", "conv2d", "batch_groups")
GATE_VERSION = 1  # in the disk cache's machine key: choices made before (or by another) gate are measured again


def machine_fingerprint() -> str:
    """What the choices of a disk cache are valid for: processor, torch's CPU dispatch, torch version, threads, and
    the accuracy gate (choices recorded before it existed are not reused)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    except OSError:  # no /proc (not Linux): the platform's name stays
        pass
    return (
        f"{model} | {torch.backends.cpu.get_cpu_capability()} | torch {torch.__version__} | "
        f"{torch.get_num_threads()} threads | accuracy gate {GATE_VERSION}"
    )


Timer = Callable[[Dict[str, Callable[[], torch.Tensor]], int], Dict[str, float]]


def _best_ms(candidates: Dict[str, Callable[[], torch.Tensor]], rounds: int) -> Dict[str, float]:
    """Best-of-``rounds`` milliseconds of each candidate, the candidates interleaved round by round after a warm-up;
    on a GPU each run is timed between two synchronisations (the kernels' time, like cuDNN's benchmark mode)."""

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    for run in candidates.values():
        run()
    best = {name: float("inf") for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return best


def _fastest(times: Dict[str, float], reference: str) -> str:
    """The fastest candidate; PyTorch's own (``reference``) unless another is at least MIN_GAIN faster."""
    name = min(times, key=times.__getitem__)
    return name if times[name] < (1 - MIN_GAIN) * times[reference] else reference


def _tracing_or_intercepted() -> bool:
    """True while torch.compile traces or a TorchDispatchMode (FlopCounterMode, fake tensors) sees every op."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


class DepthwiseTuner:
    """Chooses each depthwise convolution's formulation on ``device_type`` per ``shape_key`` and remembers it; a
    chooser for ``conv2former.depthwise.use_chooser``. ``mode`` and ``cache_path`` are taken as given:
    conv2former.cpu.settings validates them (a GPU's: conv2former/gpu_depthwise.py). On a GPU the candidates include
    PyTorch's native kernel and the Triton kernels (``depthwise.runs_on``). ``timer``: how candidates are timed
    (tests give stub timings)."""

    def __init__(
        self,
        mode: str = "measure",
        cache_path: Optional[str] = None,
        rounds: int = 3,
        device_type: str = "cpu",
        timer: Timer = _best_ms,
    ) -> None:
        self.mode = mode
        self.device_type = device_type
        self.timer = timer
        self.cache_path = cache_path
        self.rounds = rounds
        self.choices: Dict[str, Formulation] = {}
        self.fixed_choices: Dict[str, Formulation] = {}  # mode "fixed": the rule's choice per key, after the gate
        self.timings: Dict[str, Dict[str, Dict[str, float]]] = {}  # key -> part -> candidate -> ms
        self.measured: List[str] = []  # keys measured by this process, in order
        self.measure_seconds = 0.0
        self.rejected: Dict[str, str] = {}  # key -> the candidates the accuracy gate rejected, with their errors
        self.loaded = 0  # how many choices the last load_state_dict adopted

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> Optional[Formulation]:
        """The formulation for this call; None (plain) off the CPU, in mode "off", or while tracing in "measure"."""
        if self.mode == "off" or x.device.type != self.device_type:
            return None
        if self.mode == "fixed":
            return self._fixed(x, weight)
        key = shape_key(x, weight)
        choice = self.choices.get(key)
        if choice is None:
            choice = self._choose(key, x, weight)
            if choice is not None:  # never time inside torch.compile's tracing or under a FlopCounter-like mode
                self.choices[key] = choice
        return choice

    def _fixed(self, x: torch.Tensor, weight: torch.Tensor) -> Formulation:
        """The "fixed" rule's formulation, its parts that fail the accuracy gate (on the first batch of each shape)
        replaced by PyTorch's own. While torch.compile traces (or a dispatch mode intercepts) the rule applies as it
        is and no state is read, so compiled graphs carry no guard on this tuner: the rule picks other formulations
        only in fp32, where every candidate passes the gate."""
        if not (x.dtype == torch.float32 and weight.shape[-1] >= FIXED_MIN_KERNEL):
            return PLAIN
        if _tracing_or_intercepted():
            return FIXED_FAST
        key = shape_key(x, weight)
        if key not in self.fixed_choices:
            names = {part: [name] for (part, _), name in zip(PARTS, FIXED_FAST)}
            eligible, found = depthwise_gate.gate(depthwise_gate.sample_inputs(x, weight), names)
            self._record_rejections(key, found, eligible, x.dtype)
            self.fixed_choices[key] = valid_formulation(
                fast if fast in eligible[part] else plain for (part, _), fast, plain in zip(PARTS, FIXED_FAST, PLAIN)
            )
        return self.fixed_choices[key]

    def _record_rejections(
        self, key: str, found: depthwise_gate.Errors, eligible: Dict[str, List[str]], dtype: torch.dtype
    ) -> None:
        rejected = depthwise_gate.describe_rejected(found, dtype, eligible)
        if rejected:
            self.rejected[key] = rejected
            log.warning("depthwise %s: the accuracy gate rejected %s", key, rejected)

    def _choose(self, key: str, x: torch.Tensor, weight: torch.Tensor) -> Optional[Formulation]:
        """The disk cache's choice, else a measured one (None where measuring is not possible now). With a disk
        cache, processes measure one at a time under a file lock, so the ranks of a node time the candidates
        without disturbing each other and then share one choice."""
        if self.cache_path is None:
            return None if _tracing_or_intercepted() else self._measure(key, x, weight)
        with open(self.cache_path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                recorded = self._read_disk().get(machine_fingerprint(), {}).get(key)
                if recorded is not None:
                    return valid_formulation(recorded)
                if _tracing_or_intercepted():
                    return None
                choice = self._measure(key, x, weight)
                self._to_disk(key, choice)
                return choice
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _measure(self, key: str, x: torch.Tensor, weight: torch.Tensor) -> Formulation:
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(0)  # never the global generator: measuring must not change a run
        fmt = torch.channels_last if "channels_last" in key else torch.contiguous_format
        device = x.device

        def sample(shape: Sequence[int]) -> torch.Tensor:
            return torch.randn(tuple(shape), generator=gen, dtype=x.dtype).to(device)

        xs, gs = sample(x.shape).contiguous(memory_format=fmt), sample(x.shape).contiguous(memory_format=fmt)
        ws, bs = sample(weight.shape), sample(weight.shape[:1])
        tables = {
            "forward": {
                n: f
                for n, f in candidates(FORWARD, device).items()
                if not (n == "channels_last" and fmt == torch.channels_last)
            },
            "grad_input": candidates(GRAD_INPUT, device),
            "grad_weight": candidates(GRAD_WEIGHT, device),
        }
        eligible, found = depthwise_gate.gate(depthwise_gate.sample_inputs(x, weight), tables)
        self._record_rejections(key, found, eligible, x.dtype)
        forward, grad_input, grad_weight = ({n: tables[p][n] for n in eligible[p]} for p in tables)
        with torch.no_grad():
            times = {
                "forward": self.timer({n: functools.partial(f, xs, ws, bs) for n, f in forward.items()}, self.rounds),
                "grad_input": self.timer(
                    {n: functools.partial(f, gs, xs, ws) for n, f in grad_input.items()}, self.rounds
                ),
                "grad_weight": self.timer(
                    {n: functools.partial(f, gs, xs, ws) for n, f in grad_weight.items()}, self.rounds
                ),
            }
        self.timings[key] = times
        self.measured.append(key)
        self.measure_seconds += time.perf_counter() - start
        return valid_formulation(_fastest(times[part], reference) for part, reference in zip(times, PLAIN))

    def summary(self) -> Dict[str, object]:
        """The tuner's part of a run's summary: its mode, how many choices, what it measured and rejected."""
        return {
            "mode": self.mode,
            "formulations": len(self.choices),
            "measured": len(self.measured),
            "measure_seconds": round(self.measure_seconds, 2),
            "rejected": dict(self.rejected),
        }

    # -- the optional disk cache ---------------------------------------------------------------------------------
    def _read_disk(self) -> Dict[str, Dict[str, List[str]]]:
        assert self.cache_path is not None
        try:
            with open(self.cache_path) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _to_disk(self, key: str, choice: Formulation) -> None:
        assert self.cache_path is not None
        data = self._read_disk()
        data.setdefault(machine_fingerprint(), {})[key] = list(choice)
        folder = os.path.dirname(os.path.abspath(self.cache_path))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".depthwise-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.cache_path)

    # -- what a checkpoint keeps -----------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, List[str]]:
        return {key: list(choice) for key, choice in sorted(self.choices.items())}

    def load_state_dict(self, state: Dict[str, List[str]]) -> None:
        """Adopt recorded choices (a resumed run computes exactly what the interrupted one did)."""
        self.choices.update({key: valid_formulation(choice) for key, choice in state.items()})
        self.loaded = len(state)

    def describe(self, key: str) -> str:
        forward, grad_input, grad_weight = self.choices[key]
        line = f"{key}: forward {forward}, grad_input {grad_input}, grad_weight {grad_weight}"
        times = self.timings.get(key)
        if times:
            parts = "; ".join(", ".join(f"{n} {ms:.2f} ms" for n, ms in part.items()) for part in times.values())
            line += f" ({parts})"
        if key in self.rejected:
            line += f"; rejected by the accuracy gate: {self.rejected[key]}"
        return line
