"""The objective a trial reports to Tune, from inside its TorchTrainer.

Its own module, importing only Ray Tune: the callback is unpickled in the trial's Ray Train
controller, which would otherwise import the sweep driver's modules (MLflow, the trainer, torch)."""

from __future__ import annotations

import collections
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

OBJECTIVE = "objective"


class ObjectiveReport(TuneReportCallback):
    """Tune's bridge from Ray Train, reporting `objective` too: the mean of the last `window`
    values of the loop metric `metric`.

    Tune needs the scheduler's metric in every result, and a metric like `val_loss` comes only
    every few steps: reports before its first value are held back, and after it the latest
    objective rides along with every report (so every checkpoint carries it).
    """

    def __init__(self, metric: str, window: int):
        super().__init__()
        self.metric = metric
        self.values: collections.deque[float] = collections.deque(maxlen=window)

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        latest = metrics[0]
        if self.metric in latest:
            self.values.append(float(latest[self.metric]))
        if not self.values:
            return
        objective = sum(self.values) / len(self.values)
        super().after_report(run_context, [{**latest, OBJECTIVE: objective}, *metrics[1:]], checkpoint)
