"""Ray Tune sweeps over any config keys, each trial a training run tracked as a child MLflow run."""
