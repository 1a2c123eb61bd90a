"""Prefect tasks: thin wrappers over ``distac.stages`` that log to MLflow.

Each task takes the params as a plain dict (it pickles to Dask workers and validates again there) and a
``Tracking``. Caching: the cache key is the stage's fingerprint, offered only while the stage's finished
manifest is present in storage, so Prefect never reports "cached" for outputs that were deleted.
Retries: transient storage errors (OSError, botocore) are retried after a delay; user errors
(``DistacError``, validation) fail at once.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import yaml
from prefect import task

from distac import stages
from distac.config import PipelineParams
from distac.errors import DistacError
from tasks.tracking import StageRun, Tracking

RETRIES = 2
RETRY_DELAY_SECONDS = 5
LOG_EVERY = 10


def params_of(params: dict[str, Any] | PipelineParams) -> PipelineParams:
    return params if isinstance(params, PipelineParams) else PipelineParams.model_validate(params)


def is_transient(exc: BaseException) -> bool:
    """Storage hiccups worth retrying; never a user error."""
    if isinstance(exc, DistacError):
        return False
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (OSError, TimeoutError)):
        return True
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return False
    return isinstance(exc, (BotoCoreError, ClientError))


def retry_on_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the failure is a transient storage error."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


def _where(inputs: dict[str, Any]) -> dict[str, Any]:
    where = {}
    if inputs.get("task_name") is not None:
        where["task"] = inputs["task_name"]
    if inputs.get("method") is not None:
        where["method"] = inputs["method"]
        where["conditioned"] = bool(inputs.get("conditioned", False))
    return where


def stage_cache_key(stage: str) -> Callable[[Any, dict[str, Any]], str | None]:
    """A ``cache_key_fn``: the stage fingerprint (with the storage root) while its manifest matches."""
    def cache_key(context, inputs: dict[str, Any]) -> str | None:
        params = params_of(inputs["params"])
        where = _where(inputs)
        if not stages.is_done(params, stage, **where):
            return None
        return f"distac-{stage}-{stages.stage_fingerprint(params, stage, **where)}-{params.storage.root}"
    return cache_key


def stage_task(stage: str, run_name: str):
    """The decorator every stage task shares."""
    return task(name=stage, task_run_name=run_name, cache_key_fn=stage_cache_key(stage), persist_result=True,
                retries=RETRIES, retry_delay_seconds=RETRY_DELAY_SECONDS, retry_condition_fn=retry_on_transient)


def _tracked(stage: str, params: PipelineParams, tracking: Tracking | None, run_name: str,
             logged_params: dict[str, Any], call: Callable[[StageRun], stages.StageResult],
             artifacts: list[str] = ()) -> dict[str, Any]:
    """Run a stage with a lazily created MLflow run; log its summary metrics and artifacts if it did work."""
    run = StageRun(tracking, run_name, {"distac.stage": stage}, logged_params)
    try:
        result = call(run)
    except BaseException:
        run.finish(failed=True)
        raise
    if not result.skipped:
        run.log_metrics({**result.summary, "seconds": result.seconds})
        run.set_tag("distac.fingerprint", result.fingerprint)
        run.log_artifacts(result.uri, list(artifacts))
    run.finish()
    return {"stage": stage, "key": result.key, "uri": result.uri, "skipped": result.skipped,
            "fingerprint": result.fingerprint, "summary": result.summary, "seconds": result.seconds}


@stage_task("pretrained", "pretrained")
def pretrained(params: dict[str, Any], tracking: Tracking | None = None) -> dict[str, Any]:
    p = params_of(params)
    return _tracked("pretrained", p, tracking, "pretrained", {"model": p.model.model_dump(mode="json")},
                    lambda run: stages.pretrained(p))


def run_stage_in_child_process(params: PipelineParams, *stage_args: str) -> None:
    """Run one stage as ``distac stage ...`` in a child process, exactly as ``dvc repro`` does.

    Fine-tuning draws its dropout masks from torch's process-wide RNG: two fine-tunes sharing a process (the
    thread runner) would perturb each other's masks, so results would depend on scheduling and differ from
    DVC's. A child process gives each its own RNG, and the flow the same results as ``dvc repro``.
    """
    with tempfile.TemporaryDirectory(prefix="distac-stage-") as tmp:
        params_path = os.path.join(tmp, "params.yaml")
        with open(params_path, "w", encoding="utf-8") as handle:
            yaml.safe_dump(params.model_dump(mode="json"), handle, sort_keys=False)
        command = [sys.executable, "-m", "distac", "stage", *stage_args, "--params", params_path, "--no-progress",
                   "--exit-with-parent", str(os.getpid())]  # a killed run leaves no stage running on
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode == 2:  # the CLI's exit code for a user error (bad data, bad config)
        raise DistacError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "stage failed")
    if done.returncode:
        raise RuntimeError(f"distac stage {' '.join(stage_args)} failed (exit {done.returncode}):\n"
                           f"{done.stderr[-4000:]}")


def _finetune_isolated(p: PipelineParams, task_name: str, run: StageRun) -> stages.StageResult:
    """Fine-tune in a child process, then replay its loss curve into the MLflow run."""
    done = stages.is_done(p, "finetune", task=task_name) or stages.reuse_finished(p, "finetune", task=task_name)
    if not done:
        started = time.monotonic()
        run_stage_in_child_process(p, "finetune", "--task", task_name)
        on_step = run.metrics_callback("train/", LOG_EVERY, f"finetune/{task_name}")
        for entry in stages.read_json(stages.stage_dir(p, "finetune", task=task_name), "history.json"):
            on_step(entry["step"], {k: v for k, v in entry.items() if k != "step"})
        result = stages.finetune(p, task_name, progress=False)  # up to date now: reads the summary back
        return dataclasses.replace(result, skipped=False, seconds=time.monotonic() - started)
    return stages.finetune(p, task_name, progress=False)


@stage_task("finetune", "finetune-{task_name}")
def finetune(params: dict[str, Any], task_name: str, tracking: Tracking | None = None) -> dict[str, Any]:
    p = params_of(params)
    logged = {"task": task_name, "recipe": p.recipe(task_name).model_dump(mode="json"),
              "data": p.data.model_dump(mode="json")}
    return _tracked("finetune", p, tracking, f"finetune-{task_name}", logged,
                    lambda run: _finetune_isolated(p, task_name, run),
                    artifacts=["metrics.json", "history.json"])


@stage_task("extract", "extract-{task_name}")
def extract_vector(params: dict[str, Any], task_name: str, tracking: Tracking | None = None) -> dict[str, Any]:
    p = params_of(params)
    return _tracked("extract", p, tracking, f"extract-{task_name}", {"task": task_name},
                    lambda run: stages.extract(p, task_name), artifacts=["stats.json"])


@stage_task("diagnose", "diagnose")
def diagnose(params: dict[str, Any], tracking: Tracking | None = None) -> dict[str, Any]:
    p = params_of(params)
    logged = {"diagnosis": p.diagnosis.model_dump(mode="json"), "conditioning.tasks": str(p.conditioning.tasks)}
    return _tracked("diagnose", p, tracking, "diagnose", logged, lambda run: stages.diagnose(p),
                    artifacts=["diagnosis.md", "diagnosis.json"])


@stage_task("condition", "condition-{task_name}")
def condition(params: dict[str, Any], task_name: str, tracking: Tracking | None = None) -> dict[str, Any]:
    p = params_of(params)
    logged = {"task": task_name, "conditioning": p.conditioning.model_dump(mode="json")}
    return _tracked("condition", p, tracking, f"condition-{task_name}", logged,
                    lambda run: stages.condition(p, task_name, progress=False, on_log=run.metrics_callback(
                        "distac/", LOG_EVERY, f"condition/{task_name}")),
                    artifacts=["summary.json", "history.json"])


def _merge_and_log(p: PipelineParams, method: str, conditioned: bool, run: StageRun) -> stages.StageResult:
    result = stages.merge(p, method, conditioned, progress=False)
    if not result.skipped and run.tracking is not None:
        info = stages.read_json(result.uri, "merge.json")
        search = info.get("alpha_search") or {}
        for step, (alpha, score) in enumerate(sorted((float(a), s) for a, s in search.get("scores", {}).items())):
            run.log_metrics({"alpha": alpha, "validation_mean_accuracy": score}, step=step, prefix="alpha_search/")
    return result


@stage_task("merge", "merge-{method}-conditioned={conditioned}")
def merge(params: dict[str, Any], method: str, conditioned: bool = False,
          tracking: Tracking | None = None) -> dict[str, Any]:
    p = params_of(params)
    name = f"merge-{method}-{stages.variant_name(conditioned)}"
    logged = {"method": p.merge.method(method).model_dump(mode="json"), "conditioned": conditioned,
              "alpha_grid": p.merge.alpha_grid}
    return _tracked("merge", p, tracking, name, logged, lambda run: _merge_and_log(p, method, conditioned, run),
                    artifacts=["merge.json"])


@stage_task("evaluate", "evaluate-{method}-conditioned={conditioned}")
def evaluate(params: dict[str, Any], method: str, conditioned: bool = False,
             tracking: Tracking | None = None) -> dict[str, Any]:
    p = params_of(params)
    name = f"evaluate-{method}-{stages.variant_name(conditioned)}"
    return _tracked("evaluate", p, tracking, name, {"method": method, "conditioned": conditioned},
                    lambda run: stages.evaluate(p, method, conditioned), artifacts=["evaluation.json"])


@stage_task("report", "report")
def report(params: dict[str, Any], tracking: Tracking | None = None) -> dict[str, Any]:
    p = params_of(params)
    return _tracked("report", p, tracking, "report", {"tasks": p.task_names, "methods": p.method_names},
                    lambda run: stages.report(p), artifacts=REPORT_FILES)


REPORT_FILES = ["results.md", "results.csv", "results.png", "metrics.json"]
