"""Deliberately broken rewards, each one a way real runs ended up with rewards of 0.0 (importable
by name, e.g. `tests.support.rewards:ZeroReward`, as a config's reward component)."""

import torch

from svdray.reward.rewards import MotionTarget, Reward


class ZeroReward(Reward):
    name = "zero"

    def forward(self, frames, image):
        return (frames * 0).flatten(1).sum(dim=1)


class ConstantReward(Reward):
    def forward(self, frames, image):
        return frames.flatten(1).mean(dim=1) * 0 + 0.5


class NoGradScorer(Reward):
    def forward(self, frames, image):
        with torch.no_grad():
            return frames.flatten(1).mean(dim=1)


class Uint8Scorer(Reward):
    """Written for [0, 1] pixels, casts to uint8 like an image library would."""

    def forward(self, frames, image):
        pixels = (frames * 255).round().clamp(0, 255).to(torch.uint8)
        return pixels.float().flatten(1).mean(dim=1) / 255


class CollapsingReward(MotionTarget):
    """Healthy for its first calls, then 0.0: what a reward model that saturates looks like."""

    calls = 0

    def forward(self, frames, image):
        CollapsingReward.calls += 1
        score = super().forward(frames, image)
        return score * 0 if CollapsingReward.calls > 3 else score
