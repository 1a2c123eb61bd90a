"""Prefect tasks: one per stage of ``distac.pipeline.table``, each a thin wrapper that runs the stage and
logs it to MLflow."""

from tasks.stage_tasks import TASKS, execute, submit
from tasks.tracking import Tracking, setup_experiment

__all__ = ["TASKS", "execute", "submit", "Tracking", "setup_experiment"]
