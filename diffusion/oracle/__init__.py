"""Classifier folders (the search's oracle and the evaluation-only judge): ``nets`` (the networks), ``members``
(the safetensors + JSON format, loading an ensemble, class and independence checks), ``accuracy`` (the
test_metrics.json record with Wilson intervals), ``training`` (scripts/train_classifiers.py's work)."""
