"""Classifier folders (the search's oracle and the evaluation-only judge): ``members`` (networks, the safetensors +
JSON format, loading an ensemble), ``training`` (scripts/train_classifiers.py's work)."""
