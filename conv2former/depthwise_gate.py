"""The accuracy gate of the depthwise choosers (CPU and GPU): a candidate formulation is eligible for a shape only if,
on the first batch of that shape, its forward, input gradient and weight gradient match an fp32 ``F.conv2d`` of the
same inputs within ``TOLERANCE`` of the run's dtype. Without it a chooser picks on speed alone, and in bf16 the
``batch_groups`` weight gradient (each sample's partial sum rounded to bf16 before the batch is summed) is fast and
8-12% of the scale off on single entries. No library gates alternative kernels for us, so this is ours.

The error of a part is the largest elementwise error relative to the entry, the entry's scale floored at 1/16 of the
reference's root-mean-square (so an entry near zero in a sum that cancels is judged against the tensor's scale).
PyTorch's own formulation (``depthwise.PLAIN``) is always eligible: it is what the model computes with no chooser.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch

from conv2former import depthwise

__all__ = [
    "TOLERANCE",
    "SCALE_FLOOR",
    "part_error",
    "reference",
    "errors",
    "sample_inputs",
    "tolerance",
    "gate",
    "describe_rejected",
]

# Two units in the last place of the training dtype; fp32: two TF32 ulps (cuDNN may run fp32 convolutions in TF32).
TOLERANCE: Dict[torch.dtype, float] = {
    torch.bfloat16: 2 * 2.0**-7,
    torch.float16: 2 * 2.0**-10,
    torch.float32: 2 * 2.0**-10,
    torch.float64: 1e-9,
}
SCALE_FLOOR = 1 / 16
Errors = Dict[str, Dict[str, float]]  # part -> candidate -> error


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE[dtype]


def part_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max(|want|, SCALE_FLOOR * rms(want)), elementwise, in ``want``'s dtype."""
    got = got.to(want.dtype)
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    floor = want.pow(2).mean().sqrt() * SCALE_FLOOR
    if floor.item() == 0.0:  # an all-zero reference: only zeros match it
        return 0.0 if torch.equal(got, want) else float("inf")
    return float(((got - want).abs() / want.abs().clamp(min=floor.item())).max().item())


@contextlib.contextmanager
def _exact_fp32() -> Iterator[None]:
    """fp32 convolutions computed in fp32 (cuDNN's TF32 off) while the reference is computed."""
    with torch.backends.cudnn.flags(
        enabled=torch.backends.cudnn.enabled,
        benchmark=torch.backends.cudnn.benchmark,
        deterministic=torch.backends.cudnn.deterministic,
        allow_tf32=False,
    ):
        yield


Inputs = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # x, weight, bias, grad_out


def reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, grad_out: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """Each part computed by PyTorch's own formulation in fp32 (fp64 for fp64 inputs) from the same input values."""
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, weight, bias, grad_out = (t.to(wide) for t in (x, weight, bias, grad_out))
    with torch.no_grad(), _exact_fp32():
        return {
            "forward": depthwise.FORWARD["conv2d"](x, weight, bias),
            "grad_input": depthwise.GRAD_INPUT["conv2d_backward"](grad_out, x, weight),
            "grad_weight": depthwise.GRAD_WEIGHT["conv2d_backward"](grad_out, x, weight),
        }


def _arguments(part: str, inputs: Inputs) -> Tuple[torch.Tensor, ...]:
    x, weight, bias, grad_out = inputs
    return (x, weight, bias) if part == "forward" else (grad_out, x, weight)


def errors(inputs: Inputs, names: Mapping[str, Iterable[str]]) -> Errors:
    """The error of each named candidate of each part (``names``: part -> candidate names) against ``reference``."""
    want = reference(*inputs)
    tables = dict(depthwise.PARTS)
    out: Errors = {}
    with torch.no_grad():
        for part, candidates in names.items():
            out[part] = {
                name: part_error(tables[part][name](*_arguments(part, inputs)), want[part]) for name in candidates
            }
    return out


def sample_inputs(x: torch.Tensor, weight: torch.Tensor) -> Inputs:
    """The gate's inputs for one call: the batch and weight as they are (detached; drawn values of their shapes where
    they hold a non-finite value), a bias and an output gradient drawn from a private generator (never the global
    one: gating must not change a run)."""
    gen = torch.Generator().manual_seed(0)

    def draw(shape: Tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(device=x.device, dtype=x.dtype)

    x, weight = x.detach(), weight.detach()
    if not bool(torch.isfinite(x).all()):
        x = draw(tuple(x.shape)).contiguous(memory_format=depthwise._memory_format(x))
    if not bool(torch.isfinite(weight).all()):
        weight = draw(tuple(weight.shape)) / weight.shape[-1]
    grad_out = draw(tuple(x.shape))
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    return x, weight, draw((weight.shape[0],)), grad_out


def gate(inputs: Inputs, names: Mapping[str, Iterable[str]]) -> Tuple[Dict[str, List[str]], Errors]:
    """(eligible candidates per part, every candidate's error); PyTorch's own is eligible whatever its error."""
    found = errors(inputs, names)
    limit = tolerance(inputs[0].dtype)
    plain = dict(zip((part for part, _ in depthwise.PARTS), depthwise.PLAIN))
    eligible = {
        part: [name for name, error in part_errors.items() if error <= limit or name == plain[part]]
        for part, part_errors in found.items()
    }
    return eligible, found


def describe_rejected(found: Errors, dtype: torch.dtype, eligible: Optional[Mapping[str, List[str]]] = None) -> str:
    """'batch_groups (grad_weight, error 0.2319 > 0.0156), ...' or '' when nothing was rejected."""
    limit = tolerance(dtype)
    rejected = [
        f"{name} ({part}, error {error:.4f} > {limit:.4f})"
        for part, part_errors in found.items()
        for name, error in part_errors.items()
        if error > limit and (eligible is None or name not in eligible.get(part, []))
    ]
    return ", ".join(rejected)
