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

from svdray import storage
from svdray.data.buckets import parse_bucket
from svdray.models import family_config, registered_families


class ConfigError(ValueError):
    """A config problem, always naming the offending dotted key."""


@dataclass
class ModelConfig:
    # The model family (svdray/models): "svd" for Stable Video Diffusion / SVD-XT, "wan" for Wan
    # image-to-video. Its options live in the section of the same name (`svd:`, `wan:`). A family
    # defined outside svdray: the import path "package.module:Class" of its FamilyConfig.
    family: str = "svd"
    # A local pipeline directory (e.g. a downloaded SVD-XT) or a Hugging Face hub id.
    pretrained: str = "stabilityai/stable-video-diffusion-img2vid-xt"
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16" to read the half-precision weight files
    # dtype of the frozen encoders (VAE, image and text encoders).
    frozen_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # dtype of the denoiser's frozen weights (SVD's UNet, Wan's transformer); its LoRA weights (and
    # their gradients and AdamW state) stay float32. bfloat16 halves SVD's 6.1 GB UNet and needs
    # train.mixed_precision: bf16. float8: the linear (and SVD's convolution) weights of every
    # block stored as float8 e4m3 with a scale per output channel and computed in bf16, one layer
    # at a time (svdray/models/float8.py): half of bf16's bytes; norms, biases, embeddings and the
    # head stay bf16. Also needs bf16.
    denoiser_dtype: Literal["float32", "bfloat16", "float8"] = "float32"


@dataclass
class DataConfig:
    # JSON Lines, CSV or Parquet with {"video", "image"?, "prompt"?, "fps"?, "motion_bucket_id"?,
    # "start_frame"?} (relative paths resolve to its folder), a folder of videos, a Hugging Face
    # `datasets` folder (save_to_disk), or a folder written by `svdray prepare` (not probed again).
    manifest: str = ""
    num_frames: int = 14
    height: int = 320
    width: int = 512
    fps: float = 7.0  # frames are sampled by timestamp at this rate; also the fps conditioning
    start: Literal["first", "random"] = "random"
    crop: Literal["center", "random"] = "center"
    decode_cpus: float = 1.0  # CPUs per decoder (a Ray Data actor)
    decoders: int = 0  # most decoders at once; 0: as many as the cluster's CPUs hold at decode_cpus
    # false: bad rows are rejected (listed in rejects.jsonl, counted in MLflow) and training goes
    # on; true: any bad row stops the run before training, listing every one.
    strict: bool = False
    shuffle: bool = True
    # Aspect-ratio buckets as "HxW" (e.g. ["320x512", "512x320"]): each clip trains at the one
    # closest to its aspect ratio, every batch from one bucket. Empty: all at height x width.
    buckets: list[str] = field(default_factory=list)
    # Latent cache (`svdray cache`): VAE latent mean/std of each clip and CLIP embedding of its
    # conditioning image, computed once; training then runs neither on the clips.
    cache: bool = False
    cache_dir: str = ""  # default: $XDG_CACHE_HOME/svdray/latents (~/.cache/svdray/latents)
    cache_batch_size: int = 4  # clips per encoder batch and per shard file
    cache_actors: int = 0  # encoder actors; 0: one per GPU in the cluster, or one without GPUs


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
    grad_accum: int = 1  # micro-batches per update at the most workers (see global_batch)
    # A fixed count, or [min, max]: elastic (Ray Train's ScalingConfig(num_workers=(min, max))),
    # the worker group restarting at whatever count the cluster's free resources allow, between
    # the two, after a lost node or once more nodes have joined.
    num_workers: int | list[int] = 1
    # Examples per optimizer update, all workers together, whatever their current count; each
    # (re)start sets the accumulation to global_batch_size / (batch_size x workers). Unset:
    # batch_size x grad_accum x the most workers (num_workers, or its max).
    global_batch_size: int | None = None
    # Elastic runs: how often (seconds) Ray Train checks whether more workers fit than are running
    # and, if so, restarts the group larger from the latest checkpoint (Ray's default: 60).
    elastic_resize_interval_s: float = 60.0
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # Where the workers go on a multi-node cluster (Ray Train's placement group strategy): "pack"
    # fills a node before the next (collectives stay on one machine), "spread" puts each worker on
    # its own node where it can (one preempted node costs one worker's slot, not all of them).
    placement: Literal["pack", "spread"] = "pack"
    # How the denoiser is spread over the workers (svdray/train/parallel.py): "ddp" replicates it
    # (each worker holds all of it); "fsdp" shards it over all workers (FSDP2: weights, LoRA
    # gradients and AdamW state split N ways, each block gathered only while it runs); "hsdp"
    # shards it within each node and replicates it across nodes (needs placement: pack and the
    # same worker count on every node).
    parallel: Literal["ddp", "fsdp", "hsdp"] = "ddp"
    # Context parallelism: each clip's tokens split over this many consecutive workers (one
    # context-parallel group, on one node), which train on the same clip; the other axis of the
    # mesh is data parallel (num_workers / context_parallel groups, each its own clips), with
    # train.parallel spreading the weights over all workers. Wan only (diffusers' plan for its
    # transformer); 1 turns it off.
    context_parallel: int = 1
    # "ulysses" (an all-to-all of heads around each attention; its degree must divide the heads)
    # or "ring" (keys and values passed around the group; needs an attention kernel that returns
    # the log-sum-exp: train.context_parallel_attention).
    context_parallel_kind: Literal["ulysses", "ring"] = "ulysses"
    # diffusers' attention backend under context parallelism (its `set_attention_backend` names:
    # "native" is torch's SDPA, any device; ring needs one that returns the log-sum-exp, e.g.
    # "_native_cudnn", "_native_flash" or "flash" on a GPU). null: the model's own ("native").
    context_parallel_attention: str | None = None
    # Custom Ray resources each worker also needs, e.g. {"trainer": 1} where only the GPU nodes
    # offer "trainer" (CPU and GPU come from cpus_per_worker and use_gpu).
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    mixed_precision: Literal["no", "bf16"] = "no"
    # false; true: diffusers' own (ResNet blocks and spatial attention blocks only); "full": also
    # every temporal attention block and the rest of each spatio-temporal transformer
    # (svdray/models/svd/checkpointing.py), about 4x less activation memory than true at 576x1024.
    gradient_checkpointing: bool | Literal["full"] = False
    # Keep what the forward saves for backward in host memory until backward needs it (torch's
    # save_on_cpu): with checkpointing, every block's input (Wan 14B at 81x480x832: 13 GiB) leaves
    # the GPU, at the cost of copying it out and back once per step (svdray/train/step.py).
    offload_activations: bool = False
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 1  # MLflow step metrics and the progress line
    # Metric-only reports to Ray (Tune's ASHA sees these; checkpoints always report). Ray Train
    # 2.60 takes at most one report per ~2 s poll and blocks the loop on the next one, so
    # reporting every fast step would make each step last 2 s (benchmarks/trainer_overhead.py).
    report_every: int = 10
    seed: int = 0
    storage_path: str = ""  # Ray Train results; defaults to <output_dir>/ray
    # How a checkpoint reaches storage_path: "sync" copies it before the step after it starts;
    # "async" copies it in a background thread while training goes on (Ray Train's
    # CheckpointUploadMode.ASYNC; worth it when storage_path is a slow network or cloud store).
    checkpoint_upload: Literal["sync", "async"] = "sync"
    # Debug aid: every worker also saves its own final LoRA to <output_dir>/workers/rank<N>,
    # to check that DDP kept the replicas identical.
    save_worker_loras: bool = False
    # A checkpoint folder (<storage>/<name>/step_N) to start from when this run has none of its own.
    resume_from: str | None = None
    # Worker-group failures (a dead worker, node or process) survived by restarting from the
    # latest checkpoint; -1 means no limit.
    max_failures: int = 0
    # An update whose loss or gradient is not finite is skipped; this many in a row stop the run.
    max_bad_steps: int = 5
    # Fault injection for tests and drills: the loss of these steps (1-based) is multiplied by NaN.
    debug_nan_at_steps: list[int] = field(default_factory=list)

    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers; equal for a fixed count."""
        if isinstance(self.num_workers, int):
            return self.num_workers, self.num_workers
        low, high = self.num_workers
        return low, high

    def elastic(self) -> bool:
        low, high = self.worker_range()
        return isinstance(self.num_workers, list) and low != high

    def data_parallel(self, world_size: int) -> int:
        """Data-parallel ranks of `world_size` workers: the groups that each train on their own
        clips (a context-parallel group of `context_parallel` workers shares one)."""
        return world_size // self.context_parallel

    def global_batch(self) -> int:
        """Examples per optimizer update, all workers together: the one definition the driver (the
        plan's length, Tune's shared stream, the run description) and the workers use."""
        if self.global_batch_size is not None:
            return self.global_batch_size
        return self.batch_size * self.grad_accum * self.data_parallel(self.worker_range()[1])

    def grad_accum_at(self, world_size: int) -> int:
        """Micro-batches per update with `world_size` workers, so that an update keeps global_batch."""
        per_micro_step = self.batch_size * self.data_parallel(world_size)
        if self.global_batch() % per_micro_step:
            raise ConfigError(
                f"train.global_batch_size: {self.global_batch()} examples per update is not divisible by "
                f"train.batch_size x workers = {self.batch_size} x {self.data_parallel(world_size)}"
                + (" (data-parallel groups of train.context_parallel)" if self.context_parallel > 1 else "")
            )
        return self.global_batch() // per_micro_step

    def at_world_size(self, world_size: int) -> TrainConfig:
        """This config for a worker group of `world_size`: the same global batch (pinned), the
        accumulation that makes it up."""
        return dataclasses.replace(
            self, global_batch_size=self.global_batch(), grad_accum=self.grad_accum_at(world_size)
        )

    def bucket_run(self) -> int:
        """Examples the plan keeps in one aspect-ratio bucket: one micro-step of all workers
        (batch_size x data-parallel workers); elastic, the whole update, which every count's
        micro-steps divide."""
        if self.elastic():
            return self.global_batch()
        return self.batch_size * self.data_parallel(self.worker_range()[1])


@dataclass
class SpeedConfig:
    """Memory/speed options applied by `svdray.models.speed`; `benchmarks/train_step.py` measures each.

    Gradient checkpointing (`train.gradient_checkpointing`), bf16 autocast (`train.mixed_precision`)
    and the frozen models' dtype (`model.frozen_dtype`) live in their own sections.
    """

    # Scaled-dot-product attention kernel for the UNet's and VAE's attention; "default" lets torch pick.
    attention: Literal["default", "flash", "efficient", "cudnn", "math"] = "default"
    vae_chunk: int = 16  # frames per VAE encode call: smaller bounds encode memory at full resolution
    compile_denoiser: bool = (
        False  # torch.compile the UNet/transformer in place (the first steps pay the compile)
    )
    fused_adamw: bool | None = None  # AdamW's fused kernel; null: fused on CUDA, for-each elsewhere
    channels_last: bool = False  # UNet and VAE convolution weights in channels-last memory format


@dataclass
class SampleConfig:
    """How videos are sampled: after training, in validation (`validate.steps`/`seed` aside), in
    the reward stage (unless `reward.*` overrides) and by `svdray sample --lora` from this run.
    Unset keys follow training (`svdray.models.svd.sampler.sampling_spec`), so a sample is conditioned
    as the UNet was trained."""

    enabled: bool = True  # sample a video after training
    image: str | None = None  # conditioning image; default: first frame of the first clip
    num_frames: int | None = None  # default: data.num_frames
    steps: int = 25
    fps: float | None = None  # default: data.fps (SVD's UNet gets fps - 1, as in training)
    seed: int = 0


@dataclass
class ValidateConfig:
    # Held-out clips (a manifest like data.manifest); empty turns validation off.
    manifest: str = ""
    every: int = 500  # steps between validations; the last step always validates
    # Where it runs. "inline": in the training loop, on every worker, between two steps.
    # "checkpoint": outside the training step, as Ray Train's checkpoint validation (a Ray task
    # with its own copy of the model, on the checkpoint of every `every`-th step, while training
    # goes on); `every` must then be a multiple of train.checkpoint_every.
    mode: Literal["inline", "checkpoint"] = "inline"
    max_clips: int | None = None  # clips for the validation loss (default: all of the manifest)
    num_videos: int = 2  # clips whose first frame conditions a sampled video (0: loss only)
    steps: int = 25  # sampler steps for those videos (fps, motion, guidance come from `sample`)
    seed: int = 0  # fixes the validation noise and the sampler noise: comparable across runs


@dataclass
class MlflowConfig:
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "svdray"
    run_name: str | None = None  # default: train.name
    # Added to the run's description in the MLflow UI (which also says command, model, data, outputs).
    description: str = ""
    # Where a new experiment keeps its artifacts, e.g. s3://bucket/mlflow: MLflow's client (boto3)
    # writes there itself. Empty: beside a sqlite store, or wherever the tracking server says.
    artifact_location: str = ""


@dataclass
class RayConfig:
    address: str | None = None  # None: connect to RAY_ADDRESS if set, else start a local instance
    num_cpus: int | None = None  # only for a local instance
    dashboard_host: str = "127.0.0.1"


@dataclass
class RewardComponentConfig:
    kind: str = "motion"  # fidelity | smoothness | motion | learned | "package.module:Class"
    weight: float = 1.0
    name: str | None = None  # metric name; default: kind
    options: dict[str, Any] = field(default_factory=dict)  # constructor arguments, e.g. {target: 0.05}


@dataclass
class RewardConfig:
    """Stage 2 (`svdray reward-train`): reward-gradient fine-tuning. Uses model, data (for the
    conditioning images: each clip's first frame), lora, optim, train and mlflow as well."""

    components: list[RewardComponentConfig] = field(default_factory=lambda: [RewardComponentConfig()])
    convert_inputs: bool = True  # hand each reward frames in its declared range
    init_lora: str | None = None  # start from a supervised LoRA folder (its rank/targets win)
    sample_steps: int = 8  # denoising steps per sample
    grad_steps: int = 1  # K: backpropagate through the last K denoising steps only
    num_frames: int | None = None  # default: data.num_frames
    # The sampled videos' fps conditioning; null: as `sample.fps` (which follows training). The
    # family's own sampling options come from its section (e.g. `svd.reward`).
    fps: float | None = None
    decode_chunk: int = 8
    check_every: int = 10  # rerun the diagnostics every N steps; stop if rewards collapse
    eval_manifest: str | None = None  # held-out clips for before/after grids; default: data.manifest
    eval_images: int = 2
    seed: int = 0


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
    # The loop metric to optimise: `loss`, or `val_loss` (needs validate.manifest). Tune sees
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


def _registered_sections() -> dict[str, Any]:
    return {spec.name: spec.section() for spec in registered_families()}


@dataclass
class Config:
    """The whole run: the shared sections, and each model family's own (`cfg.svd`, `cfg.wan`;
    only model.family's may differ from its defaults), whose schema and rules the family owns
    (`svdray.models.FamilyConfig`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    # Family section name -> its dataclass: every built-in family's and model.family's own.
    families: dict[str, Any] = field(default_factory=_registered_sections)
    output_dir: str = "outputs/svdray"

    def __post_init__(self) -> None:
        spec = family_config(self.model.family)
        self.families.setdefault(spec.name, spec.section())

    def __getattr__(self, name: str) -> Any:
        """A family's section as an attribute (`cfg.svd`); read through __dict__, as a half-built
        object (a copy or an unpickling) has no `families` yet."""
        families = self.__dict__.get("families") or {}
        if name in families:
            return families[name]
        raise AttributeError(f"{type(self).__name__} has no section {name!r}")

    @property
    def family_section(self) -> str:
        """The key of model.family's own section (its name; `svd` for `model.family: svd`)."""
        return family_config(self.model.family).name

    def to_dict(self) -> dict[str, Any]:
        """The YAML tree: the family sections sit at the top level, as in the YAML file."""
        tree: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "families":
                tree.update({name: dataclasses.asdict(section) for name, section in value.items()})
            else:
                tree[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        return tree


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
        return build_section(hint, value, key)
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


def build_section(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """The dataclass `cls` from a mapping, every value checked; errors name `prefix`.key."""
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


def _validate_workers(train: TrainConfig) -> None:
    """num_workers (a count or [min, max]) and a global batch every count in that range divides."""
    if isinstance(train.num_workers, list) and len(train.num_workers) != 2:
        raise ConfigError(f"train.num_workers: expected a count or [min, max], got {train.num_workers}")
    low, high = train.worker_range()
    if low < 1:
        raise ConfigError(f"train.num_workers: must be at least 1, got {train.num_workers}")
    if low > high:
        raise ConfigError(f"train.num_workers: [min, max] with min <= max, got {train.num_workers}")
    if train.global_batch_size is not None:
        if train.global_batch_size <= 0:
            raise ConfigError(f"train.global_batch_size: must be positive, got {train.global_batch_size}")
        if train.grad_accum != 1 and train.batch_size * train.grad_accum * high != train.global_batch_size:
            raise ConfigError(
                f"train.grad_accum: {train.grad_accum} disagrees with train.global_batch_size="
                f"{train.global_batch_size} (batch_size {train.batch_size} x grad_accum x {high} workers); "
                "set one of them"
            )
    if train.context_parallel < 1:
        raise ConfigError(f"train.context_parallel: must be at least 1, got {train.context_parallel}")
    if train.context_parallel > 1 and train.elastic():
        # Ray Train's elastic group takes any count in [min, max]; one that is no multiple of the
        # group size would leave a clip split over a partial group.
        raise ConfigError(
            f"train.num_workers: elastic [min, max] with train.context_parallel: "
            f"{train.context_parallel} is not supported; give a fixed count (a multiple of it)"
        )
    for count in {low, high}:
        if count % train.context_parallel:
            raise ConfigError(
                f"train.context_parallel: {train.context_parallel} workers per clip must divide "
                f"train.num_workers ({count}): the workers form data-parallel groups of that size"
            )
    if train.context_parallel_kind == "ring" and not train.context_parallel_attention:
        raise ConfigError(
            "train.context_parallel_kind: ring needs an attention backend that returns the "
            "log-sum-exp (torch's SDPA, diffusers' 'native', does not): set "
            "train.context_parallel_attention, e.g. _native_cudnn or flash on a GPU"
        )
    if train.elastic_resize_interval_s <= 0:
        raise ConfigError(
            f"train.elastic_resize_interval_s: must be positive, got {train.elastic_resize_interval_s}"
        )
    for workers in range(low, high + 1, train.context_parallel):
        train.grad_accum_at(workers)  # raises naming train.global_batch_size


def _validate_semantics(cfg: Config, check_files: bool) -> None:
    positive = {
        "data.num_frames": cfg.data.num_frames,
        "data.height": cfg.data.height,
        "data.width": cfg.data.width,
        "lora.rank": cfg.lora.rank,
        "train.max_steps": cfg.train.max_steps,
        "train.batch_size": cfg.train.batch_size,
        "train.grad_accum": cfg.train.grad_accum,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "train.log_every": cfg.train.log_every,
        "train.report_every": cfg.train.report_every,
        "sample.steps": cfg.sample.steps,
        "train.max_bad_steps": cfg.train.max_bad_steps,
        "validate.every": cfg.validate.every,
        "validate.steps": cfg.validate.steps,
        "speed.vae_chunk": cfg.speed.vae_chunk,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    for key, value in {
        "reward.sample_steps": cfg.reward.sample_steps,
        "reward.check_every": cfg.reward.check_every,
        "reward.decode_chunk": cfg.reward.decode_chunk,
    }.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    if not 1 <= cfg.reward.grad_steps <= cfg.reward.sample_steps:
        raise ConfigError("reward.grad_steps: must be between 1 and reward.sample_steps")
    for key, value in {
        "data.fps": cfg.data.fps,
        "optim.lr": cfg.optim.lr,
        "sample.fps": cfg.sample.fps,
        "reward.fps": cfg.reward.fps,
    }.items():
        if value is not None and not value > 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    if not cfg.lora.blocks:
        raise ConfigError("lora.blocks: choose at least one of spatial, temporal")
    _validate_workers(cfg.train)
    for name, amount in cfg.train.resources_per_worker.items():
        if name in ("CPU", "GPU"):
            raise ConfigError(
                f"train.resources_per_worker.{name}: set by train.cpus_per_worker / train.use_gpu, not here"
            )
        if not amount > 0:
            raise ConfigError(f"train.resources_per_worker.{name}: must be positive, got {amount}")
    if cfg.train.parallel == "hsdp" and cfg.train.placement != "pack":
        raise ConfigError(
            "train.parallel: hsdp shards the model within each node's workers and needs "
            "train.placement: pack (spread puts one worker on each node: nothing to shard)"
        )
    if cfg.train.max_failures < -1:
        raise ConfigError(f"train.max_failures: must be -1 (no limit) or >= 0, got {cfg.train.max_failures}")
    if cfg.validate.num_videos < 0 or (cfg.validate.max_clips is not None and cfg.validate.max_clips <= 0):
        raise ConfigError("validate.num_videos/validate.max_clips: must be positive")
    if cfg.validate.mode == "checkpoint" and cfg.validate.every % cfg.train.checkpoint_every:
        raise ConfigError(
            f"validate.every: {cfg.validate.every} with validate.mode: checkpoint must be a multiple of "
            f"train.checkpoint_every ({cfg.train.checkpoint_every}): it validates checkpoints"
        )
    if cfg.tune.search_space and cfg.tune.metric == "val_loss" and not cfg.validate.manifest:
        raise ConfigError(
            "tune.metric: val_loss needs validate.manifest (the held-out clips it is the loss of)"
        )
    if cfg.validate.mode == "checkpoint" and cfg.tune.metric == "val_loss":
        raise ConfigError(
            "tune.metric: val_loss needs validate.mode: inline (checkpoint validations finish "
            "after the step they validate, too late for the trial's reports)"
        )
    if len(cfg.optim.betas) != 2:
        raise ConfigError("optim.betas: expected two numbers")
    for key, side in (("data.height", cfg.data.height), ("data.width", cfg.data.width)):
        if side % 8:
            raise ConfigError(f"{key}: {side} is not a multiple of 8 (the VAE downsamples by up to 8)")
    for i, bucket in enumerate(cfg.data.buckets):
        try:
            height, width = parse_bucket(bucket)
        except ValueError as err:
            raise ConfigError(f"data.buckets[{i}]: {err}") from None
        if not height or not width or height % 8 or width % 8:
            raise ConfigError(f"data.buckets[{i}]: {bucket!r}: sides must be positive multiples of 8")
    if cfg.model.denoiser_dtype != "float32" and cfg.train.mixed_precision != "bf16":
        raise ConfigError(
            f"model.denoiser_dtype: {cfg.model.denoiser_dtype} frozen weights need "
            "train.mixed_precision: bf16"
        )
    if cfg.data.decoders < 0:
        raise ConfigError(f"data.decoders: must be 0 (as many as CPUs hold) or more, got {cfg.data.decoders}")
    if cfg.data.cache_batch_size <= 0:
        raise ConfigError(f"data.cache_batch_size: must be positive, got {cfg.data.cache_batch_size}")
    if check_files:
        if not cfg.data.manifest:
            raise ConfigError("data.manifest: required")
        _check_object_storage(cfg)
        if _missing_local(cfg.data.manifest):
            raise ConfigError(f"data.manifest: file not found: {cfg.data.manifest}")
        if _missing_local(cfg.validate.manifest):
            raise ConfigError(f"validate.manifest: file not found: {cfg.validate.manifest}")
        if cfg.train.resume_from and not storage.is_remote(cfg.train.resume_from):
            from svdray.safeload import check_folder

            try:
                check_folder(cfg.train.resume_from, "train.resume_from")
            except (OSError, ValueError) as err:  # a pickle, a file, a missing folder
                raise ConfigError(str(err)) from err
        if _missing_local(cfg.sample.image):
            raise ConfigError(f"sample.image: file not found: {cfg.sample.image}")
        looks_local = cfg.model.pretrained.startswith((".", "/", "~")) or cfg.model.pretrained.count("/") > 1
        if Path(cfg.model.pretrained).expanduser().exists():
            from svdray.safeload import check_pipeline_folder

            try:
                check_pipeline_folder(Path(cfg.model.pretrained).expanduser(), "model.pretrained")
            except (OSError, ValueError) as err:  # a pickled checkpoint, a pickled pipeline, a file
                raise ConfigError(str(err)) from err
        if looks_local and not Path(cfg.model.pretrained).expanduser().is_dir():
            raise ConfigError(f"model.pretrained: directory not found: {cfg.model.pretrained}")
    _validate_family_sections(cfg)
    family = family_config(cfg.model.family)
    if cfg.train.context_parallel > 1 and not family.context_parallel:
        raise ConfigError(
            f"train.context_parallel: {cfg.train.context_parallel}, but model.family {family.name}'s "
            "denoiser has no context-parallel plan (a clip cannot be split over workers); leave it at 1"
        )
    family.check(cfg)
    _validate_tune(cfg)


def _missing_local(path: str | None) -> bool:
    """A local path given but not there (object URIs are `_check_object_storage`'s)."""
    return bool(path) and not storage.is_remote(path) and not Path(path).exists()


def _check_object_storage(cfg: Config) -> None:
    """Every object-storage URI the run will read or write answers, now, before anything starts:
    reachable endpoint, valid credentials, existing bucket and (for inputs) object; a clear error
    naming the key and the URI within SVDRAY_STORAGE_TIMEOUT_S otherwise (svdray.storage.check)."""
    uris = {
        "data.manifest": (cfg.data.manifest, "file"),
        "validate.manifest": (cfg.validate.manifest, "file"),
        "sample.image": (cfg.sample.image, "file"),
        "train.resume_from": (cfg.train.resume_from, "folder"),
        "train.storage_path": (cfg.train.storage_path, "bucket"),
        "data.cache_dir": (cfg.data.cache_dir if cfg.data.cache else "", "bucket"),
        "mlflow.artifact_location": (cfg.mlflow.artifact_location, "bucket"),
    }
    if cfg.mlflow.artifact_location.startswith("gs://"):
        raise ConfigError(
            "mlflow.artifact_location: MLflow's client writes s3:// artifacts (boto3); for gs:// run a "
            "tracking server that proxies them (svdray ui --artifacts-destination)"
        )
    for key, (path, need) in uris.items():
        try:
            storage.check(path, key, need)
        except storage.StorageError as err:
            raise ConfigError(str(err)) from None


def _validate_family_sections(cfg: Config) -> None:
    """Only the run's own family section may be set (another family's would be silently ignored)."""
    for section, values in cfg.families.items():
        if section != cfg.family_section and values != type(values)():
            raise ConfigError(
                f"{section}: options of model.family {section}, but this run's model.family is "
                f"{cfg.model.family} (remove the section or set model.family: {section})"
            )


SEARCH_DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
# Keys a sweep sets for each trial, or that only say where things go: never searched.
_NOT_SEARCHABLE = ("tune.", "mlflow.", "ray.", "output_dir", "train.name", "train.storage_path")


def config_key_hint(key: str, cfg: Config | None = None) -> Any:
    """The type of dotted config key `key` (in `cfg`'s family sections, or the built-in families');
    ConfigError when the schema has no such key."""
    first, *rest = key.split(".")
    sections = cfg.families if cfg is not None else _registered_sections()
    if first in sections:
        hint: Any = type(sections[first])
    elif first in _SHARED_KEYS:
        hint = typing.get_type_hints(Config)[first]
    else:
        raise ConfigError(f"tune.search_space.{key}: not a config key")
    for part in rest:
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
        hint = config_key_hint(key, cfg)
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


# The top-level keys besides the family sections (`families` is not one: it holds them).
_SHARED_KEYS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "families")


def build_config(tree: dict[str, Any]) -> Config:
    """The Config of a YAML tree, every value checked: the shared sections, and the family
    sections the registry knows (the built-in ones and model.family's own)."""
    model = _check_value(tree.get("model", {}), ModelConfig, "model")
    try:
        run_family = family_config(model.family)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    sections = {spec.name: spec.section for spec in (*registered_families(), run_family)}
    known = set(_SHARED_KEYS) | set(sections)
    for name in tree:
        if name not in known:
            raise ConfigError(f"{name}: unknown key (known keys here: {', '.join(sorted(known))})")
    hints = typing.get_type_hints(Config)
    shared = {name: _check_value(tree[name], hints[name], name) for name in _SHARED_KEYS if name in tree}
    families = {name: _check_value(tree.get(name, {}), section, name) for name, section in sections.items()}
    return Config(**shared, families=families)


def config_from_dict(tree: dict[str, Any], check_files: bool = True) -> Config:
    cfg = build_config(tree)
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
