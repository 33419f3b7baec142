"""Evaluation: encoding a split once, scoring it in tiles, ranks and recalls over all ranks."""
