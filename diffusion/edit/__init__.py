"""Counterfactual editing: ``search`` (flip criterion, t_skip searches), ``editor`` (the batched engine: inversion,
attempts, searches), ``run`` (kandinsky_eval.py's dataset run: resume, shards, outputs), ``results`` (the CSV)."""
