"""Shard formats, data sources, vocabularies and streaming (local disk or s3://). Knows no models."""
