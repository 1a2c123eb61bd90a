"""params.yaml validation: every error names the offending field path; each stage's fingerprint changes
exactly when its inputs or parameters change."""

from __future__ import annotations

import copy

import pytest
import yaml

from distac.pipeline.table import all_instances, fingerprint
from distac.pipeline.params import ConfigError, load_params, parse_params
from helpers import MINIMAL_PARAMS as MINIMAL, params_error, params_with

@pytest.mark.parametrize("path", ["params.yaml", "profiles/tiny.yaml", "benchmarks/paper/original.yaml"])
def test_shipped_params_files_are_valid(path):
    params = load_params(path)
    assert len(params.task_names) >= 2 and params.method_names


def test_defaults_and_recipe_overrides():
    params = parse_params(params_with(
        finetune={"lr": 1e-4, "steps": 10},
        tasks=[{"name": "cola"}, {"name": "mrpc", "finetune": {"lr": 1e-3, "label_smoothing": 0.2}}]))
    assert params.recipe("cola").lr == 1e-4 and params.recipe("cola").label_smoothing == 0.0
    assert params.recipe("mrpc").lr == 1e-3 and params.recipe("mrpc").steps == 10
    assert params.recipe("mrpc").label_smoothing == 0.2
    assert params.storage.root == "runs" and params.mlflow.tracking_uri == "sqlite:///mlflow.db"
    assert params.conditioning.tasks == "auto" and params.conditioning.kappa.policy == "min"
    assert params.execution.task_runner == "threads"
    assert params.model.adapter_spec() == {"kind": "hf_text", "name_or_path": "minilm", "pooling": "mean",
                                           "max_length": 128}


@pytest.mark.parametrize("data, expected", [
    (params_with(model={"kind": "hf_text", "pooling": "max"}), "model.pooling"),
    (params_with(data={"max_train": 0}), "data.max_train"),
    (params_with(finetune={"learning_rate": 1e-3}), "finetune.learning_rate: Extra inputs are not permitted"),
    (params_with(tasks=[{"name": "cola"}, {"name": "mrpc", "finetune": {"lr": -1}}]), "tasks.1.finetune.lr"),
    (params_with(tasks=[{"name": "cola"}, {"name": "qqp"}]), "tasks.1: Value error, unknown task 'qqp'"),
    (params_with(tasks=[{"name": "cola"}]), "tasks: List should have at least 2 items"),
    (params_with(tasks=[{"name": "cola"}, {"name": "cola"}]), "task listed twice: cola"),
    (params_with(conditioning={"kappa": {"policy": "explicit"}}), "conditioning.kappa: Value error, policy "
                                                                   "'explicit' needs a value"),
    (params_with(conditioning={"kappa": {"policy": "min", "value": 2}}), "conditioning.kappa"),
    (params_with(conditioning={"tasks": ["rte"]}), "conditioning.tasks: rte not among tasks"),
    (params_with(conditioning={"student_temperature": 0}), "conditioning.student_temperature"),
    (params_with(merge={"methods": [{"name": "fisher"}]}), "merge.methods.0.name: Value error, unknown merge "
                                                            "method 'fisher'"),
    (params_with(merge={"methods": [{"name": "ties", "hyperparams": {"topk": 0.2}}]}),
     "merge.methods.0: Value error, ties has no hyperparameter topk"),
    (params_with(merge={"methods": [{"name": "emr", "alpha": 0.5}]}), "merge.methods.0: Value error, emr has no α"),
    (params_with(merge={"methods": [{"name": "ties", "alpha": "best"}]}), "merge.methods.0.alpha.constrained-float"),
    (params_with(merge={"methods": [{"name": "ties"}, {"name": "ties"}]}), "merge.methods: Value error, merge "
                                                                            "method listed twice: ties"),
    (params_with(merge={"methods": [{"name": "ties"}], "alpha_grid": [0.5, -1]}), "merge.alpha_grid.1"),
    (params_with(storage={"root": "  "}), "storage.root"),
    (params_with(merge={"methods": [{"name": "ties"}], "variants": ["distac", "distac"]}), "merge.variants"),
    (params_with(merge={"methods": [{"name": "ties"}], "variants": ["merged"]}), "merge.variants.0"),
    (params_with(execution={"task_runner": "ray"}), "execution.task_runner"),
    (params_with(execution={"dask": {"n_workers": 0}}), "execution.dask.n_workers"),
    (params_with(diagnosis={"min_scaled_confidence": 0.9, "target_confidence": 0.8}), "diagnosis: Value error"),
])
def test_errors_name_the_field_path(data, expected):
    assert expected in params_error(data)


def test_task_names_are_canonical_and_vision_tasks_allowed():
    params = parse_params(params_with(tasks=[{"name": "SST-2"}, {"name": "vision:MNIST"}],
                                       model={"kind": "open_clip", "name_or_path": "ViT-B-32",
                                              "options": {"pretrained": "/weights/vit-b-32.bin"}}))
    assert params.task_names == ["sst2", "vision:MNIST"]
    assert params.model.adapter_spec() == {"kind": "open_clip", "model_name": "ViT-B-32",
                                           "pretrained": "/weights/vit-b-32.bin"}


def test_missing_sections_and_bad_files(tmp_path):
    assert "merge: Field required" in params_error({"tasks": MINIMAL["tasks"]})
    assert "expected a mapping" in params_error([1, 2])
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump(params_with(data={"seed": "x"})))
    with pytest.raises(ConfigError, match=r"wrong.yaml is invalid:\n  data.seed"):
        load_params(wrong)


def _all_fingerprints(params) -> dict[str, str]:
    """Every stage instance's fingerprint by key, both variants whatever the params list."""
    both = params.model_copy(update={"merge": params.merge.model_copy(update={"variants": ["as-is", "distac"]})})
    return {made.key: fingerprint(params, made) for made in all_instances(both)}


def _changed(before: dict, **sections) -> set[str]:
    after = copy.deepcopy(before)
    for name, value in sections.items():
        after[name] = value
    old, new = _all_fingerprints(parse_params(before)), _all_fingerprints(parse_params(after))
    return {key for key in old if old[key] != new[key]}


def test_stage_fingerprints_change_exactly_downstream():
    base = params_with(merge={"methods": [{"name": "task_arithmetic", "alpha": "search"}, {"name": "emr"}]})
    assert _changed(base) == set()
    distac_side = {"condition/cola", "condition/mrpc", "merge/task_arithmetic/distac", "merge/emr/distac",
                   "evaluate/task_arithmetic/distac", "evaluate/emr/distac", "report"}
    assert _changed(base, conditioning={"steps": 7}) == distac_side
    one_task = _changed(base, tasks=[{"name": "cola"}, {"name": "mrpc", "finetune": {"lr": 1e-3}}])
    assert one_task == {"finetune/mrpc", "extract/mrpc", "diagnose", "condition/cola", "condition/mrpc",
                        *(f"{s}/{m}/{v}" for s in ("merge", "evaluate") for m in ("task_arithmetic", "emr")
                          for v in ("as-is", "distac")), "report"}
    grid = _changed(base, merge={"methods": base["merge"]["methods"], "alpha_grid": [0.5]})
    assert grid == {f"{s}/{m}/{v}" for s in ("merge", "evaluate") for m in ("task_arithmetic", "emr")
                    for v in ("as-is", "distac")} | {"report"}
    # Where outputs live and how the run executes do not change what they are.
    assert _changed(base, storage={"root": "s3://bucket/x", "reuse": ["runs"]},
                    execution={"task_runner": "dask"}) == set()
    only_as_is = _changed(base, merge={**base["merge"], "variants": ["as-is"]})
    assert only_as_is == {"report"}
