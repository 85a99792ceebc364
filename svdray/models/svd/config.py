"""SVD's config section (`svd:`, used with `model.family: svd`) and its rules; imports no torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from svdray.config import Config, ConfigError
from svdray.models import FamilyConfig, SampleFlag


@dataclass
class SvdSamplingConfig:
    """SVD's conditioning of sampled videos (after training, validation, `svdray sample`)."""

    # null: training's rule (`svd.motion_bucket_id`, or computed from the conditioning clip when
    # that is null; 127 for a still image, which has no motion; the value used is logged)
    motion_bucket_id: int | None = None
    noise_aug_strength: float = 0.02
    min_guidance: float = 1.0  # guidance ramps linearly from min (first frame) to max (last)
    max_guidance: float = 3.0


@dataclass
class SvdRewardSamplingConfig:
    """Overrides of `svd.sample` for the reward stage's videos; null: as `svd.sample`."""

    motion_bucket_id: int | None = None
    noise_aug_strength: float | None = None
    min_guidance: float | None = None
    max_guidance: float | None = None


@dataclass
class SvdConfig:
    """Stable Video Diffusion's options (`model.family: svd`): its EDM objective, conditioning
    augmentation and dropout, motion-bucket rule and guidance (svdray/models/svd/)."""

    # Log-normal training sigma. 0.7/1.6 is the community SVD fine-tuning reference; sgm uses -1.2/1.2.
    p_mean: float = 0.7
    p_std: float = 1.6
    # Conditioning noise augmentation strength ~ LogNormal(mean, std), drawn per sample.
    noise_aug_mean: float = -3.0
    noise_aug_std: float = 0.5
    # Classifier-free guidance dropout (InstructPix2Pix scheme).
    cfg_dropout: float = 0.1
    # An int uses that bucket for every clip; null computes it from the clip's motion (a manifest's
    # per-clip motion_bucket_id wins over both).
    motion_bucket_id: int | None = 127
    motion_bucket_scale: float = 4.0  # bucket = scale * temporal pixel std (0..255 units), clamped
    sample: SvdSamplingConfig = field(default_factory=SvdSamplingConfig)
    reward: SvdRewardSamplingConfig = field(default_factory=SvdRewardSamplingConfig)


class SvdFamilyConfig(FamilyConfig):
    name = "svd"
    section = SvdConfig
    family = "svdray.models.svd.family:SVDFamily"
    sample_flags = {
        "motion_bucket_id": SampleFlag(
            "svd.sample.motion_bucket_id",
            int,
            "default: the run's fixed bucket, else 127 (a still image has no motion to compute it from)",
        ),
        "noise_aug_strength": SampleFlag(
            "svd.sample.noise_aug_strength", float, "default: the run's, else 0.02"
        ),
        "min_guidance": SampleFlag(
            "svd.sample.min_guidance", float, "guidance at the first frame (default 1.0)"
        ),
        "max_guidance": SampleFlag(
            "svd.sample.max_guidance", float, "guidance at the last frame (default 3.0)"
        ),
    }

    def check(self, cfg: Config) -> None:
        if not 0 <= cfg.svd.cfg_dropout < 1 / 3:
            raise ConfigError("svd.cfg_dropout: must be in [0, 1/3) (drops use 3p of the unit interval)")
