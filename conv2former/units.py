"""Byte counts in words (``human``) and from words (``parse_bytes``): the one size parser of the pipeline.

One meaning everywhere (configs, flags, data_prep): decimal units are powers of 10 (``KB`` = 10^3, ``GB`` = 10^9, as
disks, buckets and GPU data sheets write them), binary units are powers of 2 (``KiB`` = 2^10, ``GiB`` = 2^30, as
``nvidia-smi`` and the memory planner report). Case does not matter, the ``B`` may be left out (``200g`` = 200GB).
"""

from __future__ import annotations

import re
from typing import Optional, Union

from conv2former.errors import UserError

POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}
GiB = 2**30
_SIZE = re.compile(r"([0-9]*\.?[0-9]+(?:E[+-]?[0-9]+)?)(?:([KMGTP]?)(I?)B?)?")


def human(n: float) -> str:
    """``12.3 GB``: decimal units, as disks and buckets are sold."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def is_decimal(value: Union[int, float, str]) -> bool:
    """Whether a size was written in decimal units (``80GB``), not binary (``80GiB``) or as a plain number."""
    match = _SIZE.fullmatch(str(value).strip().upper().replace(" ", ""))
    return bool(match and match.group(2) and not match.group(3))


def parse_bytes(value: Union[None, int, float, str], key: str) -> Optional[int]:
    """None, a number of bytes, or a string such as ``200GB`` (200·10^9) / ``1.5TiB`` (1.5·2^40); anything else is a
    one-line error naming ``key`` (the config field or flag)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise UserError(f"{key}: {value!r} is not a size (e.g. 200GB, 1.5TiB or a number of bytes)")
    if isinstance(value, (int, float)):
        return int(value)
    match = _SIZE.fullmatch(str(value).strip().upper().replace(" ", ""))
    if match is None or (match.group(3) and not match.group(2)):
        raise UserError(f"{key}: {value!r} is not a size (e.g. 200GB, 1.5TiB or a number of bytes)")
    number, prefix, binary = float(match.group(1)), match.group(2) or "", bool(match.group(3))
    return int(number * (1024 if binary else 1000) ** POWERS[prefix])
