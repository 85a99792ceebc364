"""SVD's motion bucket: the `motion_bucket_id` micro-condition of each training example.

The data layer hands every example its clip's `motion` (`svdray.data.video.motion_score`, the
temporal pixel std in 0..255 units) and the manifest's `motion_bucket_id` (-1 when it has none);
this is SVD's rule for turning them into the bucket the UNet sees.
"""

from __future__ import annotations

import torch


def motion_bucket_ids(
    motion: torch.Tensor, manifest_bucket: torch.Tensor, fixed: int | None, scale: float
) -> torch.Tensor:
    """Per sample, float32: the manifest's bucket where it has one (>= 0), else `fixed`
    (data.motion_bucket_id) when set, else `scale` x the clip's motion, rounded half to even and
    clamped to 1..255.

    Fine-tuning with a fixed bucket of 127 is reported to lose motion; deriving the bucket from
    the clip keeps the conditioning meaningful.
    """
    if fixed is not None:
        fallback = torch.full_like(motion, float(fixed), dtype=torch.float64)
    else:
        # float64 and round-half-to-even: exactly Python's round(scale * motion) on the score.
        fallback = torch.round(scale * motion.to(torch.float64)).clamp(1, 255)
    return torch.where(manifest_bucket >= 0, manifest_bucket.to(torch.float64), fallback).to(torch.float32)
