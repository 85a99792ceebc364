"""Aspect-ratio buckets: each clip trains at the bucket size closest to its own shape.

A portrait clip cropped to a landscape frame loses most of its content; with buckets
(`data.buckets: ["320x512", "512x320", "384x384"]`) it is resized to the bucket nearest in aspect
ratio and cropped much less. Every batch holds clips of one bucket (the training plan groups
them), since a batch is one tensor.
"""

from __future__ import annotations

import math
import re
from typing import Any

_BUCKET = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_bucket(text: str) -> tuple[int, int]:
    """ "320x512" -> (320, 512): height x width, like data.height / data.width."""
    match = _BUCKET.match(text)
    if not match:
        raise ValueError(f"{text!r} is not HEIGHTxWIDTH (e.g. 320x512)")
    return int(match.group(1)), int(match.group(2))


def closest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to height x width (compared as log ratios, so
    2:1 and 1:2 are equally far from 1:1); the first one listed wins a tie."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - aspect))


def assign_buckets(
    rows: list[dict[str, Any]], buckets: list[str], default: tuple[int, int]
) -> list[tuple[int, int]]:
    """The training size (height, width) of each row: its closest bucket, or `default` when no
    buckets are configured or the row's size is unknown (not probed)."""
    sizes = [parse_bucket(b) for b in buckets]
    out = []
    for row in rows:
        if sizes and row.get("height") and row.get("width"):
            out.append(closest_bucket(row["height"], row["width"], sizes))
        else:
            out.append(default)
    return out
