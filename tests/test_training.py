"""Fine-tuning recipes on tiny models: schedule, losses, determinism, confidence effects, and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from distac.cli import main
from distac.data import ImageExample, TaskData, TextExample
from distac.errors import ConfigError, DistacError
from distac.models import build_adapter
from distac.models.store import load_task_model
from distac.models.text import create_random_encoder
from distac.models.vision import create_random_clip_config
from distac.training import FinetuneRecipe, batch_indices, classification_loss, finetune, lr_multiplier
from tiny_mlp import one_torch_thread

GLUE_DIR = Path(__file__).resolve().parents[1] / "../shared/data/glue"
needs_glue = pytest.mark.skipif(not GLUE_DIR.is_dir(), reason="GLUE data not found beside the checkout")
POSITIVE = ["good", "great", "nice", "fine", "lovely", "superb", "happy", "best"]
NEGATIVE = ["bad", "awful", "poor", "sad", "ugly", "worst", "dull", "boring"]


single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def encoder_spec(tmp_path_factory):
    path = create_random_encoder(tmp_path_factory.mktemp("encoder") / "bert")
    return {"kind": "hf_text", "name_or_path": path, "max_length": 8}


@pytest.fixture(scope="module")
def separable():
    train = [TextExample(word, None, 1) for word in POSITIVE] + [TextExample(word, None, 0) for word in NEGATIVE]
    return TaskData("words", train, train[:4], train[-4:], 2, ["negative", "positive"])


def _mean_max_probability(model, adapter, examples) -> float:
    with torch.no_grad():
        return float(F.softmax(model(adapter.collate(examples)), dim=-1).max(dim=-1).values.mean())


# -------------------------------------------------------------------------------------------- recipe


@pytest.mark.parametrize("field,value", [("lr", 0.0), ("steps", 0), ("batch_size", 0), ("weight_decay", -1.0),
                                         ("warmup_fraction", 1.0), ("schedule", "linear"),
                                         ("label_smoothing", 1.0), ("mixup_alpha", -0.1), ("focal_gamma", -1.0),
                                         ("grad_clip", -1.0), ("steps", 2.5)])
def test_recipe_validation_names_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"FinetuneRecipe\.{field}: invalid value"):
        FinetuneRecipe(**{field: value})


def test_recipe_from_dict_round_trip():
    recipe = FinetuneRecipe(lr=1e-3, steps=7, label_smoothing=0.1)
    assert FinetuneRecipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['learning_rate'\]"):
        FinetuneRecipe.from_dict({"learning_rate": 1e-3})


def test_lr_schedule_exact_values():
    assert [lr_multiplier(s, 10, 2, "cosine") for s in (0, 1)] == [0.5, 1.0]
    assert lr_multiplier(2, 10, 2, "cosine") == 1.0
    assert lr_multiplier(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(10, 10, 2, "cosine") == pytest.approx(0.0)
    assert lr_multiplier(9, 10, 0, "constant") == 1.0


def test_focal_loss_exact_value():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = [0.25, 0.75]
    labels = torch.tensor([1])
    assert float(classification_loss(logits, labels, focal_gamma=2.0)) == pytest.approx(-(0.25**2) * math.log(0.75))
    smoothed = -(0.9 * 0.25**2 * math.log(0.75) + 0.1 * 0.75**2 * math.log(0.25))  # q = [0.1, 0.9] for ε = 0.2
    assert float(classification_loss(logits, labels, 0.2, 2.0)) == pytest.approx(smoothed)


@settings(max_examples=40, deadline=None)
@given(logits=st.lists(st.floats(-8, 8), min_size=3, max_size=3), label=st.integers(0, 2),
       smoothing=st.floats(0, 0.5), gamma=st.floats(0.1, 4))
def test_focal_loss_never_exceeds_cross_entropy(logits, label, smoothing, gamma):
    logits, labels = torch.tensor([logits]), torch.tensor([label])
    plain = classification_loss(logits, labels, smoothing)
    torch.testing.assert_close(plain, F.cross_entropy(logits, labels, label_smoothing=smoothing))
    assert float(classification_loss(logits, labels, smoothing, gamma)) <= float(plain) + 1e-6


def test_batches_cover_each_epoch_once():
    batches = batch_indices(6, 4, torch.Generator().manual_seed(0))
    drawn = [next(batches) for _ in range(3)]  # 12 indices = two epochs
    flat = [i for batch in drawn for i in batch]
    assert sorted(flat[:6]) == sorted(flat[6:]) == list(range(6))
    assert all(len(batch) == 4 for batch in drawn)


# ------------------------------------------------------------------------------------------ finetune


def test_finetune_learns_and_is_deterministic(encoder_spec, separable):
    adapter = build_adapter(encoder_spec)
    recipe = FinetuneRecipe(lr=3e-3, steps=30, batch_size=8, seed=0)
    steps = []
    first = finetune(adapter, separable, recipe, progress=False, on_step=lambda step, m: steps.append((step, m)))
    second = finetune(adapter, separable, recipe, progress=False)
    losses = [h["loss"] for h in first.history]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert [h["step"] for h in first.history] == list(range(1, 31)) == [s for s, _ in steps]
    assert steps[3][1] == {"loss": first.history[3]["loss"], "lr": first.history[3]["lr"]}
    assert first.history == second.history
    assert all(torch.equal(v, second.model.backbone_state()[k]) for k, v in first.model.backbone_state().items())
    other_seed = finetune(adapter, separable, FinetuneRecipe(lr=3e-3, steps=30, batch_size=8, seed=1),
                          progress=False)
    assert other_seed.history != first.history
    assert not first.model.training


def test_label_smoothing_lowers_confidence(encoder_spec, separable):
    adapter = build_adapter(encoder_spec)
    plain = finetune(adapter, separable, FinetuneRecipe(lr=3e-3, steps=40, batch_size=8), progress=False)
    smooth = finetune(adapter, separable, FinetuneRecipe(lr=3e-3, steps=40, batch_size=8, label_smoothing=0.4),
                      progress=False)
    confident = _mean_max_probability(plain.model, adapter, separable.train)
    soft = _mean_max_probability(smooth.model, adapter, separable.train)
    assert confident > 0.9 and soft < 0.85 and soft < confident


def test_mixup_and_focal_train_deterministically(encoder_spec, separable):
    adapter = build_adapter(encoder_spec)
    recipe = FinetuneRecipe(lr=3e-3, steps=6, batch_size=8, mixup_alpha=0.4, focal_gamma=2.0)
    first = finetune(adapter, separable, recipe, progress=False)
    assert first.history == finetune(adapter, separable, recipe, progress=False).history
    assert all(math.isfinite(h["loss"]) for h in first.history)


def test_train_head_only_keeps_the_backbone(encoder_spec, separable):
    adapter = build_adapter(encoder_spec)
    result = finetune(adapter, separable, FinetuneRecipe(lr=1e-2, steps=3, batch_size=4, train_head_only=True),
                      progress=False)
    pretrained = adapter.pretrained_backbone_state()
    assert all(torch.equal(v, pretrained[k]) for k, v in result.model.backbone_state().items())
    assert not torch.equal(result.model.head.weight, adapter.build(2).head.weight)


def test_unlabeled_or_empty_data_is_refused(encoder_spec, separable):
    adapter = build_adapter(encoder_spec)
    no_labels = TaskData("words", separable.unlabeled(), [], [], 2, ["n", "p"])
    with pytest.raises(DistacError, match="needs labelled training examples"):
        finetune(adapter, no_labels, FinetuneRecipe(steps=1), progress=False)
    with pytest.raises(DistacError, match="no training examples"):
        finetune(adapter, TaskData("empty", [], [], [], 2, ["n", "p"]), FinetuneRecipe(steps=1), progress=False)


def test_vision_finetune_trains_the_image_tower_only(tmp_path):
    adapter = build_adapter({"kind": "open_clip", "model_name": "tiny",
                             "model_config": create_random_clip_config(tmp_path)})
    images = [ImageExample(Image.new("RGB", (32, 32), (250 * (i % 2), 40, 40)), i % 2) for i in range(8)]
    task = TaskData("colors", images, [], [], 2, ["red", "dark"])
    result = finetune(adapter, task, FinetuneRecipe(lr=1e-3, steps=3, batch_size=4), progress=False)
    zero_shot = adapter.build(2, ["red", "dark"]).head_state()
    assert all(torch.equal(v, zero_shot[k]) for k, v in result.model.head_state().items())
    pretrained = adapter.pretrained_backbone_state()
    assert any(not torch.equal(v, pretrained[k]) for k, v in result.model.backbone_state().items())
    with pytest.raises(ConfigError, match="train_head_only"):
        finetune(adapter, task, FinetuneRecipe(steps=1, train_head_only=True), progress=False)


# ----------------------------------------------------------------------------------------------- CLI


@needs_glue
def test_cli_finetune_end_to_end(encoder_spec, tmp_path, capsys):
    spec = json.dumps(encoder_spec)
    code = main(["finetune", "--task", "sst-2", "--model-spec", spec, "--out", str(tmp_path / "ft"),
                 "--pretrained-out", str(tmp_path / "pre"), "--steps", "3", "--batch-size", "4", "--lr", "1e-3",
                 "--label-smoothing", "0.1", "--max-train", "32", "--max-eval", "8", "--glue-dir", str(GLUE_DIR),
                 "--no-progress"])
    assert code == 0 and "fine-tuned sst2: 3 steps" in capsys.readouterr().out
    loaded = load_task_model(tmp_path / "ft")
    assert loaded.meta["task"] == "sst2" and loaded.meta["class_names"] == ["negative", "positive"]
    assert loaded.meta["extra"]["recipe"]["label_smoothing"] == 0.1
    assert loaded.meta["extra"]["train_examples"] == 32
    assert (tmp_path / "pre" / "meta.json").exists() and (tmp_path / "pre" / "backbone").is_dir()


def test_cli_reports_bad_input(tmp_path, capsys):
    assert main(["finetune", "--task", "rte", "--model-spec", "{not json", "--out", str(tmp_path)]) == 2
    assert "--model-spec is not valid JSON" in capsys.readouterr().err
    assert main(["finetune", "--task", "rte", "--lr", "-1", "--out", str(tmp_path)]) == 2
    assert "FinetuneRecipe.lr" in capsys.readouterr().err
