"""Post-training tools: loading a trained run, evaluation of runs, explain, retrieve, plots."""
