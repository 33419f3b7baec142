"""Orchestration: the Ray feature-extraction job, launch helpers and metrics export."""
