"""The driver side of `svdray train`: Ray, the dataset, the TorchTrainer, MLflow, the results.

`run_training` is the one function behind the CLI, the Ray job entrypoint and the tests.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
import yaml
from mlflow.tracking import MlflowClient
from ray.train.torch import TorchTrainer
from ray.train.v2.api.validation_config import ValidationConfig

from svdray import console, storage, tracking
from svdray.config import Config, ConfigError
from svdray.data.manifest import DataError, ManifestError
from svdray.data.prepare import Prepared, training_rows
from svdray.data.run import DataRecord, build_run_data, fill_cache, finish_run_data, training_stream
from svdray.data.video import ClipError, FrameSpec, decode_clip, load_image
from svdray.models import family_of
from svdray.progress import Progress, create_board, watch
from svdray.report import plot_loss_curve
from svdray.sample import write_mp4
from svdray.tracking import metric_history
from svdray.train.checkpoint import check_checkpoint, read_train_state
from svdray.train.data_split import DataParallelSplit
from svdray.train.failures import StopOnTrainingFailed, stop_on_errors, training_failure
from svdray.train.loop import train_loop_per_worker
from svdray.train.outputs import fetch_final_lora, publish_config, run_folder
from svdray.train.validate import checkpoint_validation, to_hwc, write_previews

logger = logging.getLogger("svdray.train")


class TrainingStopped(RuntimeError):
    """The numerical guard stopped the run (too many non-finite updates in a row)."""


@dataclass
class TrainingResult:
    output_dir: Path
    lora_dir: Path
    checkpoint_dir: Path | str | None  # a local folder, or the URI of one in a bucket
    mlflow_run_id: str
    tracking_uri: str
    metrics: dict


# The raylet warns ("N PYTHON worker processes have been started ... 4x the maximum expected
# startup concurrency") once a node runs 4x its startup concurrency of Python workers beyond its
# I/O workers, and that concurrency defaults to the node's cores. Ray Train and Ray Data run 9
# actors of their own beside a run's workers, decoders, ledger and progress board, so on a 2-core
# machine every run trips it. A floor of 8 keeps the warning for what it is meant to catch
# (runaway actor creation: 40 workers) and lets the raylet start 8 processes at once.
STARTUP_CONCURRENCY_ENV = "RAY_worker_maximum_startup_concurrency"
MIN_STARTUP_CONCURRENCY = 8


def init_ray(cfg: Config) -> None:
    """Connect to a cluster (ray.address or RAY_ADDRESS) or start a local one bound to 127.0.0.1.

    Unless --verbose, the workers' output stays in Ray's log files (the console shows our progress
    line; a worker's error still reaches the driver as the run's exception). The object-storage
    settings of this process's environment (svdray.storage) go to every worker through the
    runtime environment: workers on other nodes do not inherit the driver's environment."""
    if not ray.is_initialized():
        quiet = not console.verbose()
        options = {"log_to_driver": not quiet, "logging_level": logging.ERROR if quiet else logging.INFO}
        settings = storage.runtime_env_vars()
        if settings:
            options["runtime_env"] = {"env_vars": settings}
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, **options)
        else:
            # Read by the raylet this starts (a cluster of `ray start` reads its own environment).
            floor = max(MIN_STARTUP_CONCURRENCY, os.cpu_count() or 1)
            os.environ.setdefault(STARTUP_CONCURRENCY_ENV, str(floor))
            # "local": a new instance of our own, never a cluster another `ray start` left on
            # this machine (ray.init() alone joins the one in /tmp/ray/ray_current_cluster).
            ray.init(
                address="local",
                num_cpus=cfg.ray.num_cpus,
                include_dashboard=True,
                dashboard_host=cfg.ray.dashboard_host,
                **options,
            )
    console.quiet_ray_data()


def check_local_cluster_fits(cfg: Config) -> None:
    """A local Ray instance this run starts must hold its workers and one decoder at once, or the
    run would wait for CPUs forever: fail before anything starts, naming the keys."""
    if ray.is_initialized() or cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return  # a cluster's size is its own (an autoscaler may grow it)
    cpus = cfg.ray.num_cpus or os.cpu_count() or 1
    _, workers = cfg.train.worker_range()
    needed = workers * cfg.train.cpus_per_worker + cfg.data.decode_cpus
    if needed > cpus:
        raise ConfigError(
            f"ray.num_cpus: the local Ray instance has {cpus} CPUs, but {workers} workers x "
            f"train.cpus_per_worker {cfg.train.cpus_per_worker:g} + one decoder of data.decode_cpus "
            f"{cfg.data.decode_cpus:g} need {needed:g}: raise ray.num_cpus (logical CPUs may exceed "
            "the cores) or lower those"
        )


def resolve_paths(cfg: Config) -> Config:
    """Absolute output and storage paths (object URIs as they are): Ray workers run in other
    working directories."""
    cfg.output_dir = str(Path(cfg.output_dir).resolve())
    cfg.train.storage_path = storage.absolute(cfg.train.storage_path or Path(cfg.output_dir) / "ray")
    cfg.data.manifest = storage.absolute(cfg.data.manifest)
    if cfg.validate.manifest:
        cfg.validate.manifest = storage.absolute(cfg.validate.manifest)
    if cfg.train.resume_from:
        cfg.train.resume_from = storage.absolute(cfg.train.resume_from)
    if Path(cfg.model.pretrained).expanduser().exists():
        cfg.model.pretrained = str(Path(cfg.model.pretrained).expanduser().resolve())
    return cfg


def write_run_config(cfg: Config) -> Path:
    """The resolved config next to the run's outputs: `svdray export` reads the base model from it."""
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    path = Path(cfg.output_dir) / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    publish_config(cfg, path)
    return path


def latest_checkpoint(cfg: Config) -> ray.train.Checkpoint | None:
    """The newest checkpoint of a previous attempt of this run (same storage path and name)."""
    run_dir = run_folder(cfg)
    if not storage.exists(run_dir):
        return None
    path, filesystem = storage.ray_storage(run_dir)
    try:
        result = ray.train.Result.from_path(path, storage_filesystem=filesystem)
    except Exception:  # a folder without a finished snapshot: nothing reusable
        return None
    return result.checkpoint


def starting_point(cfg: Config) -> tuple[str | None, int]:
    """Where this launch starts: (checkpoint path or None, examples it already trained on).

    The run's own latest checkpoint (a relaunch with the same storage path and name) comes first;
    else `train.resume_from`, a checkpoint the user chose (`svdray train --resume PATH`)."""
    previous = latest_checkpoint(cfg)
    if previous is not None:
        with previous.as_directory() as ckpt_dir:
            path = storage.with_scheme(previous.path, cfg.train.storage_path)
            return path, read_train_state(ckpt_dir).samples_seen
    if cfg.train.resume_from:
        with storage.local_copy(cfg.train.resume_from) as local:
            return cfg.train.resume_from, read_train_state(local).samples_seen
    return None, 0


def shared_training_dataset(cfg: Config) -> ray.data.Dataset:
    """The run's planned stream (decoded, or read from the latent cache with data.cache), built
    apart from a run for Tune trials that all read the same stream; the clips are prepared into
    <output_dir>/data as a run would.

    It has no data ledger: it is built on the sweep's driver before any trial exists, so a clip
    that fails to decode (or to be cached) here is only logged. Each trial still creates its own
    ledger (`build_run_data`), which counts what that trial's workers were fed from this stream
    (and the cache failures its own cache lookup meets); the cache is filled here once, so the
    trials' lookups all hit.
    """
    prepared = training_rows(cfg.data, Path(cfg.output_dir) / "data")
    cache = (
        fill_cache(prepared.rows, cfg.data, cfg.model, family_of(cfg).cache_encoder())
        if cfg.data.cache
        else None
    )
    return training_stream(
        prepared.rows,
        cfg.data,
        cfg.train.max_steps * cfg.train.global_batch(),
        cfg.train.seed,
        0,
        cfg.train.bucket_run(),
        None,
        cache,
    )


def scaling_config(cfg: Config) -> ray.train.ScalingConfig:
    """The worker group of `train.*`: how many (a count, or Ray Train's elastic (min, max) with
    `train.elastic_resize_interval_s`), what each reserves (CPUs, a GPU, the custom resources that
    pick its nodes), and how they are placed over the nodes (`train.placement`)."""
    resources = {"CPU": cfg.train.cpus_per_worker, **cfg.train.resources_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = 1
    low, high = cfg.train.worker_range()
    return ray.train.ScalingConfig(
        num_workers=(low, high) if cfg.train.elastic() else high,
        elastic_resize_monitor_interval_s=cfg.train.elastic_resize_interval_s,
        use_gpu=cfg.train.use_gpu,
        resources_per_worker=resources,
        placement_strategy=cfg.train.placement.upper(),  # Ray's PACK / SPREAD
    )


def make_trainer(
    cfg: Config,
    loop: Callable[[dict[str, Any]], Any],
    loop_config: dict[str, Any],
    dataset: ray.data.Dataset,
    callbacks: list[ray.train.UserCallback] | None = None,
    validation: ValidationConfig | None = None,
) -> TorchTrainer:
    """The TorchTrainer of a run (`svdray train`, `svdray reward-train`, Tune trials): workers and
    resources from `train.*`, a stable name for resuming, bounded checkpoints, worker restarts
    after lost workers, and an error in the run's code or config ending the run at once (it would
    recur on every restart; see svdray.train.failures). `validation` validates checkpoints
    outside the training step (`validate.mode: checkpoint`)."""
    storage_path, storage_filesystem = storage.ray_storage(cfg.train.storage_path)
    return TorchTrainer(
        stop_on_errors(loop),
        train_loop_config=loop_config,
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=cfg.train.name,
            storage_path=storage_path,  # a bucket's: `bucket/key`, with its filesystem
            storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            # A dead worker (or node) restarts the worker group from the latest checkpoint.
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=[*(callbacks or []), StopOnTrainingFailed()],
        ),
        datasets={"train": dataset},
        validation_config=validation,
        # The stream's own execution options (plan order kept): without them Ray Train copies the
        # global context's, reading a deprecated option on the way (a warning in every run).
        dataset_config=DataParallelSplit(
            cfg.train.context_parallel, execution_options={"train": dataset.context.execution_options}
        ),
    )


def run_training(
    cfg: Config,
    *,
    parent_run_id: str | None = None,
    callbacks: list[ray.train.UserCallback] | None = None,
    dataset: ray.data.Dataset | None = None,
    progress: bool = True,
) -> TrainingResult:
    """Fit the run's TorchTrainer and log it to MLflow; resumes a previous attempt of the same run.

    For Tune trials: `parent_run_id` makes the MLflow run a child of the sweep's run, `callbacks`
    go into the trainer's RunConfig (Tune's TuneReportCallback), `dataset` is a stream
    `shared_training_dataset` built once for every trial (the loop skips what a checkpoint consumed),
    and `progress=False` leaves the console to the sweep's own progress line.
    """
    cfg = resolve_paths(cfg)
    if cfg.train.resume_from:
        with storage.local_copy(cfg.train.resume_from) as local:
            check_checkpoint(local)  # before anything starts: never a pickle
    check_local_cluster_fits(cfg)
    write_run_config(cfg)
    init_ray(cfg)
    # Started now, not with the trainer's dozen actors: fewer processes starting at once.
    board = create_board(cfg.train.name) if progress else None
    uri = tracking.tracking_uri(cfg)
    run_id = tracking.start_or_resume_run(cfg, parent_run_id=parent_run_id)
    tracking.log_dict_artifact(uri, run_id, cfg.to_dict(), "config.yaml")

    # Data position: a relaunch (or a --resume) starts its data stream after the examples the
    # checkpoint already trained on, instead of decoding them again only to skip them.
    start_from, data_skip = starting_point(cfg)
    if start_from:
        logger.info("resuming %s from %s (%d examples already seen)", cfg.train.name, start_from, data_skip)

    data_context = ray.data.DataContext.get_current()
    # The stream keeps plan order on its own context, but Ray Train's DataConfig replaces a
    # dataset's execution options with the global context's when it splits it for the workers.
    data_context.execution_options.preserve_order = True
    data_context.enable_progress_bars = False  # the training step lines are the progress to watch
    try:
        data = build_run_data(
            cfg, cfg.train.max_steps * cfg.train.global_batch(), data_skip, family_of(cfg).cache_encoder()
        )
    except (DataError, ManifestError):
        tracking.end_run(uri, run_id, status="FAILED")
        raise
    log_data_record(uri, run_id, data.record)
    rows = data.rows
    tracking.set_description(uri, run_id, run_description(cfg, data.prepared))
    if dataset is None:
        dataset = data.dataset
    else:
        data_skip = 0  # a shared stream starts at its beginning: the loop skips what was consumed

    trainer = make_trainer(
        cfg,
        train_loop_per_worker,
        {
            "config": cfg.to_dict(),
            "mlflow_run_id": run_id,
            "tracking_uri": uri,
            "data_skip": data_skip,
            "resume_from": cfg.train.resume_from,
        },
        dataset,
        callbacks,
        checkpoint_validation(cfg, uri, run_id),
    )
    try:
        with training_progress(cfg, board), tracking.SystemMetrics(uri, run_id):
            result = trainer.fit()
    except BaseException as err:
        raise_training_failure(err, uri, run_id)
        tracking.end_run(uri, run_id, status="FAILED")
        raise
    outcome = result.return_value
    if outcome is None:  # the loop never returned: the run was aborted (e.g. Ctrl-C)
        tracking.end_run(uri, run_id, status="KILLED")
        raise RuntimeError(f"run {cfg.train.name} was interrupted; run the same command again to resume it")
    if "stopped" in outcome:
        MlflowClient(tracking_uri=uri).set_tag(run_id, "svdray.stopped", outcome["stopped"])
        tracking.end_run(uri, run_id, status="FAILED")
        raise TrainingStopped(outcome["stopped"])

    output = TrainingResult(
        output_dir=Path(cfg.output_dir),
        lora_dir=fetch_final_lora(cfg),
        checkpoint_dir=checkpoint_location(cfg, result.checkpoint),
        mlflow_run_id=run_id,
        tracking_uri=uri,
        metrics=final_metrics(result),
    )
    log_data_record(uri, run_id, finish_run_data(data))
    log_results(cfg, output, rows)
    tracking.end_run(uri, run_id)
    return output


def checkpoint_location(cfg: Config, checkpoint: ray.train.Checkpoint | None) -> Path | str | None:
    """Where a checkpoint Ray Train returned lies: a local folder, or the URI of one in a bucket
    (Ray's own path has no scheme)."""
    if checkpoint is None:
        return None
    if storage.is_remote(cfg.train.storage_path):
        return storage.with_scheme(checkpoint.path, cfg.train.storage_path)
    return Path(checkpoint.path)


def final_metrics(result: ray.train.Result) -> dict[str, Any]:
    """The last report's metrics, with what a checkpoint validation (`validate.mode: checkpoint`)
    added to the last checkpoint's (its `val_loss`): Ray Train waits for it before `fit` returns."""
    metrics = dict(result.metrics or {})
    for checkpoint, checkpoint_metrics in result.best_checkpoints or []:
        if result.checkpoint is not None and checkpoint.path == result.checkpoint.path:
            metrics.update(checkpoint_metrics)
    return metrics


def log_data_record(uri: str, run_id: str, record: DataRecord) -> None:
    """The data layer's account of the run's data: tags, and files under the run's data/."""
    tracking.set_tags(uri, run_id, record.tags)
    for path in record.files:
        tracking.log_artifacts(uri, run_id, {"data": path})


@contextlib.contextmanager
def training_progress(cfg: Config, board: Any | None, label: str = "train") -> Iterator[None]:
    """The driver's progress line while the block (trainer.fit) runs, fed by rank 0 through
    `board` (`svdray.progress.create_board`; None: no line, e.g. in a Tune trial)."""
    if board is None:
        yield
        return
    with watch(board, Progress(label, cfg.train.max_steps)):
        yield


def run_description(cfg: Config, prepared: Prepared) -> str:
    """The run's description in the MLflow UI (markdown): what ran, on what, and where it wrote."""
    workers = "{}-{}".format(*cfg.train.worker_range()) if cfg.train.elastic() else cfg.train.num_workers
    lines = [
        f"- **command**: `{tracking.command_line()}`",
        f"- **model**: `{cfg.model.pretrained}` with a rank-{cfg.lora.rank} LoRA on the "
        f"{' and '.join(cfg.lora.blocks)} attention ({', '.join(cfg.lora.target_modules)}); "
        f"{cfg.train.max_steps} steps of {cfg.train.global_batch()} clips on {workers} workers, "
        f"lr {cfg.optim.lr:g} ({cfg.optim.schedule})",
        f"- **data**: {len(prepared.rows)} clips of `{cfg.data.manifest}` "
        f"({len(prepared.rejects)} rejected), "
        f"{cfg.data.num_frames} frames at {cfg.data.fps:g} fps, {cfg.data.height}x{cfg.data.width}",
    ]
    if cfg.validate.manifest:
        lines.append(
            f"- **validation**: `{cfg.validate.manifest}` every {cfg.validate.every} steps: `val/loss` "
            "(fixed sigma grid and noise, comparable across steps and runs); previews in "
            "`validation/step_*/preview.gif` (conditioning | sample | ground truth)"
        )
    lines.append(
        f"- **outputs**: `{cfg.output_dir}` (LoRA in `lora/`, checkpoints in `{cfg.train.storage_path}`); "
        "this run's artifacts: `lora/`, `config.yaml`, `loss_curve.png`, `data/`"
        + (", `samples/preview.gif`" if cfg.sample.enabled else "")
    )
    if cfg.mlflow.description:
        lines += ["", cfg.mlflow.description.strip()]
    return "\n".join(lines) + "\n"


def raise_training_failure(err: BaseException, uri: str, run_id: str) -> None:
    """If `trainer.fit()` raised because a worker's error would recur on a restart: log its
    traceback, tag and end the MLflow run, and raise that TrainingFailed in place of Ray's wrapper."""
    failure = training_failure(err)
    if failure is None:
        return
    logger.error("training worker %d failed:\n%s", failure.rank, failure.worker_traceback)
    MlflowClient(tracking_uri=uri).set_tag(run_id, "svdray.failed", str(failure)[:5000])
    tracking.end_run(uri, run_id, status="FAILED")
    raise failure from None


def conditioning_image(cfg: Config, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """The sample's conditioning image (3, H, W) uint8, the clip it starts (None for
    `sample.image`) and that clip's prompt: the first clip that still decodes (a clip can break
    after `prepare`), framed as training frames it."""
    if cfg.sample.image:
        return load_image(cfg.sample.image), None, (rows[0].get("prompt") or "") if rows else ""
    spec = FrameSpec(cfg.data.num_frames, cfg.data.fps, cfg.data.height, cfg.data.width, "first", "center")
    errors = []
    for row in rows:
        try:
            frames, image = decode_clip(row["video"], spec, seed=0, image_path=row.get("image"))
        except ClipError as err:
            errors.append(str(err))
            continue
        return image, frames, row.get("prompt") or ""
    raise ClipError("no clip decodes for the sample's conditioning image: " + "; ".join(errors[:3]))


def log_results(cfg: Config, result: TrainingResult, rows: list[dict]) -> None:
    """The LoRA, a loss-curve PNG and (if enabled) a video sampled with the trained LoRA, loaded
    as `svdray sample --lora` loads it and conditioned as training conditioned the UNet, with a
    preview GIF (conditioning | sample | ground truth) large enough to judge in the MLflow UI."""
    artifacts: dict[str, Path] = {"lora": result.lora_dir}
    curve = metric_history(result.tracking_uri, result.mlflow_run_id, "train/loss")
    if curve:
        series = {
            "train loss": curve,
            "validation loss": metric_history(result.tracking_uri, result.mlflow_run_id, "val/loss"),
        }
        artifacts[""] = plot_loss_curve(series, result.output_dir / "loss_curve.png", cfg.train.name)
    if cfg.sample.enabled:
        family = family_of(cfg)
        spec = family.sampling_spec(cfg)
        models = family.load_sampling_models(cfg, result.lora_dir)
        image, clip, prompt = conditioning_image(cfg, rows)
        frames = family.sample_video(models, image, spec, clip=clip, prompt=prompt)
        conditioning = family.describe_conditioning(spec, clip)
        logger.info("sample: %s, %d steps", conditioning, spec.steps)
        tracking.set_tags(
            result.tracking_uri, result.mlflow_run_id, {"svdray.sample_conditioning": conditioning}
        )
        samples = result.output_dir / "samples"
        samples.mkdir(exist_ok=True)
        write_mp4(frames, samples / "sample.mp4", spec.fps)
        truth = to_hwc(clip) if clip is not None else None
        write_previews([(to_hwc(image), frames, truth)], samples, spec.fps)
        artifacts["samples"] = samples
    tracking.log_artifacts(result.tracking_uri, result.mlflow_run_id, artifacts)
