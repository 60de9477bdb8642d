"""Training stack: Hydra entry point, data, DeepSpeed engine, checkpoints, evaluation."""
