"""One YAML file says everything about a run.

The schema is a tree of dataclasses. Loading validates the whole tree before any work starts:
an unknown key, a value of the wrong type or a missing input file raises `ConfigError` naming
the dotted key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config problem, always naming the offending dotted key."""


@dataclass
class ModelConfig:
    # A local pipeline directory (e.g. a downloaded SVD-XT) or a Hugging Face hub id.
    pretrained: str = "stabilityai/stable-video-diffusion-img2vid-xt"
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16" to read the half-precision weight files
    # dtype of the frozen VAE and image encoder; the trained UNet stays float32 (autocast on GPU).
    frozen_dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclass
class DataConfig:
    manifest: str = ""  # JSON Lines with {"image"?, "video", "prompt"?}; relative paths resolve to its folder
    num_frames: int = 14
    height: int = 320
    width: int = 512
    fps: float = 7.0  # frames are sampled by timestamp at this rate; also the fps conditioning
    start: Literal["first", "random"] = "random"
    crop: Literal["center", "random"] = "center"
    # An int uses that bucket for every clip; null computes it from the clip's motion.
    motion_bucket_id: int | None = 127
    motion_bucket_scale: float = 4.0  # bucket = scale * temporal pixel std (0..255 units), clamped
    decode_cpus: float = 1.0  # CPUs per Ray Data decode task
    strict: bool = False  # stop on the first undecodable clip instead of skipping it
    shuffle: bool = True


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    # Which attention blocks to adapt, and which projections inside them.
    blocks: list[Literal["spatial", "temporal"]] = field(default_factory=lambda: ["spatial", "temporal"])
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    feed_forward: bool = False  # also adapt ff.net.0.proj / ff.net.2 in the chosen blocks


@dataclass
class ObjectiveConfig:
    # Log-normal training sigma. 0.7/1.6 is the community SVD fine-tuning reference; sgm uses -1.2/1.2.
    p_mean: float = 0.7
    p_std: float = 1.6
    # Conditioning noise augmentation strength ~ LogNormal(mean, std), drawn per sample.
    noise_aug_mean: float = -3.0
    noise_aug_std: float = 0.5
    # Classifier-free guidance dropout (InstructPix2Pix scheme).
    cfg_dropout: float = 0.1


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    name: str = "svdray"  # stable run name: re-running with the same name resumes
    max_steps: int = 1000
    batch_size: int = 1  # per worker
    grad_accum: int = 1
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    mixed_precision: Literal["no", "bf16"] = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    storage_path: str = ""  # Ray Train results; defaults to <output_dir>/ray
    # Debug aid: every worker also saves its own final LoRA to <output_dir>/workers/rank<N>,
    # to check that DDP kept the replicas identical.
    save_worker_loras: bool = False


@dataclass
class SampleConfig:
    # Used for the video sampled after training; the sampler's own defaults otherwise.
    enabled: bool = True
    image: str | None = None  # conditioning image; default: first frame of the first clip
    num_frames: int | None = None  # default: data.num_frames
    steps: int = 25
    fps: int | None = None  # default: data.fps
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    min_guidance: float = 1.0
    max_guidance: float = 3.0
    seed: int = 0


@dataclass
class MlflowConfig:
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "svdray"
    run_name: str | None = None  # default: train.name


@dataclass
class RayConfig:
    address: str | None = None  # None: connect to RAY_ADDRESS if set, else start a local instance
    num_cpus: int | None = None  # only for a local instance
    dashboard_host: str = "127.0.0.1"


@dataclass
class TuneConfig:
    """`svdray tune`: a Ray Tune sweep over any config keys, with ASHA early stopping."""

    # Config keys to search, each with one distribution, e.g.
    #   lora.rank: {choice: [4, 8, 16]}
    #   optim.lr: {loguniform: [1.0e-5, 1.0e-3]}
    # choice: one of the values at random; grid: every value (times num_samples);
    # uniform / loguniform: a float between the bounds; randint: an int in [low, high).
    search_space: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    num_samples: int = 8
    name: str | None = None  # stable sweep name (re-running resumes); default "<train.name>-sweep"
    # The loop metric to optimise (`loss`; `val_loss` once validation runs). Tune sees
    # `objective`: the mean of its last `metric_window` reported values (1: the value itself).
    metric: str = "loss"
    metric_window: int = 10
    mode: Literal["min", "max"] = "min"
    # ASHA, counted in optimizer steps: every trial runs `grace_period` steps before it can be
    # stopped; a trial that is never stopped runs `max_t` steps (default: train.max_steps).
    grace_period: int = 100
    max_t: int | None = None
    reduction_factor: float = 2.0
    max_concurrent_trials: int = 1  # 0: as many as the cluster fits
    # CPUs Ray reserves for each trial's driver, which only waits on its TorchTrainer (that
    # reserves its own workers) and logs the results: a fraction keeps whole CPUs for workers.
    trial_cpus: float = 0.1
    # Decode the training stream once and give every trial the same examples in the same order
    # (kept by Ray's object store, spilled to disk when large) instead of decoding per trial.
    share_data: bool = True
    seed: int | None = 0  # of the search; null draws a different sweep every time
    registered_model: str = "svdray-lora"  # MLflow model registry name of the best LoRA; "" skips


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    output_dir: str = "outputs/svdray"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Loading and validation


def _check_value(value: Any, hint: Any, key: str) -> Any:
    """Return `value` coerced to `hint`, or raise ConfigError naming `key`."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        key_hint, item_hint = typing.get_args(hint)
        return {
            _check_value(k, key_hint, key): _check_value(v, item_hint, f"{key}.{k}") for k, v in value.items()
        }
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {hint}")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_hint,) = typing.get_args(hint)
        return [_check_value(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(hint, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads 3e-4 (no dot) as a string; accept what any user means by it.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for name in values:
        if name not in known:
            where = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"{where}: unknown key (known keys here: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in values.items():
        where = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _check_value(value, hints[name], where)
    return cls(**kwargs)


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value parsed as YAML so numbers, bools and lists keep their type)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def set_key(tree: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """Set dotted `key` ("a.b.c") in a nested config tree."""
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[parts[-1]] = value
    return tree


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        set_key(tree, *parse_override(item))
    return tree


def _validate_semantics(cfg: Config, check_files: bool) -> None:
    positive = {
        "data.num_frames": cfg.data.num_frames,
        "data.height": cfg.data.height,
        "data.width": cfg.data.width,
        "lora.rank": cfg.lora.rank,
        "train.max_steps": cfg.train.max_steps,
        "train.batch_size": cfg.train.batch_size,
        "train.grad_accum": cfg.train.grad_accum,
        "train.num_workers": cfg.train.num_workers,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "train.log_every": cfg.train.log_every,
        "sample.steps": cfg.sample.steps,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    for key, value in {"data.fps": cfg.data.fps, "optim.lr": cfg.optim.lr}.items():
        if not value > 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    if not 0 <= cfg.objective.cfg_dropout < 1 / 3:
        raise ConfigError("objective.cfg_dropout: must be in [0, 1/3) (drops use 3p of the unit interval)")
    if not cfg.lora.blocks:
        raise ConfigError("lora.blocks: choose at least one of spatial, temporal")
    if len(cfg.optim.betas) != 2:
        raise ConfigError("optim.betas: expected two numbers")
    if cfg.data.height % 8 or cfg.data.width % 8:
        raise ConfigError("data.height/data.width: must be multiples of 8 (the VAE downsamples by up to 8)")
    if check_files:
        if not cfg.data.manifest:
            raise ConfigError("data.manifest: required")
        if not Path(cfg.data.manifest).exists():
            raise ConfigError(f"data.manifest: file not found: {cfg.data.manifest}")
        if cfg.sample.image and not Path(cfg.sample.image).exists():
            raise ConfigError(f"sample.image: file not found: {cfg.sample.image}")
        looks_local = cfg.model.pretrained.startswith((".", "/", "~")) or cfg.model.pretrained.count("/") > 1
        if looks_local and not Path(cfg.model.pretrained).expanduser().is_dir():
            raise ConfigError(f"model.pretrained: directory not found: {cfg.model.pretrained}")
    _validate_tune(cfg)


SEARCH_DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
# Keys a sweep sets for each trial, or that only say where things go: never searched.
_NOT_SEARCHABLE = ("tune.", "mlflow.", "ray.", "output_dir", "train.name", "train.storage_path")


def config_key_hint(key: str) -> Any:
    """The type of dotted config key `key`; ConfigError when the schema has no such key."""
    hint: Any = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(hint) or part not in {f.name for f in dataclasses.fields(hint)}:
            raise ConfigError(f"tune.search_space.{key}: not a config key")
        hint = typing.get_type_hints(hint)[part]
    if dataclasses.is_dataclass(hint):
        raise ConfigError(f"tune.search_space.{key}: a section, not a key")
    return hint


def _validate_tune(cfg: Config) -> None:
    t = cfg.tune
    for key in ("num_samples", "metric_window", "grace_period"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"tune.{key}: must be positive, got {getattr(t, key)}")
    if not t.trial_cpus > 0:
        raise ConfigError(f"tune.trial_cpus: must be positive, got {t.trial_cpus}")
    if t.max_concurrent_trials < 0:
        raise ConfigError("tune.max_concurrent_trials: must be 0 (no limit) or more")
    if not t.reduction_factor > 1:
        raise ConfigError(f"tune.reduction_factor: must be above 1, got {t.reduction_factor}")
    for key, spec in t.search_space.items():
        where = f"tune.search_space.{key}"
        if key.startswith(_NOT_SEARCHABLE):
            raise ConfigError(f"{where}: not searchable (set per trial or by the sweep)")
        hint = config_key_hint(key)
        if len(spec) != 1 or next(iter(spec)) not in SEARCH_DISTRIBUTIONS:
            raise ConfigError(f"{where}: expected one of {{{', '.join(SEARCH_DISTRIBUTIONS)}}}: [...]")
        ((dist, args),) = spec.items()
        if dist in ("choice", "grid"):
            if not args:
                raise ConfigError(f"{where}.{dist}: no values")
            values = [_check_value(v, hint, f"{where}.{dist}[{i}]") for i, v in enumerate(args)]
        else:
            if len(args) != 2:
                raise ConfigError(f"{where}.{dist}: expected [low, high], got {args}")
            if dist == "randint":
                values = [_check_value(v, hint, f"{where}.{dist}") for v in args]
                values[1] -= 1  # high is exclusive
            else:
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in args):
                    raise ConfigError(f"{where}.{dist}: expected two numbers, got {args}")
                values = [_check_value(float(v), hint, f"{where}.{dist}") for v in args]
            if not values[0] <= values[1]:
                raise ConfigError(f"{where}.{dist}: low must be below high, got {args}")
            if dist == "loguniform" and values[0] <= 0:
                raise ConfigError(f"{where}.loguniform: bounds must be positive, got {args}")
        # Every value a trial can get must make a valid config (e.g. a positive lora.rank).
        for value in values:
            tree = cfg.to_dict()
            del tree["tune"]
            try:
                config_from_dict(set_key(tree, key, value), check_files=False)
            except ConfigError as err:
                raise ConfigError(f"{where}: value {value!r} gives an invalid config: {err}") from None
    steps = t.max_t or cfg.train.max_steps
    if t.search_space and steps < t.grace_period:
        key = "tune.max_t" if t.max_t else "train.max_steps"
        raise ConfigError(f"{key}: {steps} steps per trial is below tune.grace_period {t.grace_period}")


def config_from_dict(tree: dict[str, Any], check_files: bool = True) -> Config:
    cfg = _build(Config, tree, "")
    _validate_semantics(cfg, check_files)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None, check_files: bool = True) -> Config:
    """Read a YAML run config, apply `key=value` overrides and validate everything."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    with path.open() as f:
        tree = yaml.safe_load(f) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    tree = apply_overrides(tree, overrides or [])
    return config_from_dict(tree, check_files=check_files)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the MLflow param names (search with params.`lora.rank`)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
