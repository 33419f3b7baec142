"""SCAN models, losses, the DeepSpeed engine and the sharded evaluator."""
