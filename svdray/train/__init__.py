"""Training: the per-worker loop, checkpoints, validation, optimizer, failures and the TorchTrainer driver."""
