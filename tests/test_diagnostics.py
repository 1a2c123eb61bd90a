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


def test_planted_norm_disparity_is_flagged_and_shrunk():
    vectors = _vectors()
    vectors["t1"] = vectors["t1"] * 5.0
    diagnosis = diagnose(vectors)
    assert diagnosis.flags == {"norm_disparity": ["t1"]}
    smallest = min(t.norm for t in diagnosis.tasks)
    by_task = {r.task: r for r in diagnosis.recommendations}
    assert by_task["t1"].condition
    assert by_task["t1"].kappa * vectors["t1"].norm() == pytest.approx(smallest)
    assert all(r.kappa <= 1 for r in diagnosis.recommendations)  # shrink only
    assert by_task["t1"].config(steps=10).kappa == by_task["t1"].kappa


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


def test_diagnose_models_on_real_fine_tuned_models():
    adapter = MLPAdapter()
    pretrained = adapter.pretrained_backbone_state()
    sources = []
    for i, smoothing in enumerate((0.0, 0.5)):  # label smoothing ε gives scaled confidence ≈ 1 − ε
        task = make_task(f"task{i}", seed=10 + i)
        model = finetune(adapter, task, label_smoothing=smoothing)
        sources.append(SourceModel(task.name, model, collate, [Point(p.x) for p in task.train], task.validation))
    diagnosis = diagnose_models(pretrained, sources)
    assert diagnosis.flags.get("low_confidence") == ["task1"]
    assert all(t.ece is not None and t.mean_max_prob is not None for t in diagnosis.tasks)
    vector = TaskVector.from_state_dicts(pretrained, sources[0].model.backbone_state())
    assert diagnosis.tasks[0].norm == pytest.approx(vector.norm())
