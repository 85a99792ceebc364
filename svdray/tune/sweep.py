"""`svdray tune`: a Ray Tune sweep whose trials are `svdray train` runs, tracked in MLflow.

    sweep driver (`svdray tune`, jobs/tune.py)       each trial (a Tune actor)
      parent MLflow run, named after the sweep        run_trial(params)
      the decoded training stream, once          -->    config = sweep config + params
      Tuner: search + ASHA on `objective`               run_training(config): the TorchTrainer of
      TrialTracker marks each trial's MLflow run          `svdray train`, its MLflow run a child of
      at the end: summary, plot, best LoRA                the sweep's, TuneReportCallback in its
        on the parent and in the model registry           RunConfig

A trial is a `svdray train` run (same trainer, loop, checkpoints and MLflow logging) named
`<sweep>-<trial id>`, so a restarted trial resumes from its own checkpoints, and a re-run of the
same sweep (same name and storage path) resumes the Tune experiment.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import ray.data
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from svdray import console, storage, tracking
from svdray.config import Config, ConfigError, config_from_dict, set_key
from svdray.progress import Progress
from svdray.train.trainer import init_ray, resolve_paths, run_training, shared_training_dataset
from svdray.tune.objective import OBJECTIVE, ObjectiveReport
from svdray.tune.report import (
    ERRORED,
    FINISHED,
    STOPPED,
    TrialSummary,
    format_table,
    plot_axes,
    plot_objective,
    summary_rows,
    write_csv,
)
from svdray.tune.space import param_space, shares_data, sweep_dir, sweep_name, trial_config, trial_steps

logger = logging.getLogger("svdray.tune")

STATUS_TAG = "svdray.trial_status"  # finished | stopped_early | error
TRIAL_TAG = "svdray.trial_id"
SWEEP_TAG = "svdray.sweep"
MLFLOW_STATUS = {FINISHED: "FINISHED", STOPPED: "KILLED", ERRORED: "FAILED"}


@dataclass
class SweepResult:
    parent_run_id: str
    tracking_uri: str
    trials: list[TrialSummary]
    best: TrialSummary | None
    model_version: str | None
    table: str
    summary_csv: Path
    plot: Path | None


def run_trial(
    params: dict[str, Any],
    *,
    config: dict[str, Any],
    parent_run_id: str,
    tracking_uri: str,
    dataset: ray.data.Dataset | None = None,
) -> None:
    """One Tune trial: the sweep's config with this trial's values, trained as `svdray train` does."""
    # The sweep driver's store, even when the driver got it from its own environment.
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    cfg = config_from_dict(config, check_files=False)
    trial_id = tune.get_context().get_trial_id()
    trial_cfg = resolve_paths(trial_config(cfg, params, trial_id))
    run_id = tracking.start_or_resume_run(trial_cfg, parent_run_id=parent_run_id)
    client = MlflowClient(tracking_uri=tracking_uri)
    for key, value in {TRIAL_TAG: trial_id, SWEEP_TAG: sweep_name(cfg), STATUS_TAG: "running"}.items():
        client.set_tag(run_id, key, value)
    run_training(
        trial_cfg,
        parent_run_id=parent_run_id,
        callbacks=[ObjectiveReport(cfg.tune.metric, cfg.tune.metric_window)],
        dataset=dataset,
        progress=False,  # the sweep's driver shows the trials' progress
    )


def trial_status(result: dict[str, Any], max_t: int, errored: bool = False) -> str:
    if errored:
        return ERRORED
    return FINISHED if result.get("step", 0) >= max_t else STOPPED


def trial_runs(uri: str, parent_run_id: str) -> dict[str, Any]:
    """The sweep's child runs by trial id."""
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=10000
    )
    return {run.data.tags[TRIAL_TAG]: run for run in runs if TRIAL_TAG in run.data.tags}


def mark_trial(uri: str, run: Any, status: str, objective: float | None, step: int) -> None:
    """Record how a trial ended on its MLflow run; writes only what differs, so it can be repeated."""
    client = MlflowClient(tracking_uri=uri)
    if run.data.tags.get(STATUS_TAG) != status:
        client.set_tag(run.info.run_id, STATUS_TAG, status)
        if objective is not None:
            client.log_metric(run.info.run_id, OBJECTIVE, objective, step=step)
    if run.info.status != MLFLOW_STATUS[status]:
        client.set_terminated(run.info.run_id, status=MLFLOW_STATUS[status])


class TrialTracker(tune.Callback):
    """Marks each trial's MLflow run as finished, stopped early (ASHA) or failed as soon as Tune
    is done with it, so a long sweep shows the truth while it runs.

    A trial that ASHA stops is marked while Tune is still stopping it, and its driver may then
    record the interrupted training as FAILED: the marks are applied again whenever a trial
    starts (the stopped trial's resources are free by then), and at the end of the sweep.
    """

    def __init__(self, uri: str, parent_run_id: str, max_t: int):
        self.uri, self.parent_run_id, self.max_t = uri, parent_run_id, max_t
        self.marks: dict[str, tuple[str, float | None, int]] = {}

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._record(trial, trial_status(trial.last_result, self.max_t))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._record(trial, ERRORED)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._apply()

    def _record(self, trial: Any, status: str) -> None:
        result = trial.last_result or {}
        self.marks[trial.trial_id] = (status, result.get(OBJECTIVE), result.get("step", 0))
        self._apply()

    def _apply(self) -> None:
        if not self.marks:
            return
        try:
            runs = trial_runs(self.uri, self.parent_run_id)
            for trial_id, (status, objective, step) in self.marks.items():
                if trial_id in runs:
                    mark_trial(self.uri, runs[trial_id], status, objective, step)
        except Exception as err:  # the tracking server is down: the end of the sweep retries
            logger.warning("could not mark trials in MLflow: %s", err)


class TrialProgress(tune.Callback):
    """The sweep's progress line in the driver: trials done of `num_samples`, running, stopped
    early and failed, and the best objective so far."""

    def __init__(self, num_samples: int, mode: str, max_t: int):
        self.progress = Progress("tune", num_samples, unit="trials")
        self.mode, self.max_t = mode, max_t
        self.ended: dict[str, str] = {}  # trial id -> finished | stopped_early | error
        self.running: set[str] = set()
        self.best: float | None = None

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.add(trial.trial_id)
        self._show()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        objective = result.get(OBJECTIVE)
        if objective is not None:
            better = min if self.mode == "min" else max
            self.best = objective if self.best is None else better(self.best, objective)
        self._show()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, trial_status(trial.last_result or {}, self.max_t))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, ERRORED)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.progress.close()

    def _end(self, trial: Any, status: str) -> None:
        self.running.discard(trial.trial_id)
        self.ended[trial.trial_id] = status
        self._show()

    def _show(self) -> None:
        statuses = list(self.ended.values())
        self.progress.update(
            len(self.ended),
            running=str(len(self.running)),
            finished=str(statuses.count(FINISHED)),
            stopped=str(statuses.count(STOPPED)),
            failed=str(statuses.count(ERRORED)),
            best=f"{self.best:.4g}" if self.best is not None else "",
        )


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


def start_parent_run(cfg: Config) -> str:
    """The sweep's MLflow run: found again by its run key (storage path + sweep name) on resume."""
    tree = set_key(cfg.to_dict(), "train.name", sweep_name(cfg))
    run_id = tracking.start_or_resume_run(
        config_from_dict(tree, check_files=False),
        skip_params=set(cfg.tune.search_space),
        sections=(*tracking.TRAIN_SECTIONS, "tune"),
    )
    client = MlflowClient(tracking_uri=tracking.tracking_uri(cfg))
    client.set_tag(run_id, SWEEP_TAG, sweep_name(cfg))
    client.set_tag(run_id, "svdray.role", "sweep")
    tracking.log_dict_artifact(tracking.tracking_uri(cfg), run_id, cfg.to_dict(), "config.yaml")
    return run_id


def shared_dataset(cfg: Config) -> ray.data.Dataset | None:
    """The training stream every trial reads, decoded once here (None: each trial decodes its own)."""
    if not shares_data(cfg):
        if cfg.tune.share_data:
            logger.info("the search space changes the data: every trial decodes its own stream")
        return None
    proto = trial_config(cfg, {}, "shared")  # the trials' step budget sets the stream's length
    logger.info("decoding the training stream once for all trials")
    return shared_training_dataset(proto).materialize()


def fit_trials(cfg: Config, uri: str, parent_run_id: str) -> tune.ResultGrid:
    trainable = tune.with_parameters(
        run_trial,
        config=cfg.to_dict(),
        parent_run_id=parent_run_id,
        tracking_uri=uri,
        dataset=shared_dataset(cfg),
    )
    trainable = tune.with_resources(trainable, {"CPU": cfg.tune.trial_cpus})
    # A bucket's storage path goes to Tune as `bucket/key` with its filesystem.
    storage_path, filesystem = storage.ray_storage(cfg.train.storage_path)
    experiment, _ = storage.ray_storage(storage.join(cfg.train.storage_path, sweep_name(cfg)))
    if tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        logger.info("resuming sweep %s from %s", sweep_name(cfg), experiment)
        tuner = tune.Tuner.restore(
            experiment, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=filesystem
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(cfg),
            tune_config=tune.TuneConfig(
                metric=OBJECTIVE,
                mode=cfg.tune.mode,
                # The random/grid generator limits concurrency itself (Tune's max_concurrent_trials
                # only wraps Searchers).
                search_alg=BasicVariantGenerator(
                    random_state=cfg.tune.seed, max_concurrent=cfg.tune.max_concurrent_trials
                ),
                # A trial that survives every rung ends by itself at max_t, after its driver has
                # saved and logged the LoRA: ASHA must not stop it at its last report.
                scheduler=ASHAScheduler(
                    time_attr="step",
                    max_t=trial_steps(cfg),
                    grace_period=cfg.tune.grace_period,
                    reduction_factor=cfg.tune.reduction_factor,
                    stop_last_trials=False,
                ),
                num_samples=cfg.tune.num_samples,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=sweep_name(cfg),
                storage_path=storage_path,
                storage_filesystem=filesystem,
                callbacks=[
                    TrialTracker(uri, parent_run_id, trial_steps(cfg)),
                    TrialProgress(cfg.tune.num_samples, cfg.tune.mode, trial_steps(cfg)),
                ],
                verbose=None if console.verbose() else 0,  # quiet: the line above instead of Tune's tables
            ),
        )
    return tuner.fit()


def summarize(results: tune.ResultGrid, cfg: Config, uri: str, parent_run_id: str) -> list[TrialSummary]:
    runs = trial_runs(uri, parent_run_id)
    keys = list(cfg.tune.search_space)
    trials = []
    for result in results:
        trial_id = Path(result.path).name  # see _trial_dirname
        metrics = result.metrics or {}
        run = runs.get(trial_id)
        params = {k: (v.item() if hasattr(v, "item") else v) for k, v in (result.config or {}).items()}
        trials.append(
            TrialSummary(
                trial_id=trial_id,
                params={k: params.get(k) for k in keys},
                status=trial_status(metrics, trial_steps(cfg), errored=result.error is not None),
                steps=int(metrics.get("step", 0)),
                objective=metrics.get(OBJECTIVE),
                run_id=run.info.run_id if run else None,
                metrics=metrics,
                val_loss=run.data.metrics.get(tracking.METRIC_GROUPS["val_loss"]) if run else None,
            )
        )
        if run is not None:  # what the TrialTracker did not get to (or could not reach MLflow for)
            mark_trial(uri, run, trials[-1].status, trials[-1].objective, trials[-1].steps)
    return sorted(trials, key=lambda t: t.trial_id)


def pick_best(trials: list[TrialSummary], mode: str) -> TrialSummary | None:
    """The best objective among trials that ran to the end (a stopped trial's objective comes
    from fewer steps, so it is no fair comparison); any trial only if none finished."""
    scored = [t for t in trials if t.objective is not None and t.status == FINISHED]
    scored = scored or [t for t in trials if t.objective is not None]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda t: t.objective)


def register_best(uri: str, name: str, parent_run_id: str, best: TrialSummary) -> str:
    """A new version of registered model `name`: the LoRA folder logged on the sweep's run.

    The folder is peft's adapter format, not an MLflow model flavor, so it is registered with
    the client's create_model_version (mlflow.register_model wants a logged model).
    """
    client = MlflowClient(tracking_uri=uri)
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description="svdray LoRA adapters (peft format) for SVD")
    tags = {
        TRIAL_TAG: best.trial_id,
        "svdray.child_run_id": best.run_id or "",
        OBJECTIVE: str(best.objective),
    }
    tags.update({k: str(v) for k, v in best.params.items()})
    version = client.create_model_version(
        name,
        source=f"runs:/{parent_run_id}/best/lora",
        run_id=parent_run_id,
        tags=tags,
        description=f"best trial {best.trial_id} of sweep run {parent_run_id}",
    )
    return version.version


def log_best(cfg: Config, uri: str, parent_run_id: str, best: TrialSummary) -> str | None:
    """The best trial's LoRA and config on the parent run, and the LoRA in the model registry."""
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_run_id)
    if parent.data.tags.get("svdray.best_run_id") == best.run_id:  # a re-run of a finished sweep
        return parent.data.tags.get("svdray.model_version")
    with tempfile.TemporaryDirectory() as tmp:
        for artifact in ("lora", "config.yaml"):
            local = mlflow.artifacts.download_artifacts(
                run_id=best.run_id, artifact_path=artifact, dst_path=tmp, tracking_uri=uri
            )
            if Path(local).is_dir():
                client.log_artifacts(parent_run_id, local, artifact_path=f"best/{artifact}")
            else:
                client.log_artifact(parent_run_id, local, artifact_path="best")
    client.log_metric(parent_run_id, f"best_{OBJECTIVE}", best.objective)
    client.set_tag(parent_run_id, "svdray.best_trial", best.trial_id)
    client.set_tag(parent_run_id, "svdray.best_run_id", best.run_id)
    version = None
    if cfg.tune.registered_model:
        version = register_best(uri, cfg.tune.registered_model, parent_run_id, best)
        client.set_tag(parent_run_id, "svdray.registered_model", cfg.tune.registered_model)
        client.set_tag(parent_run_id, "svdray.model_version", version)
    return version


def run_sweep(cfg: Config) -> SweepResult:
    if not cfg.tune.search_space:
        raise ConfigError("tune.search_space: empty, nothing to sweep")
    cfg = resolve_paths(cfg)
    init_ray(cfg)
    uri = tracking.tracking_uri(cfg)
    out = sweep_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    parent_run_id = start_parent_run(cfg)
    try:
        results = fit_trials(cfg, uri, parent_run_id)
        trials = summarize(results, cfg, uri, parent_run_id)
        best = pick_best(trials, cfg.tune.mode)
        keys = list(cfg.tune.search_space)
        rows = summary_rows(trials, keys, best, cfg.tune.mode)
        summary_csv = write_csv(rows, out / "summary.csv")
        client = MlflowClient(tracking_uri=uri)
        client.log_artifact(parent_run_id, str(summary_csv))
        x_key, series_key = plot_axes(keys, trials)
        plot = None
        if x_key:
            plot = plot_objective(
                trials,
                x_key,
                series_key,
                out / f"objective_vs_{x_key}.png",
                title=sweep_name(cfg),
                ylabel=f"{OBJECTIVE}: mean of last {cfg.tune.metric_window} {cfg.tune.metric}",
            )
            client.log_artifact(parent_run_id, str(plot))
        for status in (FINISHED, STOPPED, ERRORED):
            client.log_metric(parent_run_id, f"trials_{status}", sum(t.status == status for t in trials))
        version = log_best(cfg, uri, parent_run_id, best) if best else None
    except BaseException:
        tracking.end_run(uri, parent_run_id, status="FAILED")
        raise
    tracking.end_run(uri, parent_run_id)
    return SweepResult(parent_run_id, uri, trials, best, version, format_table(rows), summary_csv, plot)
