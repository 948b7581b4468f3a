"""Byte counts in words (``human``) and from words (``parse_bytes``), for checkpoint sizes and the shard cache."""

from __future__ import annotations

import re
from typing import Optional, Union

from conv2former.errors import UserError

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
         "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def human(n: float) -> str:
    """``12.3 GB``: decimal units, as disks and buckets are sold."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def parse_bytes(value: Union[None, int, float, str], key: str = "data.cache_limit") -> Optional[int]:
    """None, a number of bytes, or a string such as ``200GB`` / ``1.5TiB``; anything else is a one-line error."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return int(value)
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)([KMGT]I?B|B)?", str(value).strip().upper().replace(" ", ""))
    if match is None:
        raise UserError(f"{key}: {value!r} is not a size (e.g. 200GB, 1.5TiB or a number of bytes)")
    return int(float(match.group(1)) * UNITS[match.group(2) or ""])
