"""The stages, side by side: each a Ray Train worker group and what opens its MLflow runs. A stage imports
only from below it (config, data, models, tracking, runtime, progress), never another stage."""
