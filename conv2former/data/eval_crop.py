"""The evaluation crop of the paper's two fine-tuning recipes, written once: the 224 recipe center-crops 87.5% of
the shorter side (timm's and ConvNeXt's default), the 384 recipe squashes the whole image to the size (crop 1.0,
as ConvNeXt evaluates at 384). A resolution above 256 px takes the 384 recipe unless one is named."""

from __future__ import annotations

from typing import Tuple

HIGH_RESOLUTION_ABOVE = 256  # px: from here up, the 384 recipe
CROPS = {"224": (0.875, "center"), "384": (1.0, "squash")}  # recipe -> (crop_pct, crop_mode)


def recipe_for(resolution: int) -> str:
    """The recipe ("224" or "384") of a resolution."""
    return "384" if resolution > HIGH_RESOLUTION_ABOVE else "224"


def eval_crop(recipe: str) -> Tuple[float, str]:
    """(crop_pct, crop_mode) of a recipe ("224" or "384")."""
    return CROPS[recipe]
