"""Progressive resizing: the training crop size of each epoch, a pure function of the epoch (and so of the step).

``data.size_schedule: [[0.0, 160], [0.6, 192], [0.8, 224]]`` lists (fraction of the run's epochs, size) points.
``data.size_schedule_mode``:

* ``step`` (default): each size from its fraction on (epoch e trains at the size of the last point with fraction
  <= e / epochs), as timm's ``--train-size-schedule`` and Composer's progressive resizing in steps;
* ``linear``: FFCV's ramp, the size interpolated linearly between the points and rounded down to a multiple of 32.

Sizes are multiples of 32 (the network's stride) and the last one is ``data.image_size``: evaluation (and the crop
rule of that size) always runs at the final size. Hand-written because timm's schedule lives inside train.py's loop
and FFCV's inside its loader; ours is the one rule both backends and the resume logic share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from conv2former.errors import UserError

__all__ = ["SizeSchedule", "MODES", "MULTIPLE"]

MODES = ("step", "linear")
MULTIPLE = 32


@dataclass(frozen=True)
class SizeSchedule:
    points: Tuple[Tuple[float, int], ...]  # (fraction of the run, size); empty: the final size throughout
    mode: str
    epochs: int
    final: int
    regularization: Optional[float] = None  # the augmentation strength at the smallest size (None: always full)
    scale_batch: bool = False  # the micro-batch grows as the area shrinks (the global batch kept)

    @classmethod
    def from_config(
        cls,
        points: Sequence[Sequence[float]],
        mode: str,
        epochs: int,
        final: int,
        regularization: Optional[float] = None,
        scale_batch: bool = False,
    ) -> "SizeSchedule":
        """Checked: one-line errors for sizes off the 32-px grid, fractions out of order, or a last size other than
        the final (evaluation) size."""
        where = "data.size_schedule"
        if mode not in MODES:
            raise UserError(f"data.size_schedule_mode {mode!r}: choose {' or '.join(MODES)}")
        if regularization is not None and not 0.0 < regularization <= 1.0:
            raise UserError(f"data.size_schedule_regularization {regularization}: give a share in (0, 1], or none")
        if regularization is not None and not points:
            raise UserError("data.size_schedule_regularization needs a data.size_schedule to grow with")
        parsed: List[Tuple[float, int]] = []
        for point in points:
            if len(point) != 2 or float(point[1]) != int(point[1]):
                raise UserError(f"{where}: each point is [fraction, size in px], got {list(point)}")
            parsed.append((float(point[0]), int(point[1])))
        if not parsed:
            if scale_batch:
                raise UserError("data.size_schedule_scale_batch needs a data.size_schedule")
            return cls((), mode, epochs, final)
        fractions = [f for f, _ in parsed]
        if fractions[0] != 0.0 or any(b <= a for a, b in zip(fractions, fractions[1:])) or fractions[-1] >= 1.0:
            raise UserError(f"{where}: fractions must start at 0.0 and increase, below 1.0; got {fractions}")
        bad = [s for _, s in parsed if s <= 0 or s % MULTIPLE]
        if bad:
            raise UserError(f"{where}: size {bad[0]} px is not a positive multiple of {MULTIPLE} (the model's stride)")
        if parsed[-1][1] != final:
            raise UserError(
                f"{where} ends at {parsed[-1][1]} px but data.image_size is {final}: evaluation runs at "
                "data.image_size, so the schedule's last size must equal it"
            )
        return cls(tuple(parsed), mode, epochs, final, regularization, scale_batch)

    def size(self, epoch: int) -> int:
        """The training crop side of ``epoch`` (0-based)."""
        if not self.points:
            return self.final
        fraction = min(epoch, self.epochs) / max(self.epochs, 1)
        if self.mode == "step":
            return [s for f, s in self.points if f <= fraction + 1e-9][-1]
        for (f0, s0), (f1, s1) in zip(self.points, self.points[1:]):
            if f0 <= fraction < f1:
                exact = s0 + (s1 - s0) * (fraction - f0) / (f1 - f0)
                return max(MULTIPLE, int(exact) // MULTIPLE * MULTIPLE)
        return self.points[-1][1]

    def strength(self, epoch: int) -> float:
        """The share of the configured RandAugment magnitude and Mixup/CutMix alphas that ``epoch`` trains with:
        ``regularization`` at the smallest size, growing linearly with the size to 1 at the final (EfficientNetV2's
        progressive learning); 1 when off."""
        if self.regularization is None or not self.points:
            return 1.0
        smallest = min(s for _, s in self.points)
        if self.final == smallest:
            return 1.0
        grown = (self.size(epoch) - smallest) / (self.final - smallest)
        return self.regularization + (1.0 - self.regularization) * grown

    def micro_batch(self, epoch: int, base: int, per_rank: int, even: bool) -> int:
        """The micro-batch of ``epoch``: ``base`` (the final size's), or with ``scale_batch`` the largest divisor of
        the per-rank batch (micro-batch x accumulation) up to ``base x (final / size)^2`` (even where Mixup needs
        it), so the accumulation shrinks and the global batch stays."""
        if not self.scale_batch:
            return base
        target = base * (self.final / self.size(epoch)) ** 2
        fits = [d for d in range(base, per_rank + 1) if per_rank % d == 0 and d <= target + 1e-9]
        fits = [d for d in fits if d % 2 == 0 or not even]
        return max(fits) if fits else base

    def epoch_sizes(self) -> List[int]:
        """The size of every epoch of the run."""
        return [self.size(e) for e in range(self.epochs)]

    def sizes(self) -> List[int]:
        """The distinct sizes, in the order the run meets them (what torch.compile specialises on)."""
        out: List[int] = []
        for size in self.epoch_sizes():
            if size not in out:
                out.append(size)
        return out

    def relative_cost(self) -> float:
        """The run's pixels per sample relative to training every epoch at the final size (the convolutions' FLOPs
        scale with the area)."""
        sizes = self.epoch_sizes()
        return sum((s / self.final) ** 2 for s in sizes) / max(len(sizes), 1)

    def as_dict(self) -> Dict[str, Any]:
        epochs_at: Dict[int, int] = {}
        for size in self.epoch_sizes():
            epochs_at[size] = epochs_at.get(size, 0) + 1
        out: Dict[str, Any] = {
            "mode": self.mode,
            "epochs_at_size": epochs_at,
            "relative_pixels": round(self.relative_cost(), 4),
        }
        if self.regularization is not None:
            first_epoch = {size: self.epoch_sizes().index(size) for size in self.sizes()}
            out["augment_strength_at_size"] = {s: round(self.strength(e), 3) for s, e in first_epoch.items()}
        return out
