"""An error that would recur on a restart stops the run at once with its message and step; the
failures a restart cures (lost workers, a collective whose peer died) are still restarted within
`train.max_failures` (tests/integration/test_resume.py kills a worker for real and checks the restart)."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from svdray.config import load_config
from svdray.tracking import metric_history


def test_error_in_validation_stops_the_run_at_once(
    ray_cluster, write_config, one_clip_manifest, tmp_path
) -> None:
    """Validation at step 2 cannot write its videos (`<output_dir>/validation` is a file). With
    train.max_failures=2 Ray Train would restart from step 1's checkpoint and fail the same way
    twice more; the run stops after the first attempt with the error and its step instead."""
    from svdray.train.failures import TrainingFailed
    from svdray.train.trainer import run_training

    train = {"name": "fails", "max_steps": 3, "checkpoint_every": 1, "max_failures": 2}
    validate = {"manifest": str(one_clip_manifest), "every": 2, "num_videos": 1, "steps": 1}
    cfg = load_config(write_config(one_clip_manifest, train=train, validate=validate))
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "validation").write_text("not a folder")

    expected = r"on worker 0 after step 2: (FileExistsError|NotADirectoryError): .*validation"
    with pytest.raises(TrainingFailed, match=expected):
        run_training(cfg)

    uri = cfg.mlflow.tracking_uri
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("tests").experiment_id], filter_string="attributes.run_name = 'fails'"
    )
    assert run.info.status == "FAILED"
    assert "after step 2" in run.data.tags["svdray.failed"]
    # One attempt: step 1 logged once (step 2 logs after its validation), no restart resumed.
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [1]
    assert metric_history(uri, run.info.run_id, "resumed_from_step") == []
    assert sorted(p.name for p in (output_dir / "ray" / "fails").glob("step_*")) == ["step_00000001"]
