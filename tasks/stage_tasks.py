"""Prefect tasks: one per stage of the table (``distac.pipeline.table``), each running a stage instance
with ``distac.pipeline.run_stage`` and logging it to MLflow.

A task takes the params as a plain dict (it travels to Dask workers and is validated again there). Stages
marked ``isolated`` run as ``distac stage … --events`` in a child process (as ``dvc repro`` runs them) that
streams its per-step metrics as JSON lines; the parent relays them to MLflow and the console while the
child runs. Children die with their runner (``distac.pipeline.process.exit_with_parent``).

No Prefect caching or result persistence: a stage skips itself from its manifest, and nothing is pickled
and read back. Retries: transient storage errors only (connection resets, timeouts, 5xx); user errors,
read-only or full disks, permission errors and 4xx answers fail at once.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE

from distac.cli.stage import EVENT_PREFIX
from distac.errors import DistacError
from distac.pipeline import PipelineParams, StageRef, is_done, run_stage
from distac.pipeline.process import stage_tmp_dir
from distac.pipeline.runner import StageResult
from distac.pipeline.table import STAGES, Stage, param_values
from tasks.tracking import StageRun, Tracking

log = logging.getLogger("distac.tasks")  # under "distac", so Prefect forwards it

RETRIES = 2
RETRY_DELAY_SECONDS = 5
LOG_EVERY = 10
PERMANENT_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.ENOENT,
                    errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG}
ARTIFACT_SUFFIXES = (".json", ".md", ".csv", ".png")


def params_of(params: dict[str, Any] | PipelineParams) -> PipelineParams:
    return params if isinstance(params, PipelineParams) else PipelineParams.model_validate(params)


def is_transient(exc: BaseException) -> bool:
    """Storage hiccups worth retrying: never a user error, a read-only or full disk, a permission error or a
    4xx answer (except 408 timeout and 429 throttling)."""
    if isinstance(exc, DistacError):
        return False
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return False
    if isinstance(exc, OSError) and exc.errno in PERMANENT_ERRNOS:
        return False
    if isinstance(exc, (OSError, TimeoutError)):
        return True
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return False
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 500
        return not 400 <= int(status) < 500 or int(status) in (408, 429)
    return isinstance(exc, BotoCoreError)


def retry_on_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the failure is a transient storage error."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


# --------------------------------------------------------------------------------------------- children


_CHILDREN: set[subprocess.Popen] = set()
_CHILDREN_LOCK = threading.Lock()


def stop_children() -> None:
    """Kill every stage child this process started (an interrupted run)."""
    with _CHILDREN_LOCK:
        children = list(_CHILDREN)
    for child in children:
        if child.poll() is None:
            child.kill()


def run_in_child(params: PipelineParams, made: StageRef,
                 on_metrics: Callable[[int, dict[str, float]], None] | None = None) -> StageResult:
    """Run one stage instance as ``distac stage … --events`` in a child process; relay its per-step metrics
    to ``on_metrics`` and its log records to this process' loggers as they arrive. A failure raises DistacError
    (exit 2: a user error) or RuntimeError."""
    args = [made.stage, *(["--task", made.task] if made.task else []),
            *(["--method", made.method, "--variant", made.variant] if made.method else [])]
    tmp = stage_tmp_dir()
    try:
        params_path = os.path.join(tmp, "params.yaml")
        with open(params_path, "w", encoding="utf-8") as handle:
            yaml.safe_dump(params.model_dump(mode="json"), handle, sort_keys=False)
        command = [sys.executable, "-m", "distac", "stage", *args, "--params", params_path, "--no-progress",
                   "--events", "--exit-with-parent", str(os.getpid())]
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        with _CHILDREN_LOCK:
            _CHILDREN.add(child)
        try:
            errors: list[str] = []
            reader = threading.Thread(target=lambda: errors.extend(child.stderr), daemon=True)
            reader.start()
            result = None
            for line in child.stdout:
                if not line.startswith(EVENT_PREFIX):
                    continue
                event = json.loads(line[len(EVENT_PREFIX):])
                if "result" in event:
                    result = event["result"]
                elif "log" in event:  # the child's log record, under the child's logger name
                    record = event["log"]
                    logging.getLogger(record["name"]).log(record["level"], "%s", record["message"])
                elif on_metrics is not None:
                    on_metrics(event["step"], event["metrics"])
            code = child.wait()
            reader.join()
        finally:
            with _CHILDREN_LOCK:
                _CHILDREN.discard(child)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stderr = "".join(errors).strip()
    if code == 2:  # the CLI's exit code for a user error (bad data, bad config, stale upstream)
        raise DistacError(stderr.splitlines()[-1] if stderr else f"{made.key} failed")
    if code or result is None:
        raise RuntimeError(f"distac stage {' '.join(args)} failed (exit {code}):\n{stderr[-4000:]}")
    return StageResult(**result)


# --------------------------------------------------------------------------------------------- tasks


def execute(params: dict[str, Any] | PipelineParams, made: StageRef, tracking: Tracking | None = None) -> dict[str, Any]:
    """Run one instance with its MLflow run: per-step metrics while it runs, then its summary and its small
    output files (only if it did work)."""
    p = params_of(params)
    record = made.record
    run = StageRun(tracking, made.key.replace("/", "-"), {"distac.stage": made.stage},
                   {"stage": made.key, **param_values(p, made)})
    on_metrics = run.metrics_callback(record.metrics, LOG_EVERY, made.key) if record.metrics else None
    try:
        if record.isolated and not is_done(p, made):
            result = run_in_child(p, made, on_metrics)
        else:
            result = run_stage(p, made, on_metrics=on_metrics)
    except BaseException:
        run.finish(failed=True)
        raise
    if not result.skipped:
        run.log_metrics({**result.summary, "seconds": result.seconds})
        run.set_tag("distac.fingerprint", result.fingerprint)
        run.log_artifacts(result.uri, [name for name in record.outputs if name.endswith(ARTIFACT_SUFFIXES)])
    run.finish()
    return result.to_dict()


def _task_for(record: Stage):
    def run(params: dict[str, Any], stage: str, task: str | None = None, method: str | None = None,
            variant: str | None = None, tracking: Tracking | None = None) -> dict[str, Any]:
        return execute(params, StageRef(stage, task, method, variant), tracking)

    run.__name__ = run.__qualname__ = record.name
    run.__doc__ = record.help
    return task(run, name=record.name, persist_result=False, cache_policy=NO_CACHE, retries=RETRIES,
                retry_delay_seconds=RETRY_DELAY_SECONDS, retry_condition_fn=retry_on_transient)


TASKS = {record.name: _task_for(record) for record in STAGES}
"""Stage name → its Prefect task; call with ``(params, stage, task, method, variant, tracking)``."""


def submit(made: StageRef, params: dict[str, Any], tracking: Tracking | None, wait_for: list[Any]):
    """Submit one instance's task, named by its key."""
    return TASKS[made.stage].with_options(task_run_name=made.key.replace("/", "-")).submit(
        params, made.stage, made.task, made.method, made.variant, tracking, wait_for=wait_for)


__all__ = ["TASKS", "execute", "submit", "is_transient", "retry_on_transient", "run_in_child", "stop_children"]
