"""The main flow: fine-tune → extract → diagnose → DisTaC → merge (as-is and conditioned) → evaluate → report.

``distac_pipeline(params_path)`` loads and validates the params, opens the MLflow parent run and runs the
stages in a sub-flow whose task runner the params choose (threads, or Dask: a LocalCluster or an existing
scheduler). Every stage skips itself when its outputs already match its inputs, so a re-run with nothing
changed finishes in seconds and an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import time
from typing import Any

from mlflow.entities import Param, RunStatus
from prefect import flow, get_run_logger, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

import tasks
from distac import stages
from distac.config import ExecutionParams, PipelineParams, load_params
from tasks.stage_tasks import REPORT_FILES
from tasks.tracking import Tracking, flatten, log_stage_artifacts, setup_experiment


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
                                          "env": {"PREFECT_API_URL": _current_api_url()}})


def _current_api_url() -> str:
    """The API this flow reports to (a temporary local server when none is configured), so the Dask
    worker processes report to the same one instead of each starting their own."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url)


@flow(name="distac-stages", log_prints=True)
def run_stages(params: dict[str, Any], tracking: Tracking | None = None) -> dict[str, Any]:
    """Submit every stage with its dependencies; returns the report and what each stage did."""
    names = params_of_dict(params).task_names
    methods = params_of_dict(params).method_names
    done: list[Any] = []

    _import_model_library(params_of_dict(params).model.kind)
    pretrained = tasks.pretrained.submit(params, tracking)
    finetuned = tasks.finetune.map(unmapped(params), names, unmapped(tracking), wait_for=[pretrained])
    vectors = [tasks.extract_vector.submit(params, name, tracking, wait_for=[ft])
               for name, ft in zip(names, finetuned)]
    diagnosis = tasks.diagnose.submit(params, tracking, wait_for=vectors)
    _raise_first_failure([pretrained, *finetuned, *vectors, diagnosis])
    selected = diagnosis.result()["summary"]["conditioned_tasks"]
    get_run_logger().info("DisTaC will condition: %s", ", ".join(selected) or "no task")
    conditioned = tasks.condition.map(unmapped(params), selected, unmapped(tracking))

    evaluations = []
    upstreams = {False: vectors, True: [*vectors, *conditioned]}
    for method in methods:
        for use_distac in stages.merged_variants(params_of_dict(params)):
            upstream = upstreams[use_distac]
            merged = tasks.merge.submit(params, method, use_distac, tracking, wait_for=upstream)
            evaluations.append(tasks.evaluate.submit(params, method, use_distac, tracking, wait_for=[merged]))
            done.append(merged)
    report = tasks.report.submit(params, tracking, wait_for=evaluations)

    futures = [pretrained, *finetuned, *vectors, diagnosis, *conditioned, *done, *evaluations, report]
    _raise_first_failure(futures)
    outcomes = [f.result() for f in futures]
    return {"report": outcomes[-1]["summary"], "stages": [
        {k: o[k] for k in ("key", "skipped", "seconds")} for o in outcomes]}


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


def params_of_dict(params: dict[str, Any]) -> PipelineParams:
    return PipelineParams.model_validate(params)


def _start_parent_run(params: PipelineParams, params_path: str) -> Tracking:
    base = setup_experiment(params.mlflow)
    client = base.client()
    run = client.create_run(base.experiment_id, run_name=f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}",
                            tags={"distac.params_path": str(params_path), "distac.storage": params.storage.root})
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
        log_stage_artifacts(client, tracking.parent_run_id, stages.stage_dir(params, "report"),
                            REPORT_FILES)
        log_stage_artifacts(client, tracking.parent_run_id, stages.stage_dir(params, "diagnose"), ["diagnosis.md"])
    status = RunStatus.FINISHED if result is not None else RunStatus.FAILED
    client.set_terminated(tracking.parent_run_id, status=RunStatus.to_string(status))


@flow(name="distac-pipeline", log_prints=True)
def distac_pipeline(params_path: str = "params.yaml") -> dict[str, Any]:
    """The whole pipeline for one params file; returns the results table and the per-stage outcomes."""
    params = load_params(params_path)
    logger = get_run_logger()
    tracking = _start_parent_run(params, params_path)
    logger.info("MLflow run %s in %s; storage %s", tracking.parent_run_id, tracking.tracking_uri,
                params.storage.root)
    result = None
    try:
        runner = build_task_runner(params.execution)
        result = run_stages.with_options(task_runner=runner)(params.model_dump(mode="json"), tracking)
        return {**result, "mlflow_run_id": tracking.parent_run_id, "tracking_uri": tracking.tracking_uri}
    finally:
        _finish_parent_run(tracking, params, result)
