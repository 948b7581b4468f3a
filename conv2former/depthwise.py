"""Conv2Former's depthwise convolutions (the k x k modulation, the MLP's 3x3), computed the fastest way measured.

Same parameters, same names and the same math as ``nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)``. A
stride-1 "same" depthwise convolution and both of its gradients can each be computed several ways, and on CPU
which is fastest depends on the processor, the shape and the layout (docs/performance.md, "Depthwise formulations,
per processor"): on NCHW tensors with torch's AVX2 code paths PyTorch's 11x11 forward runs 5-17x slower than the
same product as a transposed convolution with the flipped kernel or on a channels_last copy, while with AVX-512 it
is the fastest; PyTorch's weight gradient for 11x11 kernels is 2-30x slower than one forward convolution with the
batch folded into the groups, and at 3x3 PyTorch's own is the fastest everywhere.

Three parts, each chosen on its own (every candidate of a part gives the same tensor up to float rounding):

    forward      conv2d             F.conv2d(x, w, padding=k // 2, groups=C)                 (PyTorch's own)
                 transposed         F.conv_transpose2d(x, flip(w), padding=k // 2, groups=C)
                 channels_last      F.conv2d on a channels_last copy of x, the output back in x's layout
    grad_input   conv2d_backward    PyTorch's convolution_backward                            (PyTorch's own)
                 conv2d             F.conv2d(grad_out, flip(w), padding=k // 2, groups=C)
                 transposed         F.conv_transpose2d(grad_out, w, padding=k // 2, groups=C)
    grad_weight  conv2d_backward    PyTorch's convolution_backward                            (PyTorch's own)
                 batch_groups       sum over the batch of conv2d(pad(x) as (1, C*B, H+2p, W+2p),
                                                                 grad_out as (C*B, 1, H, W) kernels, groups=C*B)

The choice is made per (device, dtype, layout, input shape, kernel) by a ``DepthwiseTuner`` (like cuDNN's benchmark
mode): ``measure`` times each part's candidates on first use and keeps the fastest (PyTorch's own unless another is
at least ``MIN_GAIN`` faster, so noise does not flip choices), cached in memory and optionally in a JSON file; ``fixed``
is a rule with no timing (the faster gradients for k >= 5 in fp32, else PyTorch's own), the same on every run; ``off``
is plain ``nn.Conv2d`` everywhere. The training engine stores each rank's choices in its checkpoints and reuses
them on resume, so a resumed run computes exactly what the interrupted one did. Where every part is PyTorch's own
(and always on CUDA, under autocast, and for integer tensors) the layer is exactly ``F.conv2d``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "DepthwiseConv2d",
    "DepthwiseTuner",
    "depthwise_conv2d",
    "tuner",
    "configure",
    "writable_cache",
    "MODES",
    "PLAIN",
]

Formulation = Tuple[str, str, str]  # (forward, grad_input, grad_weight)
PLAIN: Formulation = ("conv2d", "conv2d_backward", "conv2d_backward")
MODES = ("measure", "fixed", "off")
ENV_MODE = "C2F_DEPTHWISE"  # forces the mode everywhere (tests that compare separate runs bit for bit use "fixed")
MIN_GAIN = 0.10  # another candidate replaces PyTorch's own only when at least 10% faster
FIXED_MIN_KERNEL = 5  # the "fixed" rule: the faster gradients from 5x5 up (3x3 is faster PyTorch's way)
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _pad(weight: torch.Tensor) -> int:
    return weight.shape[-1] // 2


def _backward(grad_out, x, weight, mask) -> Tuple[Optional[torch.Tensor], ...]:
    p = _pad(weight)
    return torch.ops.aten.convolution_backward(
        grad_out, x, weight, None, [1, 1], [p, p], [1, 1], False, [0, 0], x.shape[1], mask
    )


def _grad_weight_batch_groups(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    batch, channels, height, width = x.shape
    k, p = weight.shape[-1], _pad(weight)
    # pad and put channels first in one copy: (C, B, H + 2p, W + 2p)
    x_padded = x.new_zeros(channels, batch, height + 2 * p, width + 2 * p)
    x_padded[:, :, p : p + height, p : p + width] = x.transpose(0, 1)
    x_padded = x_padded.view(1, channels * batch, height + 2 * p, width + 2 * p)
    kernels = grad_out.transpose(0, 1).reshape(channels * batch, 1, height, width)
    grad_w = F.conv2d(x_padded, kernels, groups=channels * batch)
    return grad_w.view(channels, batch, k, k).sum(1, keepdim=True)


def _forward_channels_last(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    out = F.conv2d(x.contiguous(memory_format=torch.channels_last), w, b, padding=_pad(w), groups=x.shape[1])
    return out.contiguous(memory_format=_memory_format(x))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


FORWARD: Dict[str, Callable[..., torch.Tensor]] = {
    "conv2d": lambda x, w, b: F.conv2d(x, w, b, padding=_pad(w), groups=x.shape[1]),
    "transposed": lambda x, w, b: F.conv_transpose2d(x, w.flip(-1, -2), b, padding=_pad(w), groups=x.shape[1]),
    "channels_last": _forward_channels_last,
}
GRAD_INPUT: Dict[str, Callable[..., torch.Tensor]] = {
    "conv2d_backward": lambda g, x, w: _backward(g, x, w, [True, False, False])[0],
    "conv2d": lambda g, x, w: F.conv2d(g, w.flip(-1, -2), padding=_pad(w), groups=x.shape[1]),
    "transposed": lambda g, x, w: F.conv_transpose2d(g, w, padding=_pad(w), groups=x.shape[1]),
}
GRAD_WEIGHT: Dict[str, Callable[..., torch.Tensor]] = {
    "conv2d_backward": lambda g, x, w: _backward(g, x, w, [False, True, False])[1],
    "batch_groups": _grad_weight_batch_groups,
}
PARTS = (("forward", FORWARD), ("grad_input", GRAD_INPUT), ("grad_weight", GRAD_WEIGHT))
FIXED_FAST: Formulation = ("conv2d", "conv2d", "batch_groups")


class _DepthwiseConv2dFunction(torch.autograd.Function):
    """Stride-1 "same" depthwise convolution with the forward and the two gradients computed as ``formulation`` says."""

    @staticmethod
    def forward(ctx, x, weight, bias, formulation: Formulation) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.formulation = formulation
        return FORWARD[formulation[0]](x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, weight = ctx.saved_tensors
        _, grad_input, grad_weight = ctx.formulation
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = GRAD_INPUT[grad_input](grad_out, x, weight)
        if ctx.needs_input_grad[1]:
            grad_w = GRAD_WEIGHT[grad_weight](grad_out, x, weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None


def shape_key(x: torch.Tensor, weight: torch.Tensor) -> str:
    """What a choice depends on, as a string: 'cpu float32 contiguous 8x72x56x56 k11'."""
    layout = "channels_last" if _memory_format(x) == torch.channels_last else "contiguous"
    dtype = str(x.dtype).replace("torch.", "")
    return f"{x.device.type} {dtype} {layout} {'x'.join(map(str, x.shape))} k{weight.shape[-1]}"


def machine_fingerprint() -> str:
    """What the timings of a disk cache are valid for: processor, torch's CPU dispatch, torch version, threads."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    except OSError:  # no /proc (not Linux): the platform's name stays
        pass
    return (
        f"{model} | {torch.backends.cpu.get_cpu_capability()} | torch {torch.__version__} | "
        f"{torch.get_num_threads()} threads"
    )


def _best_ms(candidates: Dict[str, Callable[[], torch.Tensor]], rounds: int) -> Dict[str, float]:
    """Best-of-``rounds`` milliseconds of each candidate, the candidates interleaved round by round after a warm-up."""
    for run in candidates.values():
        run()
    best = {name: float("inf") for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return best


def _fastest(times: Dict[str, float], reference: str) -> str:
    """The fastest candidate; PyTorch's own (``reference``) unless another is at least MIN_GAIN faster."""
    name = min(times, key=times.__getitem__)
    return name if times[name] < (1 - MIN_GAIN) * times[reference] else reference


class DepthwiseTuner:
    """Chooses each depthwise convolution's formulation per ``shape_key`` and remembers it.

    ``mode``: "measure" (time the candidates on first use), "fixed" (a rule, no timing) or "off" (plain conv2d).
    ``cache_path``: an optional JSON file of measured choices, per ``machine_fingerprint()``, consulted for each shape
    not chosen yet and extended after each measurement (the choices carry over between runs on the same kind of
    machine).
    """

    def __init__(self, mode: str = "measure", cache_path: Optional[str] = None, rounds: int = 3) -> None:
        self.choices: Dict[str, Formulation] = {}
        self.timings: Dict[str, Dict[str, Dict[str, float]]] = {}  # key -> part -> candidate -> ms
        self.measured: List[str] = []  # keys measured by this process, in order
        self.measure_seconds = 0.0
        self.rounds = rounds
        self.configure(mode, cache_path)

    def configure(self, mode: str, cache_path: Optional[str] = None) -> None:
        for given, where in ((mode, "the mode"), (os.environ.get(ENV_MODE), ENV_MODE)):
            if given and given not in MODES:
                raise ValueError(f"unknown depthwise mode {given!r} ({where}): choose one of {', '.join(MODES)}")
        self.mode = os.environ.get(ENV_MODE) or mode
        self.cache_path = writable_cache(cache_path) if cache_path is not None else None

    def formulation(self, x: torch.Tensor, weight: torch.Tensor) -> Formulation:
        if (
            self.mode == "off"
            or x.device.type != "cpu"
            or x.dtype not in SUPPORTED_DTYPES
            or weight.dtype != x.dtype
            or torch.is_autocast_enabled("cpu")
        ):
            return PLAIN
        if self.mode == "fixed":
            fast = x.dtype == torch.float32 and weight.shape[-1] >= FIXED_MIN_KERNEL
            return FIXED_FAST if fast else PLAIN
        key = shape_key(x, weight)
        choice = self.choices.get(key)
        if choice is None:
            choice = self._choose(key, x, weight)
            if choice is None:
                return PLAIN  # never time inside torch.compile's tracing or under a FlopCounter-like mode
            self.choices[key] = choice
        return choice

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
                    return _valid(recorded)
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
        xs = torch.randn(x.shape, generator=gen, dtype=x.dtype).contiguous(memory_format=fmt)
        gs = torch.randn(x.shape, generator=gen, dtype=x.dtype).contiguous(memory_format=fmt)
        ws = torch.randn(weight.shape, generator=gen, dtype=weight.dtype)
        bs = torch.randn(weight.shape[0], generator=gen, dtype=weight.dtype)
        forward = {n: f for n, f in FORWARD.items() if not (n == "channels_last" and fmt == torch.channels_last)}
        with torch.no_grad():
            times = {
                "forward": _best_ms({n: (lambda f=f: f(xs, ws, bs)) for n, f in forward.items()}, self.rounds),
                "grad_input": _best_ms({n: (lambda f=f: f(gs, xs, ws)) for n, f in GRAD_INPUT.items()}, self.rounds),
                "grad_weight": _best_ms({n: (lambda f=f: f(gs, xs, ws)) for n, f in GRAD_WEIGHT.items()}, self.rounds),
            }
        self.timings[key] = times
        self.measured.append(key)
        self.measure_seconds += time.perf_counter() - start
        choice = tuple(_fastest(times[part], reference) for part, reference in zip(times, PLAIN))
        return choice  # type: ignore[return-value]

    # -- the optional disk cache ---------------------------------------------------------------------------------
    def _read_disk(self) -> Dict[str, Dict[str, List[str]]]:
        try:
            with open(self.cache_path) as f:  # type: ignore[arg-type]
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _to_disk(self, key: str, choice: Formulation) -> None:
        data = self._read_disk()
        data.setdefault(machine_fingerprint(), {})[key] = list(choice)
        folder = os.path.dirname(os.path.abspath(self.cache_path))  # type: ignore[arg-type]
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".depthwise-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.cache_path)

    # -- what a checkpoint keeps -----------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, List[str]]:
        return {key: list(choice) for key, choice in sorted(self.choices.items())}

    def load_state_dict(self, state: Dict[str, List[str]]) -> None:
        """Adopt recorded choices (a resumed run computes exactly what the interrupted one did)."""
        self.choices.update({key: _valid(choice) for key, choice in state.items()})

    def describe(self, key: str) -> str:
        forward, grad_input, grad_weight = self.choices[key]
        line = f"{key}: forward {forward}, grad_input {grad_input}, grad_weight {grad_weight}"
        times = self.timings.get(key)
        if times:
            line += (
                " ("
                + "; ".join(", ".join(f"{n} {ms:.2f} ms" for n, ms in part.items()) for part in times.values())
                + ")"
            )
        return line


def writable_cache(path: str) -> str:
    """``path`` (``~`` expanded) once its folder exists and a lock beside it can be written: a cache that cannot be
    written is found when it is configured, not in the middle of the first training step."""
    path = os.path.expanduser(path)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        open(path + ".lock", "a").close()
    except OSError as err:
        raise ValueError(
            f"cannot write the depthwise cache {path} ({err.strerror}): give a writable local path"
        ) from None
    return path


def _tracing_or_intercepted() -> bool:
    """True while torch.compile traces or a TorchDispatchMode (FlopCounterMode, fake tensors) sees every op."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def _valid(choice) -> Formulation:
    parts = tuple(choice)
    if len(parts) != 3 or any(name not in table for name, (_, table) in zip(parts, PARTS)):
        raise ValueError(f"not a depthwise formulation: {choice!r} (names: {[list(t) for _, t in PARTS]})")
    return parts  # type: ignore[return-value]


def _process_tuner() -> DepthwiseTuner:
    """The process's tuner, in the mode C2F_DEPTHWISE names. A bad value does not break the import: it is a warning
    here, and ``configure`` (the training engine calls it first) makes it a clear error."""
    try:
        return DepthwiseTuner("measure")
    except ValueError as err:
        logging.getLogger("conv2former").warning(f"warning: {err}; depthwise convolutions measure meanwhile")
        saved = os.environ.pop(ENV_MODE)
        try:
            return DepthwiseTuner("measure")
        finally:
            os.environ[ENV_MODE] = saved


_TUNER = _process_tuner()


def tuner() -> DepthwiseTuner:
    """The process's tuner, used by every ``DepthwiseConv2d``."""
    return _TUNER


def configure(mode: str = "measure", cache_path: Optional[str] = None) -> DepthwiseTuner:
    """Set the process's mode ("measure", "fixed", "off") and disk cache; the environment's C2F_DEPTHWISE wins."""
    _TUNER.configure(mode, cache_path)
    return _TUNER


def depthwise_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, fast_backward: bool = True
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=k // 2, groups=C)`` for a (C, 1, k, k) weight with odd k.

    ``fast_backward=False``: always the plain convolution. A leaf for torch.fx (``torch.fx.wrap`` below): traced
    graphs call this function, so they keep the chosen formulation and never branch on a traced tensor's device or
    dtype. Under TorchScript it is the plain convolution.
    """
    if not torch.jit.is_scripting() and fast_backward:
        return _formulated(x, weight, bias)
    return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])


def _formulated(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    formulation = _TUNER.formulation(x, weight)
    if formulation == PLAIN:
        return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return _DepthwiseConv2dFunction.apply(x, weight, bias, formulation)
    return FORWARD[formulation[0]](x, weight, bias)


torch.fx.wrap("depthwise_conv2d")


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)`` (same parameters and state_dict), computed the way the
    process's ``DepthwiseTuner`` chose for its shape. ``fast_backward=False`` is the plain PyTorch layer everywhere
    (the reference formulation)."""

    def __init__(self, dim: int, kernel_size: int, bias: bool = True, fast_backward: bool = True) -> None:
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=bias)
        self.fast_backward = fast_backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv2d(x, self.weight, self.bias, self.fast_backward)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.fast_backward else ", fast_backward=False")
