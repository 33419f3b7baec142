"""Orchestration only: the Ray feature-extraction and evaluation jobs, the local Ray, the Prometheus
exporter."""
