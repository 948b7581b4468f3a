"""Make every stored image a plain RGB JPEG that PIL and DALI decode, or say why it was skipped."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional, Tuple

from PIL import Image

# Fixed re-encode settings: the same input gives the same bytes (shard determinism).
JPEG_QUALITY = 90
RESAMPLE = Image.Resampling.BICUBIC


class SkipImage(Exception):
    """An input that is not written; the message is the recorded reason."""


@dataclass
class CleanImage:
    data: bytes
    width: int  # original size, before any downscale
    height: int
    reencoded: bool
    stored: Tuple[int, int] = (0, 0)  # (width, height) of the JPEG stored (after a downscale)


def _has_jpeg_end(data: bytes) -> bool:
    return data.rstrip(b"\x00\r\n ")[-2:] == b"\xff\xd9"


def clean_image(data: bytes, max_side: Optional[int] = None, min_side: int = 32, check: str = "decode") -> CleanImage:
    """Return JPEG bytes to store for ``data``.

    Kept as is: baseline RGB JPEGs within ``max_side``. Re-encoded (quality 90): CMYK, grayscale, palette, PNG or
    other formats (whatever the file name says), and images larger than ``max_side`` (downscaled, aspect kept).
    Skipped (``SkipImage``): empty files, undecodable or truncated data, images with a side under ``min_side``.
    ``check="decode"`` decodes every kept JPEG fully; ``check="header"`` trusts a JPEG whose header parses and whose
    end-of-image marker is present (faster; a truncated file lacks the marker and is then decoded to decide).
    """
    if not data:
        raise SkipImage("empty file")
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        fmt, mode = img.format, img.mode
    except Exception as err:
        raise SkipImage(f"not an image ({type(err).__name__})") from None
    if min(width, height) < min_side:
        raise SkipImage(f"too small ({width}x{height} < {min_side} px)")
    too_big = max_side is not None and max(width, height) > max_side
    keep = fmt == "JPEG" and mode == "RGB" and not too_big
    if keep and check == "header" and _has_jpeg_end(data):
        return CleanImage(data, width, height, reencoded=False, stored=(width, height))
    try:
        img.load()
    except Exception as err:
        raise SkipImage(f"undecodable or truncated image ({type(err).__name__}: {str(err)[:80]})") from None
    if keep:
        return CleanImage(data, width, height, reencoded=False, stored=(width, height))
    rgb: Image.Image = img
    if img.mode != "RGB":
        rgb = img.convert("RGBA").convert("RGB") if img.mode in ("P", "LA", "PA") else img.convert("RGB")
    if too_big and max_side is not None:
        scale = max_side / max(width, height)
        rgb = rgb.resize((max(1, round(width * scale)), max(1, round(height * scale))), RESAMPLE)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=JPEG_QUALITY)
    return CleanImage(out.getvalue(), width, height, reencoded=True, stored=rgb.size)
