"""Model adapters on tiny random models, the bundled MiniLM, and the fine-tuned model store."""

from __future__ import annotations

import inspect
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from distac import io
from distac.data import ImageExample, TextExample
from distac.errors import CheckpointError, ConfigError, MismatchError
from distac.models import build_adapter, clear_adapter_cache
from distac.models.store import (backbone_uri, load_head, load_meta, load_task_model, save_pretrained,
                                 save_task_model)
from distac.models.text import bundled_minilm_path, create_random_encoder, pool
from distac.models.vision import ZeroShotHead, create_random_clip_config
from distac.vectors import TaskVector
from tiny_mlp import one_torch_thread

SENTENCES = [TextExample("the movie was great", None, 1), TextExample("bad", None, 0),
             TextExample("an utterly forgettable , tedious film", None, 0)]


single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def encoder_spec(tmp_path_factory):
    path = create_random_encoder(tmp_path_factory.mktemp("encoder") / "bert")
    return {"kind": "hf_text", "name_or_path": path, "pooling": "mean", "max_length": 16}


@pytest.fixture(scope="module")
def clip_spec(tmp_path_factory):
    config = create_random_clip_config(tmp_path_factory.mktemp("clip"))
    return {"kind": "open_clip", "model_name": "tiny", "model_config": config,
            "templates": ["a photo of a {}.", "a picture of the {}."]}


def _images(count: int) -> list[ImageExample]:
    return [ImageExample(Image.new("RGB", (40, 30), (60 * i % 256, 10, 200)), i % 2) for i in range(count)]


# ------------------------------------------------------------------------------------------------- text


def test_pool_exact_values():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 3.0]]
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 2.0]]
    assert pool(hidden, mask, "last").tolist() == [[3.0, 4.0]]


def test_text_adapter_builds_seeded_models(encoder_spec):
    adapter = build_adapter(encoder_spec)
    assert build_adapter(dict(encoder_spec)) is adapter  # cached by spec
    assert adapter.spec() == {**encoder_spec, "architecture": "encoder"}
    model = adapter.build(3, seed=0)
    inputs = adapter.collate(SENTENCES)
    assert model(inputs).shape == (3, 3) and model.features(inputs).shape == (3, 32)
    assert torch.equal(adapter.build(3, seed=0).head.weight, model.head.weight)
    assert not torch.equal(adapter.build(3, seed=1).head.weight, model.head.weight)


def test_collate_pads_to_the_longest_and_truncates(encoder_spec):
    adapter = build_adapter(encoder_spec)
    short = adapter.collate(SENTENCES[:2])
    assert short["input_ids"].shape == (2, 6)  # [CLS] the movie was great [SEP]
    assert short["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    long = adapter.collate([TextExample("word " * 50, None, 0)])
    assert long["input_ids"].shape == (1, 16)
    pair = adapter.collate([TextExample("a b", "c", 0)])
    assert pair["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1]]


def test_padding_does_not_change_features(encoder_spec):
    adapter = build_adapter(encoder_spec)
    model = adapter.build(2)
    batch = model.features(adapter.collate(SENTENCES))
    alone = model.features(adapter.collate(SENTENCES[1:2]))
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=1e-5)


def test_backbone_state_round_trip_and_isolation(encoder_spec):
    adapter = build_adapter(encoder_spec)
    pretrained = adapter.pretrained_backbone_state()
    model = adapter.build(2)
    assert model.backbone_state().keys() == pretrained.keys()
    with torch.no_grad():
        for parameter in model.backbone.parameters():
            parameter.add_(1.0)
    assert all(torch.equal(v, adapter.pretrained_backbone_state()[k]) for k, v in pretrained.items())
    fresh = adapter.build(2)
    fresh.load_backbone(model.backbone_state())
    assert all(torch.equal(fresh.backbone_state()[k], v) for k, v in model.backbone_state().items())
    with pytest.raises(MismatchError, match="missing"):
        fresh.load_backbone({k: v for k, v in pretrained.items() if "pooler" not in k})


def test_decoder_sequence_classification(tmp_path):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    GPT2Model(GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                         bos_token_id=101, eos_token_id=102)).save_pretrained(tmp_path)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(Path(bundled_minilm_path()) / name, tmp_path / name)
    adapter = build_adapter({"kind": "hf_text", "name_or_path": str(tmp_path),
                             "architecture": "sequence_classification"})
    assert adapter.pooling == "last"
    model = adapter.build(4)
    assert model.head.bias is None and model.head.weight.shape == (4, 32)
    inputs = adapter.collate(SENTENCES)
    assert set(inputs) <= set(inspect.signature(model.backbone.forward).parameters)
    assert model(inputs).shape == (3, 4)
    # right padding + causal attention: the last real token's state does not see the padding
    torch.testing.assert_close(model.features(inputs)[1:2], model.features(adapter.collate(SENTENCES[1:2])),
                               atol=1e-5, rtol=1e-5)


def test_bad_specs():
    with pytest.raises(ConfigError, match="unknown model kind 'keras'"):
        build_adapter({"kind": "keras"})
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['poolng'\]"):
        build_adapter({"kind": "hf_text", "poolng": "mean"})
    with pytest.raises(ConfigError, match="pooling must be one of"):
        build_adapter({"kind": "hf_text", "pooling": "max"})


def test_bundled_minilm_loads_offline():
    adapter = build_adapter({"kind": "hf_text", "max_length": 64})
    model = adapter.build(2)
    assert sum(p.numel() for p in model.backbone.parameters()) == 22_713_216
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply."]
    with torch.no_grad():
        features = F.normalize(model.features(adapter.collate([TextExample(t, None, 0) for t in texts])), dim=-1)
    similar, unrelated = float(features[0] @ features[1]), float(features[0] @ features[2])
    assert similar > 0.6 > 0.2 > unrelated  # a trained sentence encoder, not random weights


# ----------------------------------------------------------------------------------------------- vision


def test_zero_shot_head_is_normalized_template_mean(clip_spec):
    adapter = build_adapter(clip_spec)
    model = adapter.build(2, ["cat", "dog"])
    head = model.head
    assert isinstance(head, ZeroShotHead) and list(head.parameters()) == []
    assert head.class_embeddings.shape == (2, 32)
    torch.testing.assert_close(head.class_embeddings.norm(dim=-1), torch.ones(2))
    assert math.isclose(float(head.logit_scale), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        tokens = adapter.tokenizer(["a photo of a dog.", "a picture of the dog."])
        dog = F.normalize(F.normalize(adapter.clip.encode_text(tokens), dim=-1).mean(0), dim=-1)
    torch.testing.assert_close(head.class_embeddings[1], dog)
    inputs = adapter.collate(_images(3))
    assert inputs["pixel_values"].shape == (3, 3, 32, 32)
    with torch.no_grad():
        expected = head.logit_scale * F.normalize(model.features(inputs), dim=-1) @ head.class_embeddings.T
        torch.testing.assert_close(model(inputs), expected)
    with pytest.raises(ConfigError, match="one class name per class"):
        adapter.build(3, ["cat", "dog"])


def test_vision_collate_accepts_raw_tensors(clip_spec):
    adapter = build_adapter(clip_spec)
    pil = Image.new("RGB", (32, 32), (255, 0, 0))
    tensor = torch.zeros(3, 32, 32, dtype=torch.uint8)
    tensor[0] = 255
    pixels = adapter.collate([ImageExample(pil, 0), ImageExample(tensor, 0)])["pixel_values"]
    torch.testing.assert_close(pixels[0], pixels[1])


def test_random_clip_is_the_same_in_every_load(clip_spec):
    first = build_adapter(clip_spec).pretrained_backbone_state()
    clear_adapter_cache()
    second = build_adapter(clip_spec).pretrained_backbone_state()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert "conv1.weight" in first and not any(k.startswith("transformer.resblocks") and "text" in k for k in first)


# ------------------------------------------------------------------------------------------------ store


def _perturbed(adapter, num_classes, class_names=None):
    model = adapter.build(num_classes, class_names)
    with torch.no_grad():
        for i, parameter in enumerate(model.backbone.parameters()):
            parameter.add_(0.01 * (i + 1))
    return model


def test_store_round_trip_and_task_vector(encoder_spec, tmp_path):
    adapter = build_adapter(encoder_spec)
    model = _perturbed(adapter, 3)
    save_pretrained(adapter, tmp_path / "pre")
    save_task_model(tmp_path / "ft", model, adapter, "toy", 3, ["a", "b", "c"], extra={"lr": 0.1})
    loaded = load_task_model(tmp_path / "ft")
    assert loaded.meta["task"] == "toy" and loaded.meta["class_names"] == ["a", "b", "c"]
    assert loaded.meta["extra"] == {"lr": 0.1} and loaded.meta["adapter"] == adapter.spec()
    inputs = adapter.collate(SENTENCES)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(inputs), model(inputs), atol=0, rtol=0)
    assert load_head(tmp_path / "ft").keys() == {"weight", "bias"}
    vector = TaskVector.from_checkpoints(backbone_uri(tmp_path / "pre"), backbone_uri(tmp_path / "ft"))
    expected = TaskVector.from_state_dicts(adapter.pretrained_backbone_state(), model.backbone_state())
    assert vector.keys() == expected.keys() and vector.norm() == pytest.approx(expected.norm())


def test_vision_store_round_trip(clip_spec, tmp_path):
    adapter = build_adapter(clip_spec)
    model = _perturbed(adapter, 2, ["cat", "dog"])
    save_task_model(tmp_path / "ft", model, adapter, "pets", 2, ["cat", "dog"])
    loaded = load_task_model(tmp_path / "ft")
    inputs = adapter.collate(_images(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(inputs), model(inputs), atol=0, rtol=0)


def test_incomplete_and_wrong_directories_refuse_to_load(encoder_spec, tmp_path):
    adapter = build_adapter(encoder_spec)
    save_task_model(tmp_path / "ft", adapter.build(2), adapter, "toy", 2, ["a", "b"])
    (tmp_path / "ft" / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=r"meta\.json not found.*did not complete"):
        load_task_model(tmp_path / "ft")
    save_pretrained(adapter, tmp_path / "pre")
    assert load_meta(tmp_path / "pre")["role"] == "pretrained"
    with pytest.raises(CheckpointError, match="pretrained backbone without a task head"):
        load_task_model(tmp_path / "pre")
    with pytest.raises(CheckpointError, match="JSON-serializable"):
        save_task_model(tmp_path / "bad", adapter.build(2), adapter, "toy", 2, ["a", "b"], extra={"x": object()})
    assert not (tmp_path / "bad" / "meta.json").exists()


def test_store_on_s3(encoder_spec, s3_bucket):
    adapter = build_adapter(encoder_spec)
    model = _perturbed(adapter, 2)
    uri = f"{s3_bucket}/models/toy"
    save_task_model(uri, model, adapter, "toy", 2, ["a", "b"])
    save_pretrained(adapter, f"{s3_bucket}/models/pre")
    loaded = load_task_model(uri)
    assert all(torch.equal(loaded.model.backbone_state()[k], v) for k, v in model.backbone_state().items())
    assert torch.equal(io.load_state_dict(backbone_uri(f"{s3_bucket}/models/pre"))["embeddings.word_embeddings.weight"],
                       adapter.pretrained_backbone_state()["embeddings.word_embeddings.weight"])
