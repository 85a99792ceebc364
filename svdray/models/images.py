"""The conditioning image of a sample, framed as training frames its clips (every family)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from svdray.data.video import FrameSpec, resize_and_crop


def conditioning_pixels(image: np.ndarray | torch.Tensor, spec: Any) -> torch.Tensor:
    """An image ((H, W, 3) or (3, H, W) uint8) cover-resized and centre-cropped to the spec's size
    (`spec.height` x `spec.width`) as training frames its clips (`svdray.data.video.resize_and_crop`),
    (3, H, W) uint8."""
    # np.array copies: a PIL image or a decoded frame may be a read-only buffer torch can't wrap.
    pixels = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image))
    if pixels.shape[-1] == 3 and pixels.shape[0] != 3:
        pixels = pixels.permute(2, 0, 1)
    frame = FrameSpec(1, spec.fps, spec.height, spec.width, "first", "center")
    return resize_and_crop(pixels.unsqueeze(0), frame, (0.5, 0.5))[0]
