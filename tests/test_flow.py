"""The Prefect flow end to end on the tiny profile: real local Prefect server, real sqlite MLflow store,
real GLUE data (subsampled) and a tiny random BERT. One full run is shared by the module; later tests
re-run it (nothing to do), interrupt it with a bad parameter for a late stage and resume it, and run it on
a Dask LocalCluster of two worker processes."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from distac.pipeline import load_params
from distac.errors import ConfigError
from flows.pipeline import distac_pipeline

TASKS = ["cola", "mrpc"]
METHODS = [{"name": "task_arithmetic", "alpha": "search"}, {"name": "emr"}]
SHAPE = {"tasks": [{"name": "cola"}, {"name": "mrpc", "finetune": {"lr": 1.0e-2}}],
         "merge": {"alpha_grid": [0.5, 1.0], "methods": METHODS}}
ALL_STAGES = {"pretrained", *(f"{s}/{t}" for s in ("finetune", "extract", "condition") for t in TASKS), "diagnose",
              *(f"{s}/{m['name']}/{v}" for s in ("merge", "evaluate") for m in METHODS for v in ("as-is", "distac")),
              "report"}


def manifests(root: str) -> dict[str, dict]:
    """Stage key → its _done.json, for every finished stage under a storage root."""
    return {json.loads(p.read_text())["key"]: json.loads(p.read_text()) for p in Path(root).rglob("_done.json")}


def ran(result: dict) -> set[str]:
    return {s["key"] for s in result["stages"] if not s["skipped"]}


def leftovers(root: str) -> list[Path]:
    """Staging files or directories an atomic write would leave behind if it were interrupted."""
    return [p for p in Path(root).rglob("*") if p.name.startswith(".distac-tmp") or ".old-" in p.name]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, make_tiny_params):
    directory = tmp_path_factory.mktemp("flow")
    path = make_tiny_params(directory, **SHAPE)
    params = load_params(path)
    return path, params, distac_pipeline(path)


def test_first_run_does_every_stage_and_writes_the_report(first_run):
    _, params, result = first_run
    conditioned = json.loads((Path(params.storage.root) / "diagnose" / "diagnosis.json").read_text())["conditioned_tasks"]
    assert conditioned, "the 10x learning rate on mrpc must flag a norm disparity"
    assert ran(result) == ALL_STAGES
    report = Path(params.storage.root) / "report"
    rows = list(csv.DictReader((report / "results.csv").open()))
    assert [(r["method"], r["variant"]) for r in rows] == [
        ("individual", "fine-tuned"), ("task_arithmetic", "as-is"), ("task_arithmetic", "distac"),
        ("emr", "as-is"), ("emr", "distac")]
    assert all(float(rows[0][f"{t}_norm"]) == 100.0 for t in TASKS)
    assert (report / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| task_arithmetic | distac |" in result["report"]["table"]
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics) == {"individual/fine-tuned", "task_arithmetic/as-is", "task_arithmetic/distac",
                            "emr/as-is", "emr/distac"}
    assert leftovers(params.storage.root) == []


def test_mlflow_holds_parent_and_stage_runs_with_metrics_and_artifacts(first_run):
    _, params, result = first_run
    client = MlflowClient(tracking_uri=result["tracking_uri"])
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["merge.alpha_grid"] == "[0.5, 1.0]"
    assert parent.data.metrics["stages_skipped"] == 0
    assert "task_arithmetic.distac.mean_norm" in parent.data.metrics
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "results.md", "results.csv", "results.png", "metrics.json", "diagnosis.md", "params.yaml"}

    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = {run.info.run_name for run in children}
    assert {"pretrained", "finetune-cola", "finetune-mrpc", "diagnose", "merge-emr-distac", "report"} <= names
    assert all(run.info.status == "FINISHED" for run in children)
    finetune = next(run for run in children if run.info.run_name == "finetune-mrpc")
    loss = client.get_metric_history(finetune.info.run_id, "train/loss")
    assert [m.step for m in loss] == list(range(1, params.recipe("mrpc").steps + 1))
    assert finetune.data.params["tasks.mrpc.finetune.lr"] == "0.01"
    assert "test_accuracy" in finetune.data.metrics
    merge = next(run for run in children if run.info.run_name == "merge-task_arithmetic-as-is")
    search = client.get_metric_history(merge.info.run_id, "alpha_search/alpha")
    tried = [m.value for m in search]  # the grid, and any α the search followed past its edge
    assert {0.5, 1.0} <= set(tried) and tried == sorted(tried)
    report = next(run for run in children if run.info.run_name == "report")
    assert {a.path for a in client.list_artifacts(report.info.run_id)} == {
        "results.md", "results.csv", "results.png", "plot.csv", "metrics.json"}


def test_second_run_with_nothing_changed_skips_every_stage(first_run):
    path, params, result = first_run
    before = manifests(params.storage.root)
    again = distac_pipeline(path)
    assert ran(again) == set()
    assert manifests(params.storage.root) == before
    assert again["report"]["table"] == result["report"]["table"]
    client = MlflowClient(tracking_uri=again["tracking_uri"])
    parent = client.get_run(again["mlflow_run_id"])
    assert parent.data.metrics["stages_run"] == 0
    assert client.search_runs([parent.info.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent.info.run_id}'") == []


def test_distac_run_with_nothing_changed_answers_without_a_flow_run(first_run, capsys):
    from flows.run import run

    path, params, result = first_run
    client = MlflowClient(tracking_uri=result["tracking_uri"])
    experiment = client.get_run(result["mlflow_run_id"]).info.experiment_id
    runs_before = len(client.search_runs([experiment]))
    before = manifests(params.storage.root)
    assert run(path) == 0
    printed = capsys.readouterr().out
    assert result["report"]["table"] in printed and "nothing to run" in printed
    assert len(client.search_runs([experiment])) == runs_before
    assert manifests(params.storage.root) == before


def test_interrupted_run_resumes_without_redoing_finished_stages(first_run, make_tiny_params, tmp_path):
    _, params, _ = first_run
    root = tmp_path / "storage"
    shutil.copytree(params.storage.root, root)
    methods = [*METHODS, {"name": "ties", "hyperparams": {"k": 5.0}}]  # k > 1: rejected when ties merges
    changed = {"conditioning": {"steps": 2}, "merge": {"alpha_grid": [0.5, 1.0], "methods": methods}}
    broken = make_tiny_params(tmp_path, tasks=SHAPE["tasks"], **changed)
    before = manifests(root)

    with pytest.raises(ConfigError, match="k"):
        distac_pipeline(broken)
    interrupted = manifests(root)
    for key in ("pretrained", "finetune/cola", "finetune/mrpc", "extract/cola", "diagnose"):
        assert interrupted[key] == before[key], f"{key} was redone"
    assert not {k for k in interrupted if k.startswith("merge/ties")}
    assert all(interrupted[k]["fingerprint"] != before[k]["fingerprint"]
               for k in interrupted if k.startswith("condition/"))
    assert leftovers(root) == []

    methods[-1]["hyperparams"]["k"] = 0.2
    fixed = make_tiny_params(tmp_path, tasks=SHAPE["tasks"], **changed)
    resumed = distac_pipeline(fixed)
    unfinished = {key for key, m in manifests(root).items()
                  if key not in interrupted or interrupted[key]["fingerprint"] != m["fingerprint"]}
    assert ran(resumed) == unfinished
    assert {"merge/ties/as-is", "merge/ties/distac", "evaluate/ties/as-is", "report"} <= ran(resumed)
    assert not any(k.startswith(("condition/", "finetune/")) for k in ran(resumed))
    assert "| ties | distac |" in resumed["report"]["table"]


def test_stages_reused_from_another_root_and_one_variant_only(first_run, make_tiny_params, tmp_path):
    _, params, _ = first_run
    source = Path(params.storage.root)
    path = make_tiny_params(tmp_path, tasks=SHAPE["tasks"], storage={"reuse": [str(source)]},
                            conditioning={"steps": 2, "track_accuracy": True},
                            merge={**SHAPE["merge"], "variants": ["distac"]})
    result = distac_pipeline(path)
    root = Path(load_params(path).storage.root)
    selected = json.loads((root / "diagnose" / "diagnosis.json").read_text())["conditioned_tasks"]
    assert ran(result) == ({f"condition/{t}" for t in TASKS} | {"report"}
                           | {f"{s}/{m['name']}/distac" for s in ("merge", "evaluate") for m in METHODS})
    for task in TASKS:  # reused stages are copies of the source's, manifest included
        for file in (source / "finetune" / task).rglob("*"):
            if file.is_file():
                assert (root / "finetune" / task / file.relative_to(source / "finetune" / task)).read_bytes() \
                    == file.read_bytes()
    history = json.loads((root / "condition" / selected[0] / "history.json").read_text())
    assert [h["step"] for h in history] == [0, 1, 2]
    assert all(0.0 <= h["validation_accuracy"] <= 1.0 for h in history)
    assert "as-is" not in result["report"]["table"] and "| emr | distac |" in result["report"]["table"]
    assert leftovers(root) == []


def test_dask_runner_on_a_local_cluster_of_two_processes(first_run, make_tiny_params, tmp_path):
    _, params, _ = first_run
    shutil.copytree(params.storage.root, tmp_path / "storage")
    path = make_tiny_params(tmp_path, **SHAPE, conditioning={"steps": 2},
                            execution={"task_runner": "dask", "dask": {"n_workers": 2, "threads_per_worker": 1}})
    result = distac_pipeline(path)
    distac_side = {k for k in ran(result) if k.startswith("condition/") or k.endswith("/distac")}
    assert ran(result) == distac_side | {"report"}
    assert {"merge/task_arithmetic/distac", "evaluate/emr/distac"} <= distac_side
    client = MlflowClient(tracking_uri=result["tracking_uri"])
    children = client.search_runs([client.get_run(result["mlflow_run_id"]).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}'")
    hosts = {run.data.tags["distac.host"] for run in children}
    assert children and all(not h.endswith(f":{os.getpid()}") for h in hosts)


def test_scheduled_deployment_carries_the_cron_and_params():
    from flows.deploy import scheduled_deployment

    deployment = scheduled_deployment("params.yaml", cron="0 3 * * *")
    assert deployment.parameters == {"params_path": "params.yaml"}
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    assert deployment.entrypoint == "flows/pipeline.py:distac_pipeline"


def test_only_transient_storage_errors_are_retried():
    from botocore.exceptions import EndpointConnectionError
    from prefect.states import Failed

    from distac.errors import CheckpointError
    from tasks.stage_tasks import is_transient, retry_on_transient

    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert not is_transient(ConfigError("merge.methods.0: bad")) and not is_transient(CheckpointError("gone"))
    assert not is_transient(FileNotFoundError("missing input")) and not is_transient(ValueError())
    assert retry_on_transient(None, None, Failed(data=OSError("connection dropped")))
    assert not retry_on_transient(None, None, Failed(data=ConfigError("bad hyperparameter")))
