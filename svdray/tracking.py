"""MLflow: one run per training job, found again by its stable name so a resumed job continues it.

The driver creates (or finds) the run and logs params and artifacts; rank 0 of the training
workers logs step metrics into the same run by id. Param names are the flattened config keys,
so runs are searchable as `params.\\`lora.rank\\` = '8'` (backticks because of the dot).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from svdray.config import Config, flatten

RUN_KEY_TAG = "svdray.run_key"


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
    return f"{Path(cfg.train.storage_path).resolve()}/{cfg.train.name}"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment in a sqlite store keeps artifacts: beside the database file.

    MLflow's default is ./mlruns under the working directory of whichever process creates the
    experiment; for a Ray job that is a temporary copy of the submitted folder, deleted later.
    """
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///") :]).parent / "mlruns")
    return None  # a tracking server (or other store) decides


def get_or_create_experiment(uri: str, name: str) -> str:
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(uri))
        except mlflow.exceptions.MlflowException:  # created by another process meanwhile
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    return experiment.experiment_id


def start_or_resume_run(
    cfg: Config, parent_run_id: str | None = None, skip_params: Collection[str] = ()
) -> str:
    """The MLflow run for this training job: the existing one with the same run key, or a new one.

    `skip_params`: config keys not logged as params (a sweep's run leaves out the searched keys,
    so a search by param finds the trials only).
    """
    # Only explicit clients: mlflow.set_tracking_uri() would also write MLFLOW_TRACKING_URI into
    # this process's environment, and every later run started here would land in this store.
    uri = tracking_uri(cfg)
    experiment_id = get_or_create_experiment(uri, cfg.mlflow.experiment)
    client = MlflowClient(tracking_uri=uri)
    key = run_key(cfg)
    existing = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1
    )
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {RUN_KEY_TAG: key}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=cfg.mlflow.run_name or cfg.train.name, tags=tags)
    params = {
        k: ("null" if v is None else str(v))[:6000]
        for k, v in flatten(cfg.to_dict()).items()
        if k not in skip_params
    }
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=items[start : start + 100])
    return run.info.run_id


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
