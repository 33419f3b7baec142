"""Feature backbones for extraction (EfficientNet-Lite grids, transformers vision models)."""
