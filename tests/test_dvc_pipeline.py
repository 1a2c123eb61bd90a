"""dvc.yaml on the tiny profile in a throw-away git + DVC repo: ``dvc repro`` runs every stage through
``distac stage``, ``dvc status`` is then clean, a params change re-runs only the stages downstream of it,
``dvc metrics/plots show`` read the report, and ``dvc push``/``dvc pull`` round-trip the outputs through an
S3 remote (moto on loopback). The tests share one repo and run in file order."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TASKS = [{"name": "cola"}, {"name": "mrpc", "finetune": {"lr": 1.0e-2}}]
MERGE = {"alpha_grid": [0.5, 1.0], "methods": [{"name": "task_arithmetic", "alpha": 0.5}]}


def dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory, make_tiny_params):
    repo = tmp_path_factory.mktemp("dvc-repo")
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(ROOT / "distac", repo / "distac", ignore=shutil.ignore_patterns("__pycache__"))
    make_tiny_params(repo, tasks=TASKS, merge=MERGE, storage={"root": "runs"})
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    return repo


@pytest.fixture(scope="module")
def first_repro(repo):
    return dvc(repo, "repro")


def test_repro_runs_every_stage_and_leaves_status_clean(repo, first_repro):
    assert stages_run(first_repro) == {
        "pretrained", "finetune@0", "finetune@1", "extract@0", "extract@1", "diagnose", "condition@0",
        "condition@1", "merge-as-is@0", "merge-distac@0", "evaluate-as-is@0", "evaluate-distac@0", "report"}
    assert "up to date" in dvc(repo, "status")
    assert (repo / "runs" / "merge" / "task_arithmetic" / "distac" / "_done.json").exists()


def test_metrics_and_plots_show_read_the_report(repo, first_repro):
    metrics = json.loads(dvc(repo, "metrics", "show", "--json"))
    values = next(iter(metrics.values()))["data"]["runs/report/metrics.json"]["data"]
    assert set(values) == {"individual/fine-tuned", "task_arithmetic/as-is", "task_arithmetic/distac"}
    assert values["individual/fine-tuned"]["mean_norm"] == 100.0
    plots = dvc(repo, "plots", "show", "--json")
    assert "runs/report/plot.csv" in plots and "runs/report/results.png" in plots


def test_the_prefect_flow_gives_the_same_results_as_dvc(repo, first_repro, make_tiny_params, tmp_path):
    from flows.pipeline import distac_pipeline

    flow_params = make_tiny_params(tmp_path, tasks=TASKS, merge=MERGE)
    distac_pipeline(flow_params)
    by_dvc = json.loads((repo / "runs" / "report" / "metrics.json").read_text())
    by_flow = json.loads((tmp_path / "storage" / "report" / "metrics.json").read_text())
    assert by_flow == by_dvc


def test_a_params_change_reruns_only_downstream_stages(repo, first_repro):
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["conditioning"]["steps"] = 2
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    downstream = {"condition@0", "condition@1", "merge-distac@0", "evaluate-distac@0", "report"}
    assert stages_run(dvc(repo, "repro")) == downstream
    assert "up to date" in dvc(repo, "status")


def test_push_and_pull_through_an_s3_remote(repo, first_repro, s3_bucket, s3_endpoint):
    dvc(repo, "remote", "add", "-f", "-d", "s3", f"{s3_bucket}/dvc-cache")
    dvc(repo, "remote", "modify", "s3", "endpointurl", s3_endpoint)
    table = (repo / "runs" / "report" / "results.md").read_bytes()
    vector = (repo / "runs" / "extract" / "cola" / "task_vector.safetensors").read_bytes()
    dvc(repo, "push")
    # The stages' cached outputs only: the .gitignore files DVC keeps beside them stay, and metrics/plots
    # are not cached (cache: false), so they are not pushed.
    for output in ("finetune/cola", "finetune/mrpc", "extract/cola", "extract/mrpc", "merge/task_arithmetic/as-is"):
        shutil.rmtree(repo / "runs" / output)
    (repo / "runs" / "report" / "results.md").unlink()
    shutil.rmtree(repo / ".dvc" / "cache")
    dvc(repo, "pull")
    assert (repo / "runs" / "report" / "results.md").read_bytes() == table
    assert (repo / "runs" / "extract" / "cola" / "task_vector.safetensors").read_bytes() == vector
    assert "up to date" in dvc(repo, "status")
