"""The pipeline on users' own models and data: two tasks of their own names, each a CSV dataset and a
checkpoint fine-tuned and saved with plain transformers (imported, not trained), one conditioned on the
other's inputs (surrogate data). The Prefect flow runs end to end and reports, for the imported models,
exactly the accuracy transformers computes on the same test files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from distac.errors import ConfigError
from distac.pipeline import load_params
from test_user_models import hf_models  # noqa: F401  (the module-scoped fixture: θ_pre, two checkpoints, CSVs)

COLUMNS = {"text": "review", "label": "stars"}


def transformers_accuracy(checkpoint: str, test_file: str) -> float:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    with open(test_file) as handle:
        rows = list(csv.DictReader(handle))
    with torch.no_grad():
        logits = model(**tokenizer([r["review"] for r in rows], padding=True, truncation=True,
                                   return_tensors="pt")).logits
    return sum(model.config.id2label[int(p)] == r["stars"] for p, r in zip(logits.argmax(-1), rows)) / len(rows)


def user_tasks(models: dict) -> list[dict]:
    return [{"name": "reviews", "finetuned": models["reviews"],
             "data": {"train": models["reviews_train"], "test": models["reviews_test"], **COLUMNS}},
            {"name": "polarity", "finetuned": models["polarity"], "unlabeled": {"from_task": "reviews"},
             "data": {"train": models["polarity_train"], "test": models["polarity_test"], **COLUMNS}}]


def test_flow_on_imported_checkpoints_and_csv_data(hf_models, make_tiny_params, tmp_path):  # noqa: F811
    from flows.pipeline import distac_pipeline

    model = {"kind": "hf_seqcls", "name_or_path": hf_models["pre"], "max_length": 32}
    merge = {"alpha_grid": [0.5, 1.0], "methods": [{"name": "task_arithmetic", "alpha": "search"}]}
    path = make_tiny_params(tmp_path, model=model, tasks=user_tasks(hf_models), merge=merge,
                            conditioning={"tasks": ["reviews", "polarity"]}, data={"max_train": None, "max_eval": None})
    params = load_params(path)
    result = distac_pipeline(path)
    root = Path(params.storage.root)
    rows = list(csv.DictReader((root / "report" / "results.csv").open()))
    assert rows[0]["method"] == "individual" and {"reviews_abs", "polarity_abs"} <= set(rows[0])
    for task in ("reviews", "polarity"):  # the imported models' accuracy is transformers' own
        expected = transformers_accuracy(hf_models[task], hf_models[f"{task}_test"])
        assert float(rows[0][f"{task}_abs"]) == pytest.approx(100 * expected, abs=1e-4)
        recipe = json.loads((root / "finetune" / task / "model" / "meta.json").read_text())["extra"]["recipe"]
        assert recipe == {"imported": hf_models[task]}
    assert {(r["method"], r["variant"]) for r in rows[1:]} == {("task_arithmetic", "as-is"),
                                                               ("task_arithmetic", "distac")}
    summary = json.loads((root / "condition" / "polarity" / "summary.json").read_text())
    assert summary["conditioned"] is True
    assert "report" in result


def test_params_name_what_is_wrong_with_a_users_task(hf_models, make_tiny_params, tmp_path):  # noqa: F811
    tasks = user_tasks(hf_models)
    tasks[1]["unlabeled"] = {"from_task": "nowhere"}
    with pytest.raises(ConfigError, match="polarity: unlabeled.from_task 'nowhere' is not among tasks"):
        load_params(make_tiny_params(tmp_path, model={"kind": "hf_seqcls", "name_or_path": hf_models["pre"]},
                                     tasks=tasks))
    with pytest.raises(ConfigError, match="unknown task 'reviews'.*give the task its `data:`"):
        load_params(make_tiny_params(tmp_path, tasks=[{"name": "reviews"}, {"name": "cola"}]))


def test_changing_unlabeled_data_reruns_distac_but_not_the_fine_tuning(hf_models, make_tiny_params,  # noqa: F811
                                                                       tmp_path):
    from distac.pipeline import ref
    from distac.pipeline.table import fingerprint

    model = {"kind": "hf_seqcls", "name_or_path": hf_models["pre"]}
    tasks = user_tasks(hf_models)
    before = load_params(make_tiny_params(tmp_path, name="a.yaml", model=model, tasks=tasks))
    tasks[1]["unlabeled"] = {"path": hf_models["reviews_test"], "text": "review"}
    after = load_params(make_tiny_params(tmp_path, name="b.yaml", model=model, tasks=tasks))
    for stage, changed in (("finetune", False), ("extract", False), ("condition", True)):
        prints = [fingerprint(p, ref(p, stage, task="polarity")) for p in (before, after)]
        assert (prints[0] != prints[1]) is changed, stage


def test_dvc_repro_on_imported_checkpoints_and_csv_data(hf_models, make_tiny_params, tmp_path):  # noqa: F811
    """The same users' params through ``dvc repro``: imported models, a surrogate-data DisTaC, the report
    with transformers' own accuracy, and a clean ``dvc status`` afterwards."""
    import shutil
    import subprocess

    from test_dvc_pipeline import ROOT, dvc, stages_run

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(ROOT / "distac", repo / "distac", ignore=shutil.ignore_patterns("__pycache__"))
    model = {"kind": "hf_seqcls", "name_or_path": hf_models["pre"], "max_length": 32}
    merge = {"alpha_grid": [0.5, 1.0], "methods": [{"name": "task_arithmetic", "alpha": 0.5}]}
    make_tiny_params(repo, model=model, tasks=user_tasks(hf_models), merge=merge, storage={"root": "runs"},
                     conditioning={"tasks": ["reviews", "polarity"]}, data={"max_train": None, "max_eval": None})
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    ran = stages_run(dvc(repo, "repro"))
    assert {"finetune@0", "finetune@1", "condition@0", "condition@1", "merge-distac@0", "report"} <= ran
    assert "up to date" in dvc(repo, "status")
    rows = list(csv.DictReader((repo / "runs" / "report" / "results.csv").open()))
    for task in ("reviews", "polarity"):
        expected = transformers_accuracy(hf_models[task], hf_models[f"{task}_test"])
        assert float(rows[0][f"{task}_abs"]) == pytest.approx(100 * expected, abs=1e-4)


def test_editing_a_users_data_file_or_model_reruns_what_read_it(hf_models, make_tiny_params,  # noqa: F811
                                                                 tmp_path):
    """Params name a task's files by path; the fingerprints follow their content."""
    import os
    import shutil

    from distac.pipeline import ref
    from distac.pipeline.table import fingerprint

    data = tmp_path / "reviews_train.csv"
    shutil.copy(hf_models["reviews_train"], data)
    tasks = user_tasks(hf_models)
    tasks[0]["data"]["train"] = str(data)
    path = make_tiny_params(tmp_path, model={"kind": "hf_seqcls", "name_or_path": hf_models["pre"]}, tasks=tasks)

    def prints() -> dict[str, str]:
        params = load_params(path)
        return {f"{stage}/{task}": fingerprint(params, ref(params, stage, task=task))
                for stage in ("finetune", "condition") for task in ("reviews", "polarity")}

    before = prints()
    os.utime(data, ns=(1, 1))  # touched, same content: nothing re-runs
    assert prints() == before
    data.write_text(data.read_text().replace("pos", "neg", 1))
    after = prints()
    assert after["finetune/reviews"] != before["finetune/reviews"]
    assert after["condition/reviews"] != before["condition/reviews"]
    assert after["finetune/polarity"] == before["finetune/polarity"]
