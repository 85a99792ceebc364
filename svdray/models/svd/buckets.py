"""SVD's motion-bucket rule: which `motion_bucket_id` a training clip conditions the UNet with."""

from __future__ import annotations

import torch


def motion_bucket_ids(
    motion: torch.Tensor, manifest_bucket: torch.Tensor, fixed: int | None, scale: float
) -> torch.Tensor:
    """Per sample (float32): the manifest's bucket where given (>= 0), else `svd.motion_bucket_id`
    (`fixed`) when set, else one from the clip's motion (temporal pixel std, 0..255 units):
    `scale` x motion, rounded half to even like Python's round, clamped to 1..255.

    Fine-tuning with a fixed bucket of 127 is reported to lose motion; deriving it from the clip
    keeps the conditioning meaningful."""
    if fixed is not None:
        derived = torch.full_like(motion, float(fixed), dtype=torch.float64)
    else:
        derived = torch.round(scale * motion.double()).clamp(1, 255)
    manifest_bucket = manifest_bucket.to(derived.device, torch.float64)
    return torch.where(manifest_bucket >= 0, manifest_bucket, derived).float()
