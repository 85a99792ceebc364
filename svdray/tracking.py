"""MLflow: one run per training job, found again by its stable name so a resumed job continues it.

The driver creates (or finds) the run and logs params, tags and artifacts; rank 0 of the training
workers logs step metrics into the same run by id. Param names are the flattened config keys of
the sections the run uses, so runs are searchable as `params.\\`lora.rank\\` = '8'` (backticks
because of the dot); the whole config is the run's config.yaml artifact.

Metric names carry a group prefix so the UI draws them in sections: `train/loss`, `train/lr`,
`val/loss`, `data/samples_per_s`, ... (`mlflow_metrics`). Ray Train and Tune see the loop's plain
names (`loss`, `val_loss`: `tune.metric` names one of them). One-off counts are tags.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Param, RunTag
from mlflow.tracking import MlflowClient

from svdray import console, storage
from svdray.config import Config, flatten

RUN_KEY_TAG = "svdray.run_key"

# The config sections a training run is described by (params); the others only say where things
# go (mlflow, ray), or belong to other commands (reward, tune), and stay in config.yaml.
TRAIN_SECTIONS = ("model", "data", "lora", "optim", "train", "speed", "sample", "validate")
# Keys that say where files go or how often to log and keep things: not what was trained.
NOT_PARAMS = {
    "train.name",
    "train.storage_path",
    "train.log_every",
    "train.report_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.save_worker_loras",
    "train.resume_from",
    "train.max_failures",
    "train.placement",
    "train.checkpoint_upload",
    "train.max_bad_steps",
    "train.debug_nan_at_steps",
    "data.cache_dir",
    "data.cache_batch_size",
    "data.cache_actors",
    "data.decoders",
    "data.decode_cpus",
    "data.strict",
}
# Loop metrics that are not in the `train/` group: validation, and how fast data went through.
METRIC_GROUPS = {
    "val_loss": "val/loss",
    "samples_per_s": "data/samples_per_s",
    "frames_per_s": "data/frames_per_s",
}


def mlflow_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The loop's metrics under their MLflow names: `loss` -> `train/loss`, `val_loss` -> `val/loss`;
    a name that has a group already (`reward/motion`) stays; the step is MLflow's own axis."""
    return {
        (name if "/" in name else METRIC_GROUPS.get(name, f"train/{name}")): value
        for name, value in metrics.items()
        if name != "step"
    }


def tracking_uri(cfg: Config) -> str:
    """MLFLOW_TRACKING_URI from the environment wins (credentials and servers stay out of configs).

    A relative sqlite path is made absolute so Ray workers, whose working directory differs,
    write to the same store as the driver.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


def run_key(cfg: Config) -> str:
    return f"{storage.absolute(cfg.train.storage_path)}/{cfg.train.name}"


def artifact_location(uri: str, configured: str = "") -> str | None:
    """Where a new experiment keeps artifacts: `mlflow.artifact_location` if set (e.g.
    s3://bucket/mlflow, written by MLflow's client itself), else beside a sqlite database file.

    MLflow's default is ./mlruns under the working directory of whichever process creates the
    experiment; for a Ray job that is a temporary copy of the submitted folder, deleted later.
    """
    if configured:
        return storage.absolute(configured)
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///") :]).parent / "mlruns")
    return None  # a tracking server (or other store) decides


def get_or_create_experiment(uri: str, name: str, location: str = "") -> str:
    """The experiment's id; a new one keeps its artifacts where `artifact_location` says."""
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(uri, location))
        except mlflow.exceptions.MlflowException:  # created by another process meanwhile
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    return experiment.experiment_id


def run_params(cfg: Config, sections: Iterable[str], skip: Collection[str] = ()) -> dict[str, str]:
    """Params of a run: the set keys of the sections it uses and of its model family's own section
    (`svd.*`, `wan.*`), without the plumbing (`NOT_PARAMS`)."""
    tree = cfg.to_dict()
    params = {}
    for section in (*sections, cfg.family_section):
        if section == "sample" and not cfg.sample.enabled:
            continue
        if section == "validate" and not cfg.validate.manifest:
            continue
        for key, value in flatten({section: tree[section]}).items():
            if value is None or value == [] or value == {} or key in NOT_PARAMS or key in skip:
                continue
            params[key] = str(value)[:6000]
    return params


def command_line() -> str:
    """The command that started this process: `svdray ...` as typed (the CLI records it, also for
    `python -m svdray.cli` and job entrypoints), else this Python's own argv."""
    return os.environ.get(console.COMMAND_ENV) or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def git_tags() -> dict[str, str]:
    """Where the running code comes from: the command, and the git commit of svdray's checkout."""
    tags = {
        "mlflow.source.name": command_line(),
        "mlflow.source.type": "LOCAL",
    }
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        tags["mlflow.source.git.commit"] = git("rev-parse", "HEAD")
        tags["mlflow.source.git.branch"] = git("rev-parse", "--abbrev-ref", "HEAD")
        tags["svdray.git_dirty"] = "true" if git("status", "--porcelain", "--untracked-files=no") else "false"
    except (OSError, subprocess.SubprocessError):  # not a checkout (an installed wheel), or no git
        pass
    return tags


def set_tags(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    MlflowClient(tracking_uri=uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def set_description(uri: str, run_id: str, text: str) -> None:
    """The run's description (the note the MLflow UI shows on the run's page, markdown)."""
    set_tags(uri, run_id, {"mlflow.note.content": text})


def start_or_resume_run(
    cfg: Config,
    parent_run_id: str | None = None,
    skip_params: Collection[str] = (),
    sections: Iterable[str] = TRAIN_SECTIONS,
) -> str:
    """The MLflow run for this training job: the existing one with the same run key, or a new one.

    `sections`: the config sections logged as params. `skip_params`: config keys not logged as
    params (a sweep's run leaves out the searched keys, so a search by param finds the trials only).
    """
    # Only explicit clients: mlflow.set_tracking_uri() would also write MLFLOW_TRACKING_URI into
    # this process's environment, and every later run started here would land in this store.
    uri = tracking_uri(cfg)
    experiment_id = get_or_create_experiment(uri, cfg.mlflow.experiment, cfg.mlflow.artifact_location)
    client = MlflowClient(tracking_uri=uri)
    key = run_key(cfg)
    existing = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1
    )
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {RUN_KEY_TAG: key, **git_tags()}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=cfg.mlflow.run_name or cfg.train.name, tags=tags)
    items = [Param(k, v) for k, v in run_params(cfg, sections, skip_params).items()]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=items[start : start + 100])
    return run.info.run_id


class SystemMetrics:
    """MLflow's own system metrics (CPU, memory, disk, network, GPU; psutil) for a run logged by
    id, sampled in this process every `interval` seconds while the block runs."""

    def __init__(self, uri: str, run_id: str, interval: float = 10.0):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=uri)

    def __enter__(self) -> SystemMetrics:
        self.monitor.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.monitor.finish()


class MetricWriter:
    """Step metrics from the rank-0 worker into an existing run (no active-run global state)."""

    def __init__(self, uri: str, run_id: str):
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
        )


def log_artifacts(uri: str, run_id: str, paths: dict[str, Path]) -> None:
    """Log files or folders; the dict maps artifact sub-folder to local path."""
    client = MlflowClient(tracking_uri=uri)
    for sub, path in paths.items():
        if Path(path).is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=sub)
        else:
            client.log_artifact(run_id, str(path), artifact_path=sub or None)


def log_dict_artifact(uri: str, run_id: str, data: dict[str, Any], name: str) -> None:
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        MlflowClient(tracking_uri=uri).log_artifact(run_id, str(path))


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(tracking_uri=uri).set_terminated(run_id, status=status)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) sorted by step. A step logged more than once (a resumed run redoes the steps
    after its checkpoint) counts with its latest value."""
    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)
    latest = {m.step: m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp))}
    return sorted(latest.items())
