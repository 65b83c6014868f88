"""The training engine: strategy, precision, checkpoints and the training loop."""
