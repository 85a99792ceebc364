"""Training step time, memory and MFU of SVD-XT LoRA, plain PyTorch against svdray's Ray Train loop.

Builds the full-size SVD-XT architecture with random weights (no download; `--tiny` for the tiny
test pipeline instead), saves it once, and then, for each case (frames x height x width, batch,
LoRA rank) and each config variant, measures:

  (a) plain: one process, `build_models` + AdamW + `training_loss` in a bare loop, no Ray, no MLflow;
  (b) trainer: `svdray.train.loop.train_loop_per_worker` unchanged, under a TorchTrainer with one
      worker, fed the same uint8 batches from a Ray Data dataset (no decoding), logging to MLflow.

Reported per measurement: median step time after warm-up, frames/s, peak memory
(`torch.cuda.max_memory_allocated`; on CPU the process's peak RSS), model FLOPs of one step and
MFU. FLOPs are counted with `FlopCounterMode` over the same `training_loss` + backward on the meta
device: model FLOPs (matmuls and convolutions, no gradient-checkpointing recompute), whatever
attention kernel runs. MFU divides them by the step time and by the matmul rate measured in the
same run (bf16 8192^3 on a GPU, fp32 on a CPU). Step times are step-end to step-end wall time; for
(b) the step ends are MLflow's timestamps of rank 0's metrics, logged every `train.log_every` steps
(10 here, as in configs/svd_xt_lora.yaml), so Ray's and MLflow's per-step costs are inside them.

    # tiny model on CPU (the test runs this):
    python benchmarks/train_step.py --tiny --out results.json
    # the H100 matrix of benchmarks/RESULTS.md, one call:
    python benchmarks/train_step.py --preset h100 --out train_step_h100.json
    # Wan image-to-video: model FLOPs per step at full size, counted on the meta device
    # (benchmarks/wan_flops.py's cases: TI2V-5B, Wan2.1-I2V-14B, one A14B expert):
    python benchmarks/train_step.py --family wan --out wan_flops.json

`--vary` measures config variants of the first case: `all` flips each speed/memory option from the
baseline (`--set`), or give `key=value` overrides, one variant each; `cached_latents` times the
UNet step alone on precomputed latents (what a latent cache leaves in the step).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # never log benchmark runs to a user's server

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from svdray.config import Config, SpeedConfig, apply_overrides, config_from_dict  # noqa: E402
from svdray.models import family_of, get_family  # noqa: E402
from svdray.models.base import ModelFamily, TrainingModels  # noqa: E402
from svdray.models.lora import lora_parameters  # noqa: E402

# cached_latents (below) is SVD's UNet step alone on precomputed latents: its own loss parts.
from svdray.models.svd.loss import EncodedBatch, apply_cfg_dropout, diffusion_loss, encode_batch  # noqa: E402
from svdray.models.svd.objective import sample_sigmas  # noqa: E402
from svdray.train.optim import build_lr_scheduler, build_optimizer  # noqa: E402
from svdray.train.parallel import Workers, parallelize  # noqa: E402
from svdray.train.step import update  # noqa: E402

CACHED = "cached_latents"
ARCHITECTURE = "SVD-XT"  # what the SVD family builds at full size (SVDFamily.architectures)

# The H100 matrix of benchmarks/RESULTS.md: every shape and rank at the baseline, every option
# flipped on the headline case (the first), and the Ray Train loop against the plain loop on it.
PRESETS = {
    "h100": dict(
        shapes=["25x576x1024", "14x576x1024", "25x320x512", "14x320x512"],
        ranks=[64, 16],
        batch=1,
        warmup=2,
        steps=4,
        vary=["all"],
        trainer=True,
        set=[
            "train.gradient_checkpointing=true",
            "train.mixed_precision=bf16",
            "model.frozen_dtype=bfloat16",
        ],
        budget_s=450,
    ),
}


# --------------------------------------------------------------------------------------------
# Models: the family builds them (svdray/models/<family>/: tiny, full size with random weights,
# full size on the meta device)


def save_pipeline(tiny: bool, out_dir: Path, configs_only: bool = False) -> Path:
    """Write the pipeline once; both loops then load it with `from_pretrained` like a real SVD-XT.
    `configs_only` writes just the components' configs: enough to count FLOPs on meta."""
    family = get_family("svd")
    if tiny:
        return family.save_tiny_pipeline(out_dir, seed=0)
    out = family.save_full_size_pipeline(out_dir, ARCHITECTURE, weights=not configs_only)
    release_memory()
    return out


def flops_config(cfg: Config) -> Config:
    """`cfg` for counting model FLOPs on meta models: float32 weights, no gradient checkpointing
    (its recompute is not model FLOPs), default kernels; none of them changes the model FLOPs."""
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, frozen_dtype="float32", denoiser_dtype="float32"),
        train=dataclasses.replace(cfg.train, gradient_checkpointing=False),
        speed=SpeedConfig(),
    )


# --------------------------------------------------------------------------------------------
# The step, its FLOPs, the machine's matmul rate


def cached_step_loss(
    unet: torch.nn.Module, encoded: EncodedBatch, cfg: Config, generator: torch.Generator | None
) -> torch.Tensor:
    """`training_loss` after the encoders: CFG dropout, sigmas and noise on precomputed latents."""
    size, device = encoded.latents.shape[0], encoded.latents.device
    encoded = apply_cfg_dropout(encoded, cfg.svd.cfg_dropout, generator)
    sigma = sample_sigmas(size, cfg.svd.p_mean, cfg.svd.p_std, generator, device)
    noise = torch.randn(encoded.latents.shape, generator=generator, device=device)
    return diffusion_loss(unet, encoded, sigma, noise).mean()


def count_step_flops(
    frozen: Any,
    unet: torch.nn.Module,
    cfg: Config,
    batch: dict[str, torch.Tensor],
    cached: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """FLOPs of one step (forward and backward) as FlopCounterMode counts them, by operator."""
    if cached:  # the encoders ran ahead of training: their FLOPs are not part of this step
        strength = torch.full((batch["video"].shape[0],), 0.05, device=batch["video"].device)
        encoded = encode_batch(frozen, batch, strength, generator)
    with FlopCounterMode(display=False) as counter:
        if cached:
            loss = cached_step_loss(unet, encoded, cfg, generator)
        else:
            loss = family_of(cfg).training_loss(unet, frozen, batch, cfg, generator)
        loss.backward()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return {"total": counter.get_total_flops(), "by_op": by_op}


def model_flops(cfg: Config, cached: bool) -> dict[str, Any]:
    """Model FLOPs of one step for this config's shape and LoRA, counted on the meta device."""
    models = family_of(cfg).meta_models(flops_config(cfg))
    batch = example_batch(cfg, "meta")
    return count_step_flops(models.frozen, models.denoiser, cfg, batch, cached)


def matmul_rate(device: torch.device) -> dict[str, Any]:
    """Achieved matmul FLOP/s: bf16 8192^3 on a GPU (the MFU denominator), fp32 1024^3 on a CPU."""
    cuda = device.type == "cuda"
    n, dtype, iters = (8192, torch.bfloat16, 50) if cuda else (1024, torch.float32, 10)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(iters):
        a @ b
    synchronize(device)
    seconds = time.perf_counter() - started
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "flops_per_s": 2 * n**3 * iters / seconds}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
            "memory_kind": "cuda max_memory_allocated",
        }
    # ru_maxrss is in KiB on Linux and never goes down: the process's peak so far.
    return {
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "memory_kind": "process peak RSS",
    }


# --------------------------------------------------------------------------------------------
# Cases, configs and batches


@dataclass
class Case:
    frames: int
    height: int
    width: int
    batch: int
    rank: int

    @property
    def label(self) -> str:
        return f"{self.frames}x{self.height}x{self.width} b{self.batch} r{self.rank}"


@dataclass
class Measurement:
    case: Case
    variant: str  # "baseline", a key=value override, or "cached_latents"
    path: str  # "plain" or "trainer"
    overrides: list[str] = field(default_factory=list)


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        frames, height, width = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: {text!r} is not FRAMESxHEIGHTxWIDTH, e.g. 25x576x1024") from None
    return frames, height, width


def make_config(
    case: Case,
    pipeline_dir: Path,
    workdir: Path,
    overrides: list[str],
    max_steps: int = 10,
    cpus_per_worker: float = 1.0,
) -> Config:
    """A run config for this case and pipeline, with `key=value` overrides applied in order."""
    tree: dict[str, Any] = {
        "model": {"pretrained": str(pipeline_dir)},
        "data": {"num_frames": case.frames, "height": case.height, "width": case.width},
        "lora": {"rank": case.rank, "alpha": float(case.rank)},
        "train": {
            "name": "benchmark",
            "max_steps": max_steps,
            "batch_size": case.batch,
            "num_workers": 1,
            "use_gpu": torch.cuda.is_available(),
            "cpus_per_worker": float(cpus_per_worker),
            "checkpoint_every": max_steps,  # one checkpoint, after the last timed step
            # The loop calls ray.train.report every `log_every` steps, and Ray Train 2.60 takes at
            # most one report per controller poll (2 s): svd_xt_lora.yaml's 10 keeps reports apart.
            "log_every": 10,
            "storage_path": str(workdir / "ray"),
        },
        "sample": {"enabled": False},
        "mlflow": {"tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}", "experiment": "benchmark"},
        "output_dir": str(workdir / "out"),
    }
    cfg = config_from_dict(apply_overrides(tree, overrides), check_files=False)
    if cfg.train.grad_accum != 1:
        raise SystemExit("train.grad_accum: the benchmark times one batch per step; leave it at 1")
    return cfg


def option_variants(cfg: Config, device: torch.device) -> list[str]:
    """Each memory/speed option flipped from the baseline config, as `key=value` overrides, the
    slowest to measure (float32 compute, compilation) last."""
    cuda = device.type == "cuda"
    fused = cuda if cfg.speed.fused_adamw is None else cfg.speed.fused_adamw
    kernels = ["flash", "efficient", "cudnn", "math"] if cuda else ["flash", "math"]
    variants = [
        CACHED,
        f"train.gradient_checkpointing={str(not cfg.train.gradient_checkpointing).lower()}",
        f"model.frozen_dtype={'float32' if cfg.model.frozen_dtype != 'float32' else 'bfloat16'}",
        *[f"speed.attention={k}" for k in kernels if k != cfg.speed.attention],
        f"speed.vae_chunk={4 if cfg.speed.vae_chunk > 4 else 16}",
        f"speed.channels_last={str(not cfg.speed.channels_last).lower()}",
        f"speed.fused_adamw={str(not fused).lower()}",
        # Quoted: overrides are YAML, where a bare `no` is false.
        f"train.mixed_precision={'no' if cfg.train.mixed_precision == 'bf16' else 'bf16'!r}",
        f"speed.compile_denoiser={str(not cfg.speed.compile_denoiser).lower()}",
    ]
    return variants


def example_batch(cfg: Config, device: torch.device | str, seed: int = 0) -> dict[str, torch.Tensor]:
    """One batch as the Ray Data pipeline delivers it: uint8 video and first frame, fps, the clip's
    motion score and a manifest motion bucket."""
    b, t, h, w = cfg.train.batch_size, cfg.data.num_frames, cfg.data.height, cfg.data.width
    if str(device) == "meta":
        video = torch.empty(b, t, 3, h, w, dtype=torch.uint8, device="meta")
    else:
        rng = np.random.default_rng(seed)
        video = torch.from_numpy(rng.integers(0, 256, (b, t, 3, h, w), dtype=np.uint8)).to(device)
    return {
        "video": video,
        "image": video[:, 0].clone(),
        "fps": torch.full((b,), cfg.data.fps, device=device),
        "motion": torch.full((b,), 20.0, dtype=torch.float64, device=device),  # the clip's motion score
        "motion_bucket_id": torch.full((b,), 127.0, device=device),  # as a manifest gives it: it wins
    }


# --------------------------------------------------------------------------------------------
# (a) the plain loop


def step_stats(ends: dict[int, float], warmup: int, cfg: Config) -> dict[str, Any]:
    """Step times and throughput from the wall time at which steps ended (step 0: the loop's
    start). Steps up to `warmup` are not timed; where only every k-th step's end is known (the
    trainer logs every `train.log_every` steps), each interval's time is spread over its k steps."""
    known = sorted(step for step in ends if step >= warmup)
    if len(known) < 2:
        raise ValueError(f"need two step ends after warm-up step {warmup}, have steps {sorted(ends)}")
    per_step = [(ends[b] - ends[a]) / (b - a) for a, b in zip(known[:-1], known[1:], strict=True)]
    steps, seconds = known[-1] - known[0], ends[known[-1]] - ends[known[0]]
    samples = cfg.train.batch_size * steps
    return {
        "timed_steps": steps,
        "step_s_median": statistics.median(per_step),
        "step_s_min": min(per_step),
        "step_s_mean": seconds / steps,
        "step_s_all": per_step,
        "samples_per_s": samples / seconds,
        "frames_per_s": samples * cfg.data.num_frames / seconds,
    }


def plain_loop(cfg: Config, warmup: int, steps: int, cached: bool) -> dict[str, Any]:
    """The same models, objective, optimizer and schedule as the Ray Train loop, in a bare loop."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.train.seed)
    generator = torch.Generator(device).manual_seed(cfg.train.seed * 1000)
    models = family_of(cfg).build_models(cfg, device)
    batches = [example_batch(cfg, device, seed) for seed in range(2)]
    if not cached:
        return timed_steps(cfg, models, batches, warmup, steps, generator)
    # What a latent cache leaves in the step: the UNet alone; VAE and CLIP are not resident.
    frozen = models.frozen
    encoded = []
    for batch in batches:
        strength = torch.full((cfg.train.batch_size,), 0.05, device=device)
        encoded.append(encode_batch(frozen, batch, strength, generator))
    frozen.vae.to("cpu")
    frozen.image_encoder.to("cpu")
    del batches
    return timed_steps(cfg, models, encoded, warmup, steps, generator, CachedLatentsStep(family_of(cfg)))


@dataclass
class CachedLatentsStep:
    """The family, its `training_loss` the UNet step alone on precomputed latents (`EncodedBatch`)."""

    family: ModelFamily

    def blocks(self, denoiser: torch.nn.Module) -> list[torch.nn.Module]:
        return self.family.blocks(denoiser)

    def training_loss(self, unet, frozen, encoded: EncodedBatch, cfg: Config, generator) -> torch.Tensor:
        return cached_step_loss(unet, encoded, cfg, generator)


def timed_steps(
    cfg: Config,
    models: TrainingModels,
    batches: list[Any],
    warmup: int,
    steps: int,
    generator: torch.Generator,
    family: ModelFamily | CachedLatentsStep | None = None,
) -> dict[str, Any]:
    """`warmup` + `steps` updates as the training loop makes them, on one worker: the denoiser
    spread as `train.parallel` says (`parallelize`), AdamW over its LoRA, the LR schedule, and
    `svdray.train.step.update` (the family's `training_loss` + backward under
    `train.mixed_precision`, `train.offload_activations`, clipping, the optimizer step), cycling
    through `batches`. Step times after the warm-up, and the peak memory of the updates (models
    and batches included, whatever building them held before not)."""
    device = next(models.denoiser.parameters()).device
    family = family or family_of(cfg)
    parallel = parallelize(
        models.denoiser, family.blocks(models.denoiser), cfg.train.parallel, device, Workers()
    )
    optimizer = build_optimizer(lora_parameters(models.denoiser), cfg.optim, cfg.speed, device)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    data = itertools.cycle(batches)
    release_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    parallel.train()
    synchronize(device)
    step_ends = {0: time.perf_counter()}
    for step in range(1, warmup + steps + 1):
        loss, grad_norm, good = update(parallel, models, family, data, cfg, generator, step, optimizer)
        if not good:  # the loop skips such an update; a benchmark of it would time nothing
            raise FloatingPointError(f"non-finite loss {loss.item()} or gradient norm at step {step}")
        lr_scheduler.step()
        step_ends[step] = time.perf_counter()  # `good` read the loss back: the device is synchronised
    return {
        **step_stats(step_ends, warmup, cfg),
        **peak_memory(device),
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------
# (b) svdray's loop under a TorchTrainer


def cached_dataset(cfg: Config):
    """The plain loop's uint8 batches as a Ray Data dataset, one row per example, enough for
    `train.max_steps`: what the Ray Data pipeline delivers, with nothing left to decode."""
    import ray.data

    batches = [example_batch(cfg, "cpu", seed) for seed in range(2)]
    rows = [
        # clip_id/epoch as decoded examples carry them (the loop skips rows without a clip_id).
        {
            **{k: v[j].numpy() for k, v in batches[step % 2].items()},
            "clip_id": f"bench-{step}-{j}",
            "epoch": 0,
        }
        for step in range(cfg.train.max_steps)
        for j in range(cfg.train.batch_size)
    ]
    return ray.data.from_items(rows)


def probed_train_loop(loop_config: dict[str, Any]) -> None:
    """svdray's loop, unchanged; afterwards the worker writes what only it can see."""
    from svdray.train.loop import train_loop_per_worker

    probe_path = loop_config.pop("probe_path")
    train_loop_per_worker(loop_config)
    probe = {
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    probe.update(peak_memory(torch.device("cuda" if torch.cuda.is_available() else "cpu")))
    Path(probe_path).write_text(json.dumps(probe))


def trainer_loop(
    cfg: Config, warmup: int, steps: int, workdir: Path, tag: str, checkpoint_every: int | None = None
) -> dict[str, Any]:
    """svdray's loop under a one-worker TorchTrainer; step times from the logged steps. One
    checkpoint after the last step, or one every `checkpoint_every` steps (a multiple of
    `train.log_every`, so each timed interval holds the same number of them)."""
    import ray
    import ray.train
    from mlflow.tracking import MlflowClient
    from ray.train.torch import TorchTrainer

    from svdray import tracking
    from svdray.train.trainer import init_ray

    # Step ends are known only at logged steps (every `train.log_every`): start timing at the
    # first logged step after warm-up and time whole logging intervals.
    every = cfg.train.log_every
    warmup = every * math.ceil(warmup / every)
    cfg.train.max_steps = warmup + every * math.ceil(steps / every)
    cfg.train.checkpoint_every = checkpoint_every or cfg.train.max_steps
    cfg.train.name = f"benchmark-{tag}"
    init_ray(cfg)  # RAY_ADDRESS (or ray.address) joins a running cluster; else a local one
    ray.data.DataContext.get_current().enable_progress_bars = False
    uri = tracking.tracking_uri(cfg)
    run_id = tracking.start_or_resume_run(cfg)
    probe_path = workdir / f"probe-{tag}.json"
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        probed_train_loop,
        train_loop_config={
            "config": cfg.to_dict(),
            "mlflow_run_id": run_id,
            "tracking_uri": uri,
            "data_skip": 0,
            "probe_path": str(probe_path),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, use_gpu=cfg.train.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(name=cfg.train.name, storage_path=cfg.train.storage_path),
        datasets={"train": cached_dataset(cfg)},
    )
    fit_started = time.perf_counter()
    trainer.fit()
    fit_s = time.perf_counter() - fit_started
    tracking.end_run(uri, run_id)

    client = MlflowClient(tracking_uri=uri)
    # Rank 0 stamps each logged step's metrics (ms) right after the step: the step ends.
    ends = {m.step: m.timestamp / 1000 for m in client.get_metric_history(run_id, "train/loss")}
    stats = step_stats(ends, warmup, cfg)
    # The loop's own samples_per_s covers data fetch to optimizer step, not reporting or MLflow.
    own = [m.value for m in client.get_metric_history(run_id, "data/samples_per_s") if m.step > warmup]
    stats["loop_step_s_median"] = statistics.median(cfg.train.batch_size / v for v in own)
    stats["log_every"] = cfg.train.log_every
    stats["fit_s"] = fit_s
    stats.update(json.loads(probe_path.read_text()))
    return stats


# --------------------------------------------------------------------------------------------
# Running the plan


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def environment(device: torch.device) -> dict[str, Any]:
    from importlib import metadata

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            **{p: version(p) for p in ("diffusers", "transformers", "peft", "ray", "mlflow")},
        },
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_bytes"] = props.total_memory
        info["capability"] = f"{props.major}.{props.minor}"
    return info


def plan(
    args: argparse.Namespace, cases: list[Case], device: torch.device, probe_cfg: Config
) -> list[Measurement]:
    """Most important first, so a time budget cuts the least useful: the first case's baseline
    (plain, then trainer), the other cases' baselines, then the first case's variants."""
    first, rest = cases[0], cases[1:]
    out = [Measurement(first, "baseline", "plain")]
    if args.trainer:
        out.append(Measurement(first, "baseline", "trainer"))
    out += [Measurement(case, "baseline", "plain") for case in rest]
    variants = []
    for item in args.vary:
        variants += option_variants(probe_cfg, device) if item == "all" else [item]
    for variant in dict.fromkeys(variants):
        out.append(Measurement(first, variant, "plain", [] if variant == CACHED else [variant]))
    return out


def run_measurement(
    m: Measurement, args: argparse.Namespace, pipeline_dir: Path, workdir: Path, index: int
) -> dict[str, Any]:
    cfg = make_config(
        m.case, pipeline_dir, workdir, args.set + m.overrides, args.warmup + args.steps, args.cpus_per_worker
    )
    record: dict[str, Any] = {
        "case": m.case.__dict__ | {"label": m.case.label},
        "variant": m.variant,
        "path": m.path,
        "settings": {
            "model.frozen_dtype": cfg.model.frozen_dtype,
            "train.gradient_checkpointing": cfg.train.gradient_checkpointing,
            "train.mixed_precision": cfg.train.mixed_precision,
            **{f"speed.{k}": v for k, v in cfg.to_dict()["speed"].items()},
            CACHED: m.variant == CACHED,
        },
    }
    cached = m.variant == CACHED
    record["load_average_before"] = os.getloadavg()  # other processes' load skews CPU timings
    try:
        flops = model_flops(cfg, cached)
        record["flops_per_step"] = flops["total"]
        record["flops_by_op"] = flops["by_op"]
        if args.flops_only:
            record["status"] = "flops only"
            return record
        # Measured next to each step timing: on a shared CPU the rate drifts with the load.
        record["matmul_flops_per_s"] = matmul_rate(
            torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )["flops_per_s"]
        if m.path == "plain":
            record.update(plain_loop(cfg, args.warmup, args.steps, cached))
        else:
            record.update(trainer_loop(cfg, args.warmup, args.steps, workdir, f"{index}"))
        record["mfu"] = record["flops_per_step"] / record["step_s_median"] / record["matmul_flops_per_s"]
        record["status"] = "ok"
    except torch.cuda.OutOfMemoryError:
        record["status"] = "oom"
    except Exception as err:  # one failing variant (a kernel a card lacks) must not stop the matrix
        record["status"] = f"error: {type(err).__name__}: {str(err)[:300]}"
        traceback.print_exc()
    record["load_average_after"] = os.getloadavg()
    torch._dynamo.reset()  # drop compiled graphs and their memory between measurements
    release_memory()
    return record


def comparisons(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """trainer/plain throughput for every case measured both ways (target >= 0.97 on a GPU)."""
    out = []
    for trainer in results:
        if trainer["path"] != "trainer" or trainer["status"] != "ok":
            continue
        for plain in results:
            same = plain["case"] == trainer["case"] and plain["variant"] == trainer["variant"]
            if plain["path"] == "plain" and same and plain["status"] == "ok":
                out.append(
                    {
                        "case": trainer["case"]["label"],
                        "variant": trainer["variant"],
                        "trainer_over_plain_throughput": trainer["samples_per_s"] / plain["samples_per_s"],
                        "trainer_over_plain_median_step": plain["step_s_median"] / trainer["step_s_median"],
                    }
                )
    return out


COLUMNS = [  # title, width, how to show a result
    ("case", 22, lambda r: r["case"]["label"]),
    ("variant", 34, lambda r: r["variant"]),
    ("path", 8, lambda r: r["path"]),
    ("step s", 8, lambda r: f"{r['step_s_median']:.3f}"),
    ("frames/s", 9, lambda r: f"{r['frames_per_s']:.2f}"),
    ("mem GiB", 8, lambda r: f"{r['peak_memory_bytes'] / 2**30:.2f}"),
    ("TFLOP", 8, lambda r: f"{r['flops_per_step'] / 1e12:.3f}"),
    ("MFU", 6, lambda r: f"{100 * r['mfu']:.1f}%"),
    ("status", 0, lambda r: r["status"]),
]


def cell(result: dict[str, Any], show) -> str:
    try:
        return str(show(result))
    except KeyError:  # not measured (out of memory, skipped, failed)
        return "-"


def print_table(report: dict[str, Any]) -> None:
    env, matmul = report["environment"], report["matmul"]
    print(f"\n{env['device']} ({env['device_type']}), {env['date']}")
    print(
        f"matmul rate ({matmul['dtype']}, n={matmul['n']}): {matmul['flops_per_s'] / 1e12:.2f} TFLOP/s "
        "at the start; MFU uses the rate measured next to each row"
    )
    print("  ".join(f"{title:<{width}}" for title, width, _ in COLUMNS))
    for result in report["results"]:
        print("  ".join(f"{cell(result, show):<{width}}" for _, width, show in COLUMNS))
    for c in report["comparisons"]:
        print(
            f"trainer/plain throughput, {c['case']} {c['variant']}: {c['trainer_over_plain_throughput']:.3f}"
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = args.shapes or (["8x32x32"] if args.tiny else ["14x320x512"])
    ranks = args.ranks or ([4] if args.tiny else [16])
    cases = [Case(*parse_shape(s), args.batch, r) for s in shapes for r in ranks]
    if device.type == "cpu":
        # Ray sets the worker's OMP_NUM_THREADS (torch's thread count) from its CPUs: the plain
        # loop gets the same count, or the comparison measures thread counts, not Ray.
        torch.set_num_threads(max(1, int(args.cpus_per_worker)))
    report: dict[str, Any] = {
        "environment": environment(device),
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "results": [],
        "comparisons": [],
    }
    with tempfile.TemporaryDirectory(prefix="svdray-bench-") as tmp:
        workdir = Path(tmp)
        pipeline_dir = save_pipeline(args.tiny, workdir / "pipeline", args.flops_only)
        report["setup_s"] = time.perf_counter() - started
        report["matmul"] = matmul_rate(device)
        probe_cfg = make_config(cases[0], pipeline_dir, workdir, args.set)
        for index, m in enumerate(plan(args, cases, device, probe_cfg)):
            if args.budget_s and time.perf_counter() - started > args.budget_s:
                record = {
                    "case": m.case.__dict__ | {"label": m.case.label},
                    "variant": m.variant,
                    "path": m.path,
                    "status": "skipped: time budget",
                }
            else:
                print(
                    f"[{time.perf_counter() - started:6.0f}s] {m.case.label} {m.variant} {m.path}", flush=True
                )
                record = run_measurement(m, args, pipeline_dir, workdir, index)
            report["results"].append(record)
            report["comparisons"] = comparisons(report["results"])
            report["elapsed_s"] = time.perf_counter() - started
            if args.out:  # after every measurement, so a run cut short keeps what it measured
                Path(args.out).write_text(json.dumps(report, indent=1))
    shutdown_ray()
    print_table(report)
    return report


def shutdown_ray() -> None:
    """Stop the local cluster this process started (a joined cluster is only disconnected)."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--family",
        choices=("svd", "wan"),
        default="svd",
        help="svd: time steps (below); wan: count full-size Wan FLOPs per step (benchmarks/wan_flops.py)",
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny test pipeline instead of SVD-XT")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="a predefined matrix (overrides other flags)"
    )
    parser.add_argument("--shapes", nargs="+", help="FRAMESxHEIGHTxWIDTH (default 14x320x512; tiny 8x32x32)")
    parser.add_argument("--ranks", nargs="+", type=int, help="LoRA ranks (default 16; tiny 4)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 1)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="baseline config overrides, e.g. speed.attention=flash",
    )
    parser.add_argument(
        "--vary",
        nargs="*",
        default=[],
        metavar="VARIANT",
        help=f"variants of the first case: 'all' (each option flipped), {CACHED}, or KEY=VALUE overrides",
    )
    parser.add_argument(
        "--trainer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run svdray's loop under a TorchTrainer on the first case's baseline",
    )
    parser.add_argument(
        "--cpus-per-worker",
        type=float,
        default=float(os.cpu_count() or 1),
        help="the trainer worker's CPUs (Ray sets its OMP_NUM_THREADS from this)",
    )
    parser.add_argument(
        "--flops-only",
        action="store_true",
        help="count each case's FLOPs per step (meta device), time nothing",
    )
    parser.add_argument(
        "--budget-s", type=float, default=0, help="start no measurement after this many seconds"
    )
    parser.add_argument("--out", help="write all figures as JSON here")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.preset:
        for key, value in PRESETS[args.preset].items():
            setattr(args, key, value)
    if args.flops_only:
        args.trainer = False  # the same step: the same FLOPs
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps: at least 1 each")
    return args


def run_wan_flops(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`--family wan`: FLOPs per training step of the full-size Wan models (wan_flops.py's
    cases, the first of `--ranks`), counted on the meta device: nothing is timed."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import wan_flops

    out = ["--out", args.out] if args.out else []
    return wan_flops.main(["--rank", str((args.ranks or [32])[0]), *out])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.family == "wan":
        run_wan_flops(args)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
