"""Shard formats, data sources, image decoding, vocabularies and streaming (local disk or s3://).
Knows no models."""
