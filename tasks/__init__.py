"""Prefect tasks: one per pipeline stage, each a thin wrapper over ``distac.stages`` that logs to MLflow."""

from tasks.stage_tasks import (condition, diagnose, evaluate, extract_vector, finetune, merge, pretrained,
                               report)
from tasks.tracking import Tracking, setup_experiment

__all__ = ["pretrained", "finetune", "extract_vector", "diagnose", "condition", "merge", "evaluate", "report",
           "Tracking", "setup_experiment"]
