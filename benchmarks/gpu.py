"""The GPU figures in one prepared run: step time, peak memory and MFU of the shipped configs.

A lent GPU comes for one short window on a machine that installs nothing (`benchmarks/gpu.sh`
brings the wheels this needs and runs it; benchmarks/RESULTS.md says how). For each case, most
important first, the update the training loop makes (`svdray.train.step.update`: the family's
`training_loss` + backward, clipping, AdamW; the LR schedule; the denoiser as `parallelize` gives
it to one worker; `train_step.timed_steps`) on the models built as the trainer builds them
(`family.random_models`: the full-size architecture with random weights made on the GPU, then
`build_models`' own LoRA, dtypes, fp8 base, checkpointing and `speed.*`; with `data.cache` the
encoders released as the loop releases them), one batch per update (`train.grad_accum=1`: the
configs' optimizer step is that many of these forward/backwards):

  model    the shipped configs as they are: SVD-XT 25x576x1024 (configs/svd_xt_lora.yaml),
           Wan2.2-TI2V-5B 121x704x1280 and Wan2.1-I2V-14B 81x480x832 (their `data.cache: true`:
           the step reads the latent cache's fields, here random values of the cached shapes),
           and Wan2.1-I2V-14B with its base in float8 (configs/wan_i2v_14b_fp8.yaml; skipped
           in a checkout without it);
  memory   SVD-XT with each memory option flipped: the rows of benchmarks/memory.py's table;
  speed    SVD-XT with each `speed.*` option flipped (attention kernels, VAE chunk,
           channels-last, fused AdamW, `torch.compile`, the slowest last).

Each case records warm-up and timed steps (median step time), `torch.cuda.max_memory_allocated`
and `max_memory_reserved` over the steps, the model FLOPs of one step (`FlopCounterMode` on the
meta device, as train_step.py and wan_flops.py count them) and MFU against the bf16 matmul rate
measured at the start, next to `benchmarks/memory.py`'s count for the same config. The counts are
CPU work (tens of seconds of Python each at full size): worker processes run them while the GPU
times. Any case's error or out-of-memory is recorded and the run goes on; the JSON is rewritten
after every case, and no case starts that would end after `--budget-s` (as far as its expected
time, from its FLOPs at an assumed MFU, says), so a cut-off run keeps what it measured.

    bash benchmarks/gpu.sh                         # the GPU run (JSON and log under $OUT)
    python benchmarks/gpu.py --tiny --out t.json   # the same run on CPU, tiny pipelines (the test)
    python benchmarks/gpu.py --plan                # the cases, their counts and expected seconds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()  # the budget counts the imports too

from svdray import console  # noqa: E402

# Before the libraries are imported: their log levels and progress bars follow the environment.
console.configure("--verbose" in sys.argv)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other benchmarks, as modules

import memory  # noqa: E402
import torch  # noqa: E402
import wan_flops  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from train_step import (  # noqa: E402
    count_step_flops,
    environment,
    example_batch,
    flops_config,
    matmul_rate,
    option_variants,
    release_memory,
    timed_steps,
)

from svdray.config import Config, ConfigError, config_from_dict, load_config  # noqa: E402
from svdray.models import family_of, get_family  # noqa: E402
from svdray.models.base import TrainingModels  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30
# What the step path must not need: the GPU machine has none of them (recorded in the JSON).
NOT_ON_THE_GPU_MACHINE = ("ray", "mlflow", "decord")

# Planning figures (the expected seconds that order the budget; nothing is compared with them):
H200_BF16_FLOPS = 790e12  # an H200's bf16 8192^3 matmul rate as measured (the CUDA rate is remeasured)
ASSUMED_MFU = 0.35  # issue 6's target
FP32_SLOWDOWN = 8.0  # train.mixed_precision=no: float32 matmuls (no TF32) against bf16 tensor cores
SETUP_S = 15.0  # building the models and batches, first-step kernel selection
COMPILE_S = 120.0  # speed.compile_denoiser: compiling the denoiser's forward and backward


@dataclass(frozen=True)
class Model:
    config: str  # the shipped config, relative to the repository (a case is skipped without it)
    architecture: str  # the family's full-size architecture of it
    warmup: int
    steps: int
    tiny_shape: tuple[int, int, int]  # --tiny: frames, height, width
    tiny_layout: str | None = None  # --tiny: the family's tiny pipeline layout


MODELS = {
    "svd-xt": Model("configs/svd_xt_lora.yaml", "SVD-XT", 2, 4, (8, 32, 32)),
    "wan2.2-ti2v-5b": Model("configs/wan_ti2v_5b_lora.yaml", "Wan2.2-TI2V-5B", 1, 3, (5, 32, 32), "ti2v"),
    "wan2.1-i2v-14b": Model("configs/wan_i2v_lora.yaml", "Wan2.1-I2V-14B", 1, 2, (5, 32, 32), "i2v"),
    # Frozen float8 base weights (branch fsdp): a case once the config is in the checkout.
    "wan2.1-i2v-14b-fp8": Model("configs/wan_i2v_14b_fp8.yaml", "Wan2.1-I2V-14B", 1, 2, (5, 32, 32), "i2v"),
}
EVERY_CASE = ["train.grad_accum=1"]  # one batch per timed step
TINY_WARMUP, TINY_STEPS = 1, 2
# --tiny computes in float32 (each case's own overrides still apply; an fp8 base's config keeps
# its dtypes): a CPU without bf16 units emulates bf16 convolutions and matmuls, which makes the
# tiny SVD step 15 times slower.
TINY_FLOAT32 = ["model.frozen_dtype=float32", "model.denoiser_dtype=float32", "train.mixed_precision='no'"]


@dataclass(frozen=True)
class Case:
    name: str
    group: str  # "model", "memory" or "speed"
    model: str  # a key of MODELS
    overrides: tuple[str, ...] = ()


def plan_cases(device: torch.device) -> list[Case]:
    """Every case, most important first: a time budget cuts the end of the list."""
    base = load_config(REPO / MODELS["svd-xt"].config, EVERY_CASE, check_files=False)
    memory_rows = [
        # memory.py's cached-latents row is the loop's `data.cache` step: the encoders stay resident.
        Case(f"svd-xt {label}", "memory", "svd-xt", tuple(overrides or ["data.cache=true"]))
        for label, overrides in memory.option_variants(base)[1:]
    ]
    speed_rows = [
        Case(f"svd-xt {variant}", "speed", "svd-xt", (variant,))
        for variant in option_variants(base, device)
        if variant.startswith("speed.")
    ]
    return [
        Case("svd-xt", "model", "svd-xt"),
        Case("wan2.2-ti2v-5b", "model", "wan2.2-ti2v-5b"),
        Case("wan2.1-i2v-14b", "model", "wan2.1-i2v-14b"),
        Case("wan2.1-i2v-14b fp8", "model", "wan2.1-i2v-14b-fp8"),
        *memory_rows,
        *speed_rows,
    ]


def case_config(case: Case, tiny_dirs: dict[str, Path] | None) -> tuple[Config, str | None]:
    """The case's config and the architecture to build (None: `model.pretrained`'s configs, the
    tiny pipelines). Raises `ConfigError` when the config does not take the case's overrides."""
    model = MODELS[case.model]
    overrides, architecture = list(EVERY_CASE), model.architecture
    if tiny_dirs is not None:
        frames, height, width = model.tiny_shape
        overrides += [
            f"model.pretrained={tiny_dirs[case.model]}",
            f"data.num_frames={frames}",
            f"data.height={height}",
            f"data.width={width}",
        ]
        # An fp8 base computes in bf16 (its config's rule): keep what the case is about.
        if load_config(REPO / model.config, check_files=False).model.denoiser_dtype != "float8":
            overrides += TINY_FLOAT32
        architecture = None
    return load_config(REPO / model.config, overrides + list(case.overrides), check_files=False), architecture


def save_tiny_pipelines(out: Path, cases: list[Case]) -> dict[str, Path]:
    """The tiny pipeline of each model `cases` use, by its MODELS key."""
    dirs = {}
    for name in dict.fromkeys(case.model for case in cases):
        model = MODELS[name]
        if not (REPO / model.config).exists():
            continue
        options = {"layout": model.tiny_layout} if model.tiny_layout else {}
        family = get_family(load_config(REPO / model.config, check_files=False).model.family)
        dirs[name] = family.save_tiny_pipeline(out / name, seed=0, **options)
    return dirs


# --------------------------------------------------------------------------------------------
# Batches: what the loop's `batches` yields


def cache_fields(cfg: Config, models: TrainingModels, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The latent cache's fields of one batch on `device`, as the benchmarks' counts model them
    (meta models and device: shapes alone)."""
    b, t, h, w = cfg.train.batch_size, cfg.data.num_frames, cfg.data.height, cfg.data.width
    if cfg.model.family == "wan":
        return wan_flops.cache_fields(models, t, h, w, b, device)
    clip_dim = models.frozen.image_encoder.config.projection_dim
    cached = memory.cached_batch(cfg, models.frozen, clip_dim)
    decoded = example_batch(cfg, "meta")
    fields = {k: v for k, v in cached.items() if k not in decoded}
    return {k: torch.empty(v.shape, dtype=v.dtype, device=device) for k, v in fields.items()}


def step_batch(
    cfg: Config, device: torch.device | str, seed: int, cache: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """One batch as the loop gets it: uint8 clips and their first frames (fps, motion, prompt),
    or with `data.cache` the cache's fields in place of the clips."""
    batch = example_batch(cfg, device, seed) | {"prompt": [""] * cfg.train.batch_size}
    if cfg.data.cache:
        del batch["video"]
        batch.update(cache)
    return batch


def device_batches(
    cfg: Config, models: TrainingModels, device: torch.device, generator: torch.Generator
) -> list[dict[str, Any]]:
    """Two batches on `device`; cached fields hold random values (their shapes taken on fake
    tensors: no encoder runs), as the weights do."""
    cache = {}
    if cfg.data.cache:
        with FakeTensorMode(allow_non_fake_inputs=True):
            shapes = {k: v.shape for k, v in cache_fields(cfg, models, device).items()}
        cache = {k: torch.randn(s, generator=generator, device=device) for k, s in shapes.items()}
    return [step_batch(cfg, device, seed, cache) for seed in range(2)]


# --------------------------------------------------------------------------------------------
# Counts (CPU, worker processes)


def count_flops(tree: dict[str, Any], architecture: str | None) -> int:
    """Model FLOPs of one step of the config `tree`: the step on the meta device."""
    cfg = config_from_dict(tree, check_files=False)
    models = family_of(cfg).meta_models(flops_config(cfg), architecture)
    batch = step_batch(cfg, "meta", 0, cache_fields(cfg, models, "meta") if cfg.data.cache else {})
    return count_step_flops(models.frozen, models.denoiser, cfg, batch)["total"]


def count_memory(tree: dict[str, Any], architecture: str | None) -> dict[str, Any]:
    """benchmarks/memory.py's count of one step of the config `tree` (Wan: the transformer's
    cached step, the whole model on one rank)."""
    cfg = config_from_dict(tree, check_files=False)
    if cfg.model.family == "wan":
        return memory.rank_count(memory.fake_wan_step(cfg, architecture), 1, cfg.train.offload_activations)
    return memory.count_config(cfg, cfg.data.cache, architecture)


def flops_key(cfg: Config, architecture: str | None) -> str:
    """Configs with the same key have the same model FLOPs (dtypes, checkpointing and kernels
    change how a step runs, not what it computes)."""
    tree = cfg.to_dict()
    what = [
        architecture or cfg.model.pretrained,
        [cfg.data.num_frames, cfg.data.height, cfg.data.width, cfg.data.cache, cfg.train.batch_size],
        tree["lora"],
        tree.get(cfg.model.family),  # the family's own options (e.g. Wan's expert)
    ]
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _counting_worker() -> None:
    torch.set_num_threads(1)  # many counts at once, one core each


def _job(fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        return {"value": fn(*args), "count_s": time.perf_counter() - started}
    except Exception as err:  # the reason goes in the JSON next to the case
        return {"error": f"{type(err).__name__}: {str(err)[:300]}", "count_s": time.perf_counter() - started}


class Counts:
    """FLOP and memory counts by key, in `workers` processes (0: in this one, when submitted)."""

    def __init__(self, workers: int):
        self.pool = None
        if workers:
            # spawn: a forked CUDA process is unusable, and the workers need no GPU.
            context = multiprocessing.get_context("spawn")
            self.pool = context.Pool(workers, initializer=_counting_worker)
        self.jobs: dict[str, Any] = {}

    def submit(self, key: str, fn: Callable[..., Any], *args: Any) -> None:
        if key in self.jobs:
            return
        self.jobs[key] = self.pool.apply_async(_job, (fn, *args)) if self.pool else _job(fn, *args)

    def get(self, key: str) -> dict[str, Any] | None:
        """The finished job's {"value"} or {"error"}; None while it runs (or was never asked)."""
        job = self.jobs.get(key)
        if job is None or isinstance(job, dict):
            return job
        return job.get() if job.ready() else None

    def wait(self, seconds: float | None = None) -> None:
        """Until every job is done, or at most `seconds`."""
        deadline = None if seconds is None else time.perf_counter() + seconds
        for job in self.jobs.values():
            if not isinstance(job, dict):
                job.wait(None if deadline is None else max(0.0, deadline - time.perf_counter()))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()  # counts still running past the budget are dropped


# --------------------------------------------------------------------------------------------
# One case


@dataclass
class Run:
    args: argparse.Namespace
    device: torch.device
    tiny_dirs: dict[str, Path] | None
    counts: Counts
    rate: float  # the matmul rate MFU and expected times divide by
    started: float = STARTED

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def settings(cfg: Config) -> dict[str, Any]:
    tree = cfg.to_dict()
    return {
        "shape": f"{cfg.data.num_frames}x{cfg.data.height}x{cfg.data.width}",
        "batch": cfg.train.batch_size,
        "lora.rank": cfg.lora.rank,
        "data.cache": cfg.data.cache,
        "model.denoiser_dtype": cfg.model.denoiser_dtype,
        "model.frozen_dtype": cfg.model.frozen_dtype,
        "train.mixed_precision": cfg.train.mixed_precision,
        "train.gradient_checkpointing": cfg.train.gradient_checkpointing,
        **{f"speed.{k}": v for k, v in tree["speed"].items()},
    }


def prepare(case: Case, run: Run) -> dict[str, Any]:
    """The case's record before it runs: its config (or why it has none) and its counts asked for."""
    model = MODELS[case.model]
    warmup, steps = (TINY_WARMUP, TINY_STEPS) if run.tiny_dirs else (model.warmup, model.steps)
    record: dict[str, Any] = {
        "name": case.name,
        "group": case.group,
        "config": model.config,
        "overrides": [*EVERY_CASE, *case.overrides],
        "warmup": warmup,
        "steps": steps,
    }
    if not (REPO / model.config).exists():
        record["status"] = f"skipped: no {model.config} in this checkout"
        return record
    try:
        cfg, architecture = case_config(case, run.tiny_dirs)
    except (ConfigError, ValueError) as err:
        record["status"] = f"skipped: the config does not take it ({err})"
        return record
    record["architecture"] = architecture or str(cfg.model.pretrained)
    record["settings"] = settings(cfg)
    record["flops_key"] = flops_key(cfg, architecture)
    run.counts.submit(record["flops_key"], count_flops, cfg.to_dict(), architecture)
    # memory.py models no kernel choice (it counts fused attention): no count for the speed rows.
    if case.group != "speed":
        record["memory_key"] = case.name
        run.counts.submit(case.name, count_memory, cfg.to_dict(), architecture)
    if run.tiny_dirs and cfg.speed.compile_denoiser:
        record["status"] = "skipped: --tiny (inductor compiles C++ for minutes on a CPU)"
    return record


def add_counts(record: dict[str, Any], run: Run) -> None:
    """FLOPs, MFU, expected seconds and memory.py's count, as far as they are counted yet."""
    flops = run.counts.get(record.get("flops_key", ""))
    if flops and "value" in flops:
        record["flops_per_step"] = flops["value"]
        record["expected_s"] = expected_seconds(record, flops["value"], run.rate)
        if "step_s_median" in record:
            record["mfu"] = flops["value"] / record["step_s_median"] / run.rate
    elif flops:
        record["flops_error"] = flops["error"]
    count = run.counts.get(record.get("memory_key", ""))
    if count and "value" in count:
        record["memory_count"] = count["value"]
        estimate = count["value"].get("estimated_peak_gib")
        if estimate and "peak_memory_bytes" in record:
            record["measured_over_count"] = record["peak_memory_bytes"] / (estimate * GIB)
    elif count:
        record["memory_count_error"] = f"benchmarks/memory.py: {count['error']}"


def expected_seconds(record: dict[str, Any], flops: float, rate: float) -> float:
    """Planning: setup + steps at the assumed MFU (recompute and float32 compute counted)."""
    s = record["settings"]
    work = flops * (4 / 3 if s["train.gradient_checkpointing"] else 1.0)
    if s["train.mixed_precision"] == "no":
        work *= FP32_SLOWDOWN
    compile_s = COMPILE_S if s["speed.compile_denoiser"] else 0.0
    return SETUP_S + compile_s + (record["warmup"] + record["steps"]) * work / (rate * ASSUMED_MFU)


def measure(record: dict[str, Any], case: Case, run: Run) -> None:
    """Build the models on the device, make the batches, time the steps."""
    cfg, architecture = case_config(case, run.tiny_dirs)
    device = run.device
    started = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    generator = torch.Generator(device).manual_seed(cfg.train.seed * 1000)
    family = family_of(cfg)
    models = family.random_models(cfg, device, architecture)
    batches = device_batches(cfg, models, device, generator)
    if cfg.data.cache:  # as the loop does without validation in it: the cache holds their outputs
        family.release_encoders(models)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    record["build_s"] = time.perf_counter() - started
    record.update(timed_steps(cfg, models, batches, record["warmup"], record["steps"], generator))


def run_case(record: dict[str, Any], case: Case, run: Run) -> None:
    started = time.perf_counter()
    try:
        measure(record, case, run)
        record["status"] = "ok"
    except torch.cuda.OutOfMemoryError as err:
        record["status"] = "oom"
        record["error"] = str(err)[:500]
    except Exception as err:  # one failing case (a kernel this card lacks) must not stop the run
        record["status"] = f"error: {type(err).__name__}: {str(err)[:300]}"
        record["traceback"] = traceback.format_exc()[-3000:]
        traceback.print_exc()
    record["case_s"] = time.perf_counter() - started
    torch._dynamo.reset()  # compiled graphs and their memory
    release_memory()


# --------------------------------------------------------------------------------------------
# The run


def module_files() -> dict[str, str]:
    """Where each package the step needs was imported from (the wheelhouse's target on the GPU)."""
    names = ("svdray", "diffusers", "transformers", "peft", "accelerate", "torch")
    return {name: str(Path(sys.modules[name].__file__).parent) for name in names if name in sys.modules}


def write(report: dict[str, Any], out: str | None) -> None:
    if out:
        Path(out).write_text(json.dumps(report, indent=1, default=str))


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    if args.tiny:
        torch.set_num_threads(1)  # tiny models gain nothing from more, and the machine is shared
    cases = [c for c in plan_cases(device) if not args.only or c.name in args.only]
    if args.only and len(cases) != len(set(args.only)):
        names = [c.name for c in plan_cases(device)]
        raise SystemExit(f"--only: {sorted(set(args.only) - set(names))} not among the cases {names}")
    workers = args.count_workers if args.count_workers is not None else (0 if args.tiny else 8)
    report: dict[str, Any] = {
        "script": "benchmarks/gpu.py",
        "argv": sys.argv[1:],
        "environment": environment(device),
        "budget_s": args.budget_s,
        "assumptions": {"assumed_mfu": ASSUMED_MFU, "setup_s": SETUP_S, "compile_s": COMPILE_S},
        "cases": [],
    }
    with tempfile.TemporaryDirectory(prefix="svdray-gpu-bench-") as tmp:
        tiny_dirs = save_tiny_pipelines(Path(tmp), cases) if args.tiny else None
        if args.plan:
            rate = args.rate or H200_BF16_FLOPS
        else:
            report["matmul"] = matmul_rate(device)
            rate = report["matmul"]["flops_per_s"]
        run = Run(args, device, tiny_dirs, Counts(workers), rate)
        try:
            records = [prepare(case, run) for case in cases]
            report["cases"] = records
            print_plan(records, run)
            if args.plan:
                run.counts.wait()
            else:
                run_cases(cases, records, run, report)
                run.counts.wait(max(0.0, args.budget_s - run.elapsed()))
        finally:
            run.counts.close()
        for record in records:
            add_counts(record, run)
    report["elapsed_s"] = run.elapsed()
    report["environment"]["modules"] = module_files()
    report["environment"]["imported"] = {
        name: sys.modules.get(name) is not None for name in NOT_ON_THE_GPU_MACHINE
    }
    write(report, args.out)
    if args.plan:
        print_plan(report["cases"], run)
    else:
        print_results(report)
    return report


def run_cases(cases: list[Case], records: list[dict[str, Any]], run: Run, report: dict[str, Any]) -> None:
    for case, record in zip(cases, records, strict=True):
        if "status" in record:  # skipped when prepared
            continue
        add_counts(record, run)
        expected = record.get("expected_s")
        skip = over_budget(run.args.budget_s - run.elapsed(), expected)
        if skip:
            record["status"] = skip
            continue
        note = f", expected {expected:.0f} s" if expected is not None else ""
        print(f"[{run.elapsed():6.0f}s] {case.name}{note}", flush=True)
        record["status"] = "running"  # what a run killed mid-case leaves in the JSON
        write(report, run.args.out)
        try:
            run_case(record, case, run)
        except KeyboardInterrupt:  # gpu.sh's hard limit (SIGINT): keep what was measured
            record["status"] = "interrupted"
            break
        finally:
            add_counts(record, run)
            report["elapsed_s"] = run.elapsed()
            write(report, run.args.out)


def over_budget(left: float, expected: float | None) -> str | None:
    """Why a case does not start with `left` seconds of the budget left (None: it starts). A case
    not yet counted starts while any time is left: the first of each kind are the important ones."""
    if left <= 0:
        return "skipped: time budget (used up)"
    if expected is not None and expected > left:
        return f"skipped: time budget ({left:.0f} s left, expected {expected:.0f} s)"
    return None


def gib(value: float | None) -> str:
    return f"{value / GIB:.2f}" if value else "-"


def print_plan(records: list[dict[str, Any]], run: Run) -> None:
    for record in records:
        add_counts(record, run)
    rate = f"{run.rate / 1e12:.3g} TFLOP/s"
    print(f"{len(records)} cases; expected seconds at {ASSUMED_MFU:.0%} MFU of {rate}:")
    total = 0.0
    for r in records:
        expected = r.get("expected_s")
        total += expected or 0.0
        count = r.get("memory_count", {}).get("estimated_peak_gib")
        print(
            f"  {r['name']:<44} {r.get('flops_per_step', 0) / 1e12:9.2f} TFLOP  "
            f"count {f'{count:.2f}' if count else '-':>7} GiB  "
            f"expected {f'{expected:.0f}' if expected else '?':>5} s  (total {total:.0f} s)  "
            f"{r.get('status', '')}",
            flush=True,
        )


def print_results(report: dict[str, Any]) -> None:
    env = report["environment"]
    print(f"\n{env['device']} ({env['device_type']}), {env['date']}, {report['elapsed_s']:.0f} s")
    print(f"matmul {report['matmul']['dtype']}: {report['matmul']['flops_per_s'] / 1e12:.3g} TFLOP/s")
    head = ("case", "step s", "alloc GiB", "reserved", "count GiB", "TFLOP", "MFU", "took s", "status")
    print("  ".join(f"{h:<10}" if i else f"{h:<44}" for i, h in enumerate(head)))
    for r in report["cases"]:
        count = r.get("memory_count", {}).get("estimated_peak_gib")
        cells = [
            f"{r['step_s_median']:.3f}" if "step_s_median" in r else "-",
            gib(r.get("peak_memory_bytes")),
            gib(r.get("peak_reserved_bytes")),
            f"{count:.2f}" if count else "-",
            f"{r['flops_per_step'] / 1e12:.2f}" if "flops_per_step" in r else "-",
            f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-",
            f"{r['case_s']:.0f}" if "case_s" in r else "-",
            r.get("status", "-"),
        ]
        print(f"{r['name']:<44}  " + "  ".join(f"{c:<10}" for c in cells))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny pipelines on the CPU (same code path)")
    parser.add_argument("--plan", action="store_true", help="count and print the cases; time nothing")
    parser.add_argument("--out", help="write the results as JSON here (rewritten after every case)")
    parser.add_argument(
        "--budget-s", type=float, default=480.0, help="start no case expected to end after this (s)"
    )
    parser.add_argument(
        "--only", nargs="+", metavar="CASE", help="run only these cases (names as --plan prints them)"
    )
    parser.add_argument("--device", help="default: cuda if there is one (cpu with --tiny)")
    parser.add_argument(
        "--count-workers",
        type=int,
        help="processes counting FLOPs and memory next to the timing (default 8; --tiny: 0, in this one)",
    )
    parser.add_argument("--rate", type=float, help=f"--plan: the FLOP/s rate (default {H200_BF16_FLOPS:.3g})")
    parser.add_argument("--verbose", action="store_true", help="the libraries' warnings and progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    run_all(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
