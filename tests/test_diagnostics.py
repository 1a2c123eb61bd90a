"""Diagnostics flag planted norm disparity and low confidence, stay quiet on a clean set, and recommend."""

from __future__ import annotations

import json

import pytest
import torch

from distac.calibration import confidence_stats
from distac.diagnostics import (CONFIDENCE_THRESHOLD, SourceModel, diagnose, diagnose_models,
                                sharpening_temperature)
from distac.errors import ConfigError
from distac.vectors import TaskVector
from tiny_mlp import MLPAdapter, Point, collate, finetune, make_task, one_torch_thread

single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def _vectors(count: int = 3, seed: int = 0) -> dict[str, TaskVector]:
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": TaskVector({"w": torch.randn(20, 10, generator=g), "b": torch.randn(10, generator=g)})
            for i in range(count)}


def _confident_logits(seed: int, n: int = 200, classes: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 8.0 * torch.randn(n, classes, generator=g)


def test_clean_set_raises_no_flags():
    vectors = _vectors()
    logits = {name: _confident_logits(i) for i, name in enumerate(vectors)}
    diagnosis = diagnose(vectors, logits)
    assert diagnosis.flags == {}
    assert all(not r.condition and r.kappa == 1.0 and r.student_temperature == 1.0
               for r in diagnosis.recommendations)
    assert max(t.norm_ratio for t in diagnosis.tasks) < 1.3


def test_planted_norm_disparity_is_flagged_and_shrunk_to_the_threshold():
    vectors = _vectors()
    vectors["t1"] = vectors["t1"] * 5.0
    diagnosis = diagnose(vectors)
    assert diagnosis.flags == {"norm_disparity": ["t1"]}
    by_task = {r.task: r for r in diagnosis.recommendations}
    assert by_task["t1"].condition and by_task["t1"].student_temperature == 1.0  # norm only: no sharpening
    smallest = min(vectors["t0"].norm(), vectors["t2"].norm())
    assert by_task["t1"].kappa * vectors["t1"].norm() == pytest.approx(2.0 * smallest)  # threshold 2×
    assert by_task["t0"].kappa == by_task["t2"].kappa == 1.0 and not by_task["t0"].condition
    assert by_task["t1"].config(steps=10).kappa == by_task["t1"].kappa


def _scaled(vector: TaskVector, norm: float) -> TaskVector:
    return vector * (norm / vector.norm())


def test_a_vector_below_its_norm_threshold_is_never_shrunk():
    """Norms 1, 1.26, 1.5 and 6: only the 6× vector is flagged (threshold 2×) and only it is shrunk, to
    2× the smallest (the least shrink that clears its flag), not to the smallest."""
    vectors = _vectors(4)
    vectors = {name: _scaled(v, norm) for (name, v), norm in zip(vectors.items(), (1.0, 1.26, 1.5, 6.0))}
    diagnosis = diagnose(vectors)
    assert diagnosis.flags == {"norm_disparity": ["t3"]}
    kappas = {r.task: r.kappa for r in diagnosis.recommendations}
    assert kappas == {"t0": 1.0, "t1": 1.0, "t2": 1.0, "t3": pytest.approx(2.0 / 6.0)}
    assert [r.task for r in diagnosis.recommendations if r.condition] == ["t3"]
    assert "shrink to 2× it (2)" in diagnosis.recommendations[3].reasons[0]
    assert diagnose(vectors, norm_ratio_threshold=3.0).recommendations[3].kappa == pytest.approx(3.0 / 6.0)


def test_planted_low_confidence_is_flagged_with_a_sharpening_temperature():
    vectors = _vectors()
    logits = {name: _confident_logits(i) for i, name in enumerate(vectors)}
    logits["t2"] = logits["t2"] / 4.0  # an underconfident source
    diagnosis = diagnose(vectors, logits)
    assert diagnosis.flags == {"low_confidence": ["t2"]}
    task = diagnosis.tasks[2]
    assert task.scaled_confidence < CONFIDENCE_THRESHOLD
    recommendation = diagnosis.recommendations[2]
    assert recommendation.condition and recommendation.kappa == 1.0
    assert recommendation.student_temperature / recommendation.teacher_temperature > 1
    sharpened = confidence_stats(logits["t2"] * recommendation.student_temperature)
    assert sharpened.scaled_confidence == pytest.approx(diagnosis.thresholds["target_confidence"], abs=1e-6)


def _logits_with(max_prob: float, classes: int, n: int) -> torch.Tensor:
    """Logits whose softmax puts ``max_prob`` on class 0 and spreads the rest evenly."""
    rest = (1 - max_prob) / (classes - 1)
    return torch.log(torch.tensor([max_prob] + [rest] * (classes - 1))).repeat(n, 1)


def test_a_soft_but_calibrated_model_of_a_hard_task_is_not_flagged():
    """A plain cross-entropy 3-way model: scaled confidence 0.66 (< 0.7), but it is right as often as it
    is confident (accuracy 0.78 ≈ mean max-prob 0.773): the task is hard, the source is not soft."""
    n, max_prob = 100, 1 / 3 + 0.66 * 2 / 3
    logits = _logits_with(max_prob, 3, n)
    labels = torch.tensor([0] * 78 + [1] * 22)
    vectors = _vectors(2)
    diagnosis = diagnose(vectors, {"t0": logits}, {"t0": (logits, labels)})
    task = diagnosis.tasks[0]
    assert task.scaled_confidence == pytest.approx(0.66)
    assert task.accuracy == pytest.approx(0.78) and task.confidence_gap == pytest.approx(0.78 - max_prob, abs=1e-6)
    assert diagnosis.flags == {} and not diagnosis.recommendations[0].condition
    # the same model 20 points more accurate than confident is an underconfident (smoothed) source
    labels = torch.tensor([0] * 97 + [1] * 3)
    diagnosis = diagnose(vectors, {"t0": logits}, {"t0": (logits, labels)})
    assert diagnosis.flags == {"low_confidence": ["t0"]}
    assert diagnosis.recommendations[0].kappa == 1.0 and diagnosis.recommendations[0].student_temperature > 1
    assert "below its accuracy" in diagnosis.recommendations[0].reasons[0]
    # without labeled data the threshold alone decides
    assert diagnose(vectors, {"t0": logits}).flags == {"low_confidence": ["t0"]}


def test_sharpening_temperature_bounds():
    assert sharpening_temperature(10 * _confident_logits(0)) == 1.0  # already confident enough
    assert sharpening_temperature(torch.zeros(5, 3)) == 10.0  # uniform: capped


def test_cosines_and_serialization():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    diagnosis = diagnose({"a": {"w": e1}, "b": {"w": e2}},
                         validation={"a": (torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0]))})
    assert diagnosis.cosines[0][1] == pytest.approx(2 ** -0.5)
    confidence = torch.softmax(torch.tensor([2.0, 0.0]), 0)[0].item()  # both rows; one right, one wrong
    assert diagnosis.tasks[0].ece == pytest.approx(abs(0.5 - confidence))
    data = json.loads(json.dumps(diagnosis.to_dict()))
    assert data["cosines"]["a"]["b"] == pytest.approx(2 ** -0.5)
    markdown = diagnosis.to_markdown()
    assert "| a | 1 | 1.00 |" in markdown and "Pairwise cosines" in markdown


def test_bad_input():
    with pytest.raises(ConfigError, match="no task vector"):
        diagnose(_vectors(), {"nope": torch.zeros(2, 2)})
    with pytest.raises(ConfigError, match="norm_ratio_threshold"):
        diagnose(_vectors(), norm_ratio_threshold=0.5)
    with pytest.raises(ConfigError, match="underconfidence_margin"):
        diagnose(_vectors(), underconfidence_margin=-0.1)


def test_diagnose_models_on_real_fine_tuned_models():
    adapter = MLPAdapter()
    pretrained = adapter.pretrained_backbone_state()
    sources = []
    for i, smoothing in enumerate((0.0, 0.5)):  # label smoothing ε gives scaled confidence ≈ 1 − ε
        task = make_task(f"task{i}", seed=10 + i, n=1200)  # enough data to generalize: accuracy ≈ 0.74
        model = finetune(adapter, task, label_smoothing=smoothing)
        sources.append(SourceModel(task.name, model, collate, [Point(p.x) for p in task.train], task.validation))
    diagnosis = diagnose_models(pretrained, sources)
    assert diagnosis.flags.get("low_confidence") == ["task1"]
    plain, smoothed = diagnosis.tasks
    assert plain.confidence_gap < 0 < diagnosis.thresholds["underconfidence_margin"] < smoothed.confidence_gap
    assert all(t.ece is not None and t.mean_max_prob is not None for t in diagnosis.tasks)
    vector = TaskVector.from_state_dicts(pretrained, sources[0].model.backbone_state())
    assert diagnosis.tasks[0].norm == pytest.approx(vector.norm())


def test_pipeline_kappa_policy_recommended_conditions_with_the_diagnosis_kappa():
    """``conditioning.kappa.policy: recommended``: each task's κ is the diagnosis' (shrink only what is
    flagged long); T_stu 'auto' stays 1 for a norm-only task."""
    from distac.pipeline.params import PipelineParams
    from distac.pipeline.stages import distac_config

    names = ("cola", "sst2", "rte")
    vectors = dict(zip(names, _vectors().values()))
    vectors["sst2"] = vectors["sst2"] * 5.0
    diagnosis = json.loads(json.dumps(diagnose(vectors).to_dict()))
    params = PipelineParams.model_validate({
        "tasks": [{"name": name} for name in names], "merge": {"methods": [{"name": "task_arithmetic"}]},
        "conditioning": {"kappa": {"policy": "recommended"}, "student_temperature": "auto"}})
    configs = {name: distac_config(params, name, diagnosis) for name in names}
    assert configs["sst2"].kappa == pytest.approx(diagnosis["recommendations"][1]["kappa"])
    assert configs["sst2"].kappa < 1 and configs["cola"].kappa == configs["rte"].kappa == 1.0
    assert all(c.student_temperature == 1.0 and c.target_norm is None for c in configs.values())
    with pytest.raises(ValueError, match="not used with policy 'recommended'"):
        PipelineParams.model_validate({"tasks": [{"name": "cola"}, {"name": "rte"}],
                                       "merge": {"methods": [{"name": "task_arithmetic"}]},
                                       "conditioning": {"kappa": {"policy": "recommended", "value": 0.5}}})
