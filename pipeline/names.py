"""Names that cross stages, spelled once: the search metrics that selection, the report and the progress
board read, the prefix the sweep gives a trial's final metrics, retrain step names, and run tags."""

from __future__ import annotations

# The search metrics as dcpnas.search logs them (its constants of the same names; a test holds them equal).
# Spelled here too because this module is read by processes that never import torch (tracking, the UI).
PARENT_VAL_ACC, CHILD_VAL_ACC = "parent/val_acc", "child/val_acc"
ALPHA_ENTROPY, SKIP_NORMAL = "alpha_entropy", "skip_normal"

FINAL = "final/"  # a sweep trial summary's copy of the search run's last metrics: final/child/val_acc
SELECT_METRIC = CHILD_VAL_ACC  # selection: the 1-bit Child supernet's held-out accuracy at the end of its search

TEACHER_STEP = "teacher"  # the real-valued network a retrain trains first when retrain.teacher is "train"


def step_name(index: int) -> str:
    """The name of binarisation step ``index`` (0-based) of ``retrain.steps``: step1, step2, ..."""
    return f"step{index + 1}"


def step_metric(step: str, metric: str) -> str:
    """A retrain step's metric as logged: ``step2/top1``."""
    return f"{step}/{metric}"


# run tags
ORIGIN_TAG = "origin"  # on a retrain run: search | random | parent (where its genotype came from)
