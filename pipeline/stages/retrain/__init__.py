"""The retrain stage: ``plan`` (steps, checks) -> ``worker`` (one step on a worker group, ``engines``) ->
``stage`` (every step of a genotype, its MLflow run and artifacts); ``baselines``: random genotypes."""
