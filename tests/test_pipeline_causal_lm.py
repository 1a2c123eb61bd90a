"""The pipeline on a causal LM (profiles/tiny-causal-lm.yaml on a random 2-layer Llama): one Prefect flow run
and one ``dvc repro`` fine-tune GLUE tasks as generation, diagnose, condition, merge and evaluate end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import _deep_update

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "profiles" / "tiny-causal-lm.yaml"
SHAPE = {"merge": {"alpha_grid": [0.5, 1.0], "methods": [{"name": "task_arithmetic", "alpha": "search"},
                                                         {"name": "emr"}]},
         "conditioning": {"steps": 2}}


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory) -> str:
    from distac.models.causal_lm import create_random_causal_lm

    return create_random_causal_lm(str(tmp_path_factory.mktemp("causal-lm") / "llama"))


def write_params(directory: Path, causal_lm: str, root: str) -> Path:
    params = yaml.safe_load(PROFILE.read_text())
    params["model"]["name_or_path"] = causal_lm
    params["storage"]["root"] = root
    params["mlflow"]["tracking_uri"] = f"sqlite:///{directory / 'mlflow.db'}"
    _deep_update(params, SHAPE)
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_the_flow_runs_a_causal_lm_end_to_end(tmp_path, causal_lm):
    from flows.pipeline import distac_pipeline

    path = write_params(tmp_path, causal_lm, str(tmp_path / "storage"))
    result = distac_pipeline(str(path))
    assert all(not s["skipped"] for s in result["stages"])
    storage = tmp_path / "storage"
    diagnosis = json.loads((storage / "diagnose" / "diagnosis.json").read_text())
    flags = {t["name"]: t["flags"] for t in diagnosis["tasks"]}
    assert "norm_disparity" in flags["sst2"] and "norm_disparity" not in flags["cola"]  # sst2's 10x lr
    # a random LM's next token is spread over the 30k-token vocabulary, not over the 2 candidates: low confidence
    assert all(t["mean_max_prob"] < 0.5 and "low_confidence" in t["flags"] for t in diagnosis["tasks"])
    assert diagnosis["conditioned_tasks"] == ["cola", "sst2"]
    evaluation = json.loads((storage / "evaluate" / "task_arithmetic" / "distac" / "evaluation.json").read_text())
    assert set(evaluation["tasks"]) == {"cola", "sst2"}
    assert all(row["perplexity"] > 1 for row in evaluation["tasks"].values())
    meta = json.loads((storage / "finetune" / "cola" / "model" / "meta.json").read_text())
    assert meta["adapter"]["kind"] == "hf_causal_lm" and meta["class_names"] == ["unacceptable", "acceptable"]
    assert "| task_arithmetic | distac |" in (storage / "report" / "results.md").read_text()


def test_dvc_repro_runs_a_causal_lm_profile(tmp_path, causal_lm):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(ROOT / "distac", repo / "distac", ignore=shutil.ignore_patterns("__pycache__"))
    write_params(repo, causal_lm, "runs")
    binaries = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{binaries}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "HF_HUB_OFFLINE": "1"}
    for command in (["git", "init", "-q"], [str(binaries / "dvc"), "init", "-q"], [str(binaries / "dvc"), "repro"]):
        done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    assert "Running stage 'merge-distac@0'" in done.stdout
    metrics = json.loads((repo / "runs" / "report" / "metrics.json").read_text())
    assert metrics
