"""The runtime: the training loop and step, the DeepSpeed engine, checkpoints, the distributed
environment and telemetry."""
