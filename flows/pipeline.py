"""The main flow: every stage of ``distac.pipeline.table``, each instance submitted after the instances it
reads (fine-tune → extract → diagnose → DisTaC → merge as-is and with DisTaC → evaluate → report).

``distac_pipeline(params_path)`` loads and validates the params, takes the storage root's lock, cleans up
after an earlier run that was killed (its MLflow runs marked KILLED, its temporary directories removed),
opens the MLflow parent run and runs the stages in a sub-flow whose task runner the params choose
(threads, or Dask: a LocalCluster or an existing scheduler). Every stage skips itself when its outputs
already match its params, upstream stages and code, so a re-run with nothing changed finishes in seconds
and an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import os
import time
from typing import Any

from mlflow.entities import Param, RunStatus
from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

import tasks
from distac.pipeline import PipelineParams, Plan, RunStore, StageRef, load_params
from distac.pipeline.lock import TOKEN_ENV, RootLock
from distac.pipeline.params import ExecutionParams
from distac.pipeline.process import remove_stale_tmp_dirs
from distac.pipeline.store import redact
from tasks.tracking import (HOST_TAG, Tracking, closed, flatten, log_stage_artifacts, mark_stale_runs, opened,
                            setup_experiment, this_process)

REPORT_FILES = ["results.md", "results.csv", "results.png", "metrics.json"]


def build_task_runner(execution: ExecutionParams):
    """ThreadPoolTaskRunner for 'threads'; prefect-dask's DaskTaskRunner for 'dask'."""
    if execution.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=execution.max_workers)
    from prefect_dask import DaskTaskRunner

    dask = execution.dask
    if dask.address:
        return DaskTaskRunner(address=dask.address)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"n_workers": dask.n_workers, "threads_per_worker": dask.threads_per_worker,
                                          "processes": True, "dashboard_address": None,
                                          "env": {"PREFECT_API_URL": _current_api_url(),
                                                  **({TOKEN_ENV: os.environ[TOKEN_ENV]} if TOKEN_ENV in os.environ else {})}})


def _current_api_url() -> str:
    """The API this flow reports to (a temporary local server when none is configured), so the Dask
    worker processes report to the same one instead of each starting their own."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url)


@flow(name="distac-stages", log_prints=True)
def run_stages(params: dict[str, Any], tracking: Tracking | None = None) -> dict[str, Any]:
    """Submit every stage instance after the instances it reads; returns the report and what each did."""
    plan = Plan.of(PipelineParams.model_validate(params))
    _import_model_library(plan.params.model.kind)
    futures: dict[StageRef, Any] = {}
    for made in plan:
        futures[made] = tasks.submit(made, params, tracking, [futures[u] for u in plan.upstream[made]])
    ordered = list(futures.values())
    _raise_first_failure(ordered)
    outcomes = [future.result() for future in ordered]
    return {"report": futures[StageRef("report")].result()["summary"],
            "stages": [{k: o[k] for k in ("key", "skipped", "seconds", "reused_from")} for o in outcomes]}


def _import_model_library(kind: str) -> None:
    """Import the model library before tasks start in threads: transformers resolves its names lazily,
    and two threads doing that first import at once can fail with an ImportError."""
    if kind == "hf_text":
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401
    else:
        import open_clip  # noqa: F401


def _raise_first_failure(futures: list[Any]) -> None:
    """Wait for all; re-raise the exception of the first task that failed itself (tasks that never ran
    because an upstream failed are only 'not ready' and would hide the cause)."""
    for future in futures:
        future.wait()
    for future in futures:
        if future.state.is_failed():
            future.result()


def _start_parent_run(params: PipelineParams, params_path: str) -> Tracking:
    base = setup_experiment(params.mlflow)
    mark_stale_runs(base)
    client = base.client()
    run = client.create_run(base.experiment_id, run_name=f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}",
                            tags={"distac.params_path": str(params_path), "distac.storage": redact(params.storage.root),
                                  HOST_TAG: this_process()})
    opened(client, run.info.run_id)
    pairs = [Param(k, v) for k, v in flatten(params.model_dump(mode="json")).items()]
    for start in range(0, len(pairs), 100):
        client.log_batch(run.info.run_id, params=pairs[start:start + 100])
    client.log_artifact(run.info.run_id, str(params_path))
    return Tracking(base.tracking_uri, base.experiment_id, run.info.run_id)


def _finish_parent_run(tracking: Tracking, params: PipelineParams, result: dict[str, Any] | None) -> None:
    client = tracking.client()
    if result is not None:
        for name, values in result["report"]["metrics"].items():
            method, variant = name.split("/")
            for metric, value in values.items():
                client.log_metric(tracking.parent_run_id, f"{method}.{variant}.{metric}", value)
        ran = sum(not s["skipped"] for s in result["stages"])
        client.log_metric(tracking.parent_run_id, "stages_run", ran)
        client.log_metric(tracking.parent_run_id, "stages_skipped", len(result["stages"]) - ran)
        reused = sum(bool(s["reused_from"]) for s in result["stages"])
        client.log_metric(tracking.parent_run_id, "stages_reused", reused)
        store = RunStore.of(params)
        log_stage_artifacts(client, tracking.parent_run_id, store.dir(StageRef("report")), REPORT_FILES)
        log_stage_artifacts(client, tracking.parent_run_id, store.dir(StageRef("diagnose")), ["diagnosis.md"])
    status = RunStatus.FINISHED if result is not None else RunStatus.FAILED
    client.set_terminated(tracking.parent_run_id, status=RunStatus.to_string(status))
    closed(tracking.parent_run_id)


@flow(name="distac-pipeline", log_prints=True)
def distac_pipeline(params_path: str = "params.yaml") -> dict[str, Any]:
    """The whole pipeline for one params file; returns the results table and the per-stage outcomes."""
    params = load_params(params_path)
    logger = get_run_logger()
    with RootLock(params.storage.root) as lock:
        os.environ[TOKEN_ENV] = lock.token  # stage children run under this run's lock
        try:
            remove_stale_tmp_dirs()
            tracking = _start_parent_run(params, params_path)
            logger.info("MLflow run %s in %s; storage %s", tracking.parent_run_id, redact(tracking.tracking_uri),
                        redact(params.storage.root))
            result = None
            try:
                runner = build_task_runner(params.execution)
                result = run_stages.with_options(task_runner=runner)(params.model_dump(mode="json"), tracking)
                return {**result, "mlflow_run_id": tracking.parent_run_id, "tracking_uri": tracking.tracking_uri}
            finally:
                _finish_parent_run(tracking, params, result)
        finally:
            os.environ.pop(TOKEN_ENV, None)
