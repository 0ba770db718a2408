"""The distributed edit engine: an edit stream as a Ray Train TorchTrainer with DeepSpeed ZeRO, its checkpoints,
ledger and run identity; editor meta-training."""
