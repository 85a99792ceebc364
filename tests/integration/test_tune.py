"""Sweeps: a real ASHA sweep submitted as a Ray job, read back from a real `mlflow server` through
MLflow's REST API."""

from __future__ import annotations

import json
import re
import subprocess

import yaml

from tests.support.paths import REPO
from tests.support.runs import SEARCH


def test_asha_sweep_as_a_ray_job_tracked_in_mlflow(
    ray_head, mlflow_ui, tmp_path, one_clip_manifest, write_config
):
    """3 trials of 1 worker on a 2-CPU head, one at a time; ASHA stops some at step 2 or 4 and
    the next trial still gets the CPUs; the MLflow server that `svdray ui` runs (URI from the job's
    environment) holds one parent run, one child run per trial, and the best LoRA in the model
    registry."""
    mlflow_server, db = mlflow_ui
    # `svdray ui` listens on the loopback interface only.
    port = mlflow_server.uri.rsplit(":", 1)[1]
    listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
    assert {line.split()[3] for line in listening.splitlines()} == {f"127.0.0.1:{port}"}
    model_name = "svdray-test-lora"
    path = write_config(
        one_clip_manifest,
        train={"name": "sw", "max_steps": 6, "checkpoint_every": 2, "log_every": 1},
        tune={
            "search_space": SEARCH,
            "num_samples": 3,
            "metric_window": 2,
            "grace_period": 2,
            "max_concurrent_trials": 1,
            "seed": 0,
            "registered_model": model_name,
        },
        mlflow={"experiment": "sweeps"},  # the config's sqlite URI loses to MLFLOW_TRACKING_URI
    )
    runtime_env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] = mlflow_server.uri
    env_file = tmp_path / "runtime_env.yaml"
    env_file.write_text(yaml.safe_dump(runtime_env))

    result = ray_head.submit(
        ["python", "jobs/tune.py", "--config", str(path)], runtime_env=env_file, timeout=540
    )
    logs = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in logs, logs[-6000:] + ray_head.state()
    assert "best trial:" in logs and "lora.rank" in logs  # the summary table in the job's logs

    api = "/api/2.0/mlflow"
    experiment_id = mlflow_server.get(f"{api}/experiments/get-by-name", experiment_name="sweeps")[
        "experiment"
    ]["experiment_id"]

    def search(filter_string: str) -> list[dict]:
        body = {"experiment_ids": [experiment_id], "filter": filter_string, "max_results": 100}
        return mlflow_server.post(f"{api}/runs/search", body).get("runs", [])

    def as_dict(entries: list[dict]) -> dict:
        return {e["key"]: e["value"] for e in entries}

    (parent,) = search("tags.`svdray.role` = 'sweep'")
    parent_id = parent["info"]["run_id"]
    assert parent["info"]["status"] == "FINISHED"
    children = search(f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert len(children) == 3

    statuses = {}
    finished_objectives = {}
    for child in children:
        run_id = child["info"]["run_id"]
        params, tags = as_dict(child["data"]["params"]), as_dict(child["data"]["tags"])
        metrics = as_dict(child["data"].get("metrics", []))
        assert params["lora.rank"] in {"2", "4"} and 1e-4 <= float(params["optim.lr"]) <= 1e-1
        status = tags["svdray.trial_status"]
        statuses[run_id] = status
        steps = sorted(
            int(m["step"])
            for m in mlflow_server.get(f"{api}/metrics/get-history", run_id=run_id, metric_key="train/loss")[
                "metrics"
            ]
        )
        if status == "finished":
            assert child["info"]["status"] == "FINISHED" and steps == [1, 2, 3, 4, 5, 6]
            finished_objectives[run_id] = metrics["objective"]
        else:
            # ASHA decides at its rungs (steps 2 and 4, the reports); the stop reaches the
            # worker asynchronously, so MLflow may hold a step or two more than the last report.
            assert status == "stopped_early" and child["info"]["status"] == "KILLED"
            assert steps[:2] == [1, 2]
    assert "stopped_early" in statuses.values() and "finished" in statuses.values()

    # Searching runs by a param: params are named by their config keys. The sweep's own run does
    # not log the searched keys, so such a search finds trials only.
    for rank in ("2", "4"):
        found = {r["info"]["run_id"] for r in search(f"params.`lora.rank` = '{rank}'")}
        assert found == {
            c["info"]["run_id"] for c in children if as_dict(c["data"]["params"])["lora.rank"] == rank
        }

    # The best finished trial's LoRA and config on the parent, its plot and summary beside them.
    best_id = min(finished_objectives, key=finished_objectives.get)
    assert as_dict(parent["data"]["tags"])["svdray.best_run_id"] == best_id
    listing = {f["path"] for f in mlflow_server.get(f"{api}/artifacts/list", run_id=parent_id)["files"]}
    assert {"best", "summary.csv", "objective_vs_optim.lr.png", "config.yaml"} <= listing
    lora = {
        f["path"]
        for f in mlflow_server.get(f"{api}/artifacts/list", run_id=parent_id, path="best/lora")["files"]
    }
    assert lora == {"best/lora/adapter_config.json", "best/lora/adapter_model.safetensors"}
    adapter = json.loads(
        mlflow_server.read("/get-artifact", path="best/lora/adapter_config.json", run_uuid=parent_id)
    )
    best_child = next(c for c in children if c["info"]["run_id"] == best_id)
    assert str(adapter["r"]) == as_dict(best_child["data"]["params"])["lora.rank"]

    # ... registered as a model version whose source is that folder.
    model = mlflow_server.get(f"{api}/registered-models/get", name=model_name)["registered_model"]
    (version,) = model["latest_versions"]
    assert version["run_id"] == parent_id and version["source"] == f"runs:/{parent_id}/best/lora"
    assert as_dict(version["tags"])["svdray.child_run_id"] == best_id
    assert as_dict(parent["data"]["tags"])["svdray.model_version"] == version["version"]

    # The summary table lists every trial with its status.
    table = mlflow_server.read("/get-artifact", path="summary.csv", run_uuid=parent_id).decode()
    assert len(table.strip().splitlines()) == 4
    assert sorted(re.findall(r"finished|stopped_early", table)) == sorted(statuses.values())

    # What the UI served is the store `svdray ui` was given.
    from mlflow.tracking import MlflowClient

    assert MlflowClient(f"sqlite:///{db}").get_run(parent_id).data.tags["svdray.role"] == "sweep"
