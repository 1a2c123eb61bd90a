"""Users' own models and data: tasks from CSV/TSV/JSONL/Parquet/``save_to_disk`` files, Hugging Face
sequence-classification checkpoints fine-tuned and saved with plain transformers, and the CLI on both."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distac.cli import main
from distac.data import DataError, DataSpec, TextExample, load_task_data, load_tasks
from distac.errors import CheckpointError, ConfigError, MismatchError
from distac.models import load_model
from distac.models.resolve import backbone_checkpoint, paired_backbones

POSITIVE = ["good", "great", "fine", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring"]
NEUTRAL = ["okay", "average", "plain"]


def _rows(count: int, seed: int, labels: str = "three") -> list[dict]:
    rng = random.Random(seed)
    words = {"pos": POSITIVE, "neg": NEGATIVE, "mid": NEUTRAL}
    names = ["pos", "neg", "mid"] if labels == "three" else ["pos", "neg"]
    rows = []
    for i in range(count):
        label = names[i % len(names)]
        rows.append({"review": f"a {rng.choice(words[label])} film, {rng.choice(words[label])} acting",
                     "stars": label})
    return rows


def _write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> str:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """θ_pre (a tiny random BERT) and two checkpoints fine-tuned from it with plain transformers, saved with
    ``save_pretrained``, plus their CSV data."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from distac.models.text import create_random_encoder

    base = tmp_path_factory.mktemp("user-models")
    pretrained = create_random_encoder(base / "pre")
    tokenizer = AutoTokenizer.from_pretrained(pretrained)
    out = {"pre": pretrained, "base": base}
    for task, kind, lr in (("reviews", "three", 3e-3), ("polarity", "two", 1e-3)):
        train, test = _rows(48, 1, kind), _rows(24, 2, kind)
        names = sorted({row["stars"] for row in train})
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(
            pretrained, num_labels=len(names), id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)})
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        model.train()
        for step in range(24):
            batch = train[(step * 8) % 48:(step * 8) % 48 + 8]
            inputs = tokenizer([r["review"] for r in batch], padding=True, return_tensors="pt")
            loss = model(**inputs, labels=torch.tensor([names.index(r["stars"]) for r in batch])).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        model.save_pretrained(base / f"ft_{task}")
        tokenizer.save_pretrained(base / f"ft_{task}")
        out[task] = str(base / f"ft_{task}")
        out[f"{task}_train"] = _write_csv(base / f"{task}_train.csv", train)
        out[f"{task}_test"] = _write_csv(base / f"{task}_test.csv", test)
    return out


# --------------------------------------------------------------------------------------------- data


def test_every_file_format_gives_the_same_task(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    train, test = _rows(30, 1), _rows(12, 2)
    sources = {
        "csv": (_write_csv(tmp_path / "tr.csv", train), _write_csv(tmp_path / "te.csv", test)),
        "tsv": (_write_csv(tmp_path / "tr.tsv", train, "\t"), _write_csv(tmp_path / "te.tsv", test, "\t")),
        "jsonl": (_write_jsonl(tmp_path / "tr.jsonl", train), _write_jsonl(tmp_path / "te.jsonl", test)),
    }
    pq.write_table(pa.Table.from_pylist(train), tmp_path / "tr.parquet")
    pq.write_table(pa.Table.from_pylist(test), tmp_path / "te.parquet")
    sources["parquet"] = (str(tmp_path / "tr.parquet"), str(tmp_path / "te.parquet"))
    datasets.Dataset.from_list(train).save_to_disk(str(tmp_path / "tr_ds"))
    datasets.Dataset.from_list(test).save_to_disk(str(tmp_path / "te_ds"))
    sources["save_to_disk"] = (str(tmp_path / "tr_ds"), str(tmp_path / "te_ds"))
    loaded = {kind: load_task_data("reviews", DataSpec(train=tr, test=te, text="review", label="stars"))
              for kind, (tr, te) in sources.items()}
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train), "dev": datasets.Dataset.from_list(test)}
                         ).save_to_disk(str(tmp_path / "dict_ds"))
    loaded["dataset_dict"] = load_task_data("reviews", DataSpec(dataset=str(tmp_path / "dict_ds"),
                                                                splits={"train": "train", "test": "dev"},
                                                                text="review", label="stars"))
    reference = loaded["csv"]
    assert reference.class_names == ["mid", "neg", "pos"]  # sorted distinct training labels
    assert reference.test[0] == TextExample(test[0]["review"], None, ["mid", "neg", "pos"].index(test[0]["stars"]))
    assert len(reference.train) + len(reference.validation) == 30 and len(reference.validation) == 3
    for kind, task in loaded.items():
        assert (list(task.train), list(task.validation), list(task.test), task.class_names) == (
            list(reference.train), list(reference.validation), list(reference.test), reference.class_names), kind


def test_integer_labels_pairs_given_class_names_and_unlabeled_sources(tmp_path):
    rows = [{"a": f"first {i}", "b": f"second {i}", "y": str(i % 2)} for i in range(10)]
    spec = DataSpec(train=_write_csv(tmp_path / "p.csv", rows), test=_write_csv(tmp_path / "q.csv", rows[:4]),
                    validation=_write_csv(tmp_path / "v.csv", rows[4:8]), text="a", text_pair="b", label="y",
                    class_names=["no", "yes"], unlabeled=_write_jsonl(tmp_path / "u.jsonl", [{"a": "x", "b": "y"}]))
    task = load_task_data("pairs", spec)
    assert task.class_names == ["no", "yes"] and task.num_classes == 2
    assert task.train[1] == TextExample("first 1", "second 1", 1) and len(task.train) == 10  # validation given
    assert task.unlabeled() == [TextExample("x", "y", None)]
    surrogate = {"train": spec.train, "test": spec.test, "text": "a", "text_pair": "b",
                 "label": "y", "unlabeled": {"from_task": "pairs"}}
    tasks = load_tasks({"other": surrogate, "pairs": spec})
    assert tasks["other"].unlabeled()[:2] == [TextExample(e.text_a, e.text_b, None) for e in tasks["pairs"].train[:2]]


@pytest.mark.parametrize("case, message", [
    ("missing_column", "no column 'stars' (the label column)"),
    ("unseen_label", "row 2: label 'zzz' in column 'stars' is not one of the 3 classes"),
    ("empty_split", "has no rows (an empty split)"),
    ("mixed_pairs", "row 3: column 'other' (the text_pair column) is empty"),
    ("not_a_file", "data file not found"),
])
def test_bad_data_names_file_row_and_field(tmp_path, case, message):
    train = _rows(9, 1)
    test = _rows(4, 2)
    text_pair = None
    if case == "missing_column":
        test = [{"review": r["review"], "rating": r["stars"]} for r in test]
    elif case == "unseen_label":
        test[1]["stars"] = "zzz"
    elif case == "mixed_pairs":
        train = [{**r, "other": "" if i == 2 else "x"} for i, r in enumerate(train)]
        text_pair = "other"
    train_file = _write_csv(tmp_path / "train.csv", train)
    test_file = str(tmp_path / "test.csv")
    if case == "empty_split":
        Path(test_file).write_text("review,stars\n")
    elif case != "not_a_file":
        _write_csv(Path(test_file), test)
    with pytest.raises(DataError) as error:
        load_task_data("t", DataSpec(train=train_file, test=test_file, text="review", text_pair=text_pair,
                                     label="stars"))
    assert message in str(error.value)
    assert (train_file if case == "mixed_pairs" else test_file) in str(error.value)


def test_data_spec_rejects_unknown_fields_and_missing_splits():
    with pytest.raises(ValueError, match="test missing"):
        DataSpec(train="a.csv")
    with pytest.raises(ValueError, match="extra"):
        DataSpec(train="a.csv", test="b.csv", colour="red")


# --------------------------------------------------------------------------------------------- models


def test_imported_checkpoint_predicts_exactly_what_transformers_does(hf_models):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    loaded = load_model(hf_models["reviews"], pretrained=hf_models["pre"])
    assert loaded.class_names == ["mid", "neg", "pos"] and loaded.meta["num_classes"] == 3
    task = load_task_data("reviews", DataSpec(train=hf_models["reviews_train"], test=hf_models["reviews_test"],
                                              text="review", label="stars"), class_names=loaded.class_names)
    reference = AutoModelForSequenceClassification.from_pretrained(hf_models["reviews"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_models["reviews"])
    with torch.no_grad():
        ours = loaded.model(loaded.adapter.collate(list(task.test)))
        theirs = reference(**tokenizer([e.text_a for e in task.test], padding=True, truncation=True,
                                       return_tensors="pt")).logits
    assert torch.equal(ours, theirs)
    # the backbone is the encoder without its pooler; pooler and classifier are the head
    assert sorted(loaded.model.head_state()) == ["classifier.bias", "classifier.weight", "pooler.dense.bias",
                                                 "pooler.dense.weight"]
    assert set(loaded.model.backbone_state()) == set(backbone_checkpoint(hf_models["reviews"]))
    assert not any(key.startswith("pooler.") for key in loaded.model.backbone_state())


def test_accuracy_reported_by_distac_equals_transformers(hf_models, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    spec_file = tmp_path / "reviews.yaml"
    spec_file.write_text(f"train: {hf_models['reviews_train']}\ntest: {hf_models['reviews_test']}\n"
                         "text: review\nlabel: stars\n")
    assert main(["evaluate", "--finetuned", hf_models["reviews"], "--data", str(spec_file),
                 "--json", str(tmp_path / "eval.json")]) == 0
    reported = json.loads((tmp_path / "eval.json").read_text())["models"][0]["accuracy"]
    model = AutoModelForSequenceClassification.from_pretrained(hf_models["reviews"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_models["reviews"])
    with open(hf_models["reviews_test"]) as handle:
        rows = list(csv.DictReader(handle))
    with torch.no_grad():
        logits = model(**tokenizer([r["review"] for r in rows], padding=True, truncation=True,
                                   return_tensors="pt")).logits
    expected = sum(model.config.id2label[int(p)] == r["stars"] for p, r in zip(logits.argmax(-1), rows)) / len(rows)
    assert reported == pytest.approx(expected, abs=1e-7) and expected > 0.5  # the model learned something


def test_pretrained_mismatch_fails_naming_the_tensor(hf_models, tmp_path):
    from distac.models.text import create_random_encoder

    wider = create_random_encoder(tmp_path / "wider", hidden=48, heads=2)
    expected = (f"tensor 'embeddings.LayerNorm.bias': shape (32,) in {hf_models['reviews']}, (48,) in the "
                f"pretrained model {wider}")  # the first tensor in the checkpoint's order that differs
    with pytest.raises(MismatchError) as error:
        paired_backbones(wider, [hf_models["reviews"]])
    assert str(error.value) == expected
    with pytest.raises(MismatchError, match="embeddings.LayerNorm.bias"):
        load_model(hf_models["reviews"], pretrained=wider)


def test_other_architecture_and_missing_tokenizer_are_named(hf_models, tmp_path):
    import shutil

    from transformers import RobertaConfig, RobertaForSequenceClassification

    roberta = RobertaForSequenceClassification(RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                             num_attention_heads=2, intermediate_size=37))
    roberta.save_pretrained(tmp_path / "roberta")
    with pytest.raises(MismatchError, match=r"roberta/config.json: model_type 'roberta', but .*'bert'"):
        paired_backbones(hf_models["pre"], [str(tmp_path / "roberta")])
    bare = tmp_path / "no_tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(hf_models["reviews"]) / name, bare / name)
    with pytest.raises(CheckpointError, match=f"{bare} holds no tokenizer"):
        load_model(str(bare))


# --------------------------------------------------------------------------------------------- the CLI


def test_cli_diagnose_condition_merge_evaluate_on_hf_checkpoints_and_csv(hf_models, tmp_path, capsys):
    pre, ft_a, ft_b = hf_models["pre"], hf_models["reviews"], hf_models["polarity"]
    specs = []
    for task in ("reviews", "polarity"):
        spec = tmp_path / f"{task}.yaml"
        spec.write_text(f"train: {hf_models[task + '_train']}\ntest: {hf_models[task + '_test']}\n"
                        "text: review\nlabel: stars\n")
        specs.append(str(spec))
    unlabeled = _write_csv(tmp_path / "texts.csv", [{"text": r["review"]} for r in _rows(16, 5)])

    assert main(["diagnose", "--pretrained", pre, "--finetuned", ft_a, ft_b, "--data", *specs,
                 "--json", str(tmp_path / "diag.json"), "--num-unlabeled", "16"]) == 0
    rows = json.loads((tmp_path / "diag.json").read_text())["tasks"]
    assert [row["name"] for row in rows] == ["ft_reviews", "ft_polarity"]
    assert all(row["scaled_confidence"] is not None and row["ece"] is not None for row in rows)

    assert main(["condition", "--pretrained", pre, "--finetuned", ft_a, "--unlabeled", unlabeled,
                 "--text-column", "text", "--kappa", "0.5", "--steps", "2", "--batch-size", "8",
                 "--out", str(tmp_path / "cond"), "--no-progress"]) == 0
    history = json.loads((tmp_path / "cond" / "history.json").read_text())
    assert history["kappa"] == 0.5 and history["config"]["steps"] == 2

    conditioned = str(tmp_path / "cond" / "model")
    assert main(["merge", "--method", "task_arithmetic", "--pretrained", pre, "--finetuned", conditioned, ft_b,
                 "--alpha", "0.5", "--out", str(tmp_path / "merged"), "--no-progress"]) == 0
    assert main(["evaluate", "--pretrained", pre, "--finetuned", conditioned, ft_b, "--data", *specs,
                 "--merged", str(tmp_path / "merged"), "--json", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert [row["task"] for row in report["merged"]["tasks"]] == ["ft_reviews", "ft_polarity"]
    assert report["merged"]["alpha"] == 0.5  # the α the merge carries, applied once
    assert main(["evaluate", "--pretrained", pre, "--finetuned", ft_a, ft_b, "--data", *specs, "--method",
                 "task_arithmetic", "--search-alpha", "--grid", "0.5", "1.0", "--json", str(tmp_path / "s.json")]) == 0
    search = json.loads((tmp_path / "s.json").read_text())["alpha_search"]
    assert search["scores"][str(search["alpha"])] == max(search["scores"].values())

    assert main(["extract", "--pretrained", pre, "--finetuned", ft_a, "--out", str(tmp_path / "tv.safetensors")]) == 0
    from distac import io
    from distac.vectors import TaskVector

    loaded = load_model(ft_a, pretrained=pre)
    pre_state = {k: v for k, v in backbone_checkpoint(pre).items() if k in loaded.model.backbone_state()}
    expected = TaskVector.from_state_dicts(pre_state, loaded.model.backbone_state())
    extracted = io.load_state_dict(str(tmp_path / "tv.safetensors"))
    assert set(extracted) == set(expected) and all(torch.equal(extracted[k], expected[k]) for k in expected)


def test_merge_and_diagnose_take_distac_finetune_directories(tmp_path, tiny_encoder, capsys):
    """The README's `distac merge --pretrained pre/ --finetuned ft_x/` on `distac finetune` output, and
    `distac diagnose` on a model of a task it does not know (norms and cosines only)."""
    import shutil

    from distac import io
    from distac.models import build_adapter
    from distac.models.store import load_meta, save_pretrained, save_task_model

    adapter = build_adapter({"kind": "hf_text", "name_or_path": tiny_encoder, "max_length": 16})
    save_pretrained(adapter, tmp_path / "pre")
    for task, seed in (("cola", 1), ("mystery", 2)):
        model = adapter.build(2, seed=seed)
        with torch.no_grad():
            for parameter in model.backbone.parameters():
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(seed)))
        save_task_model(tmp_path / f"ft_{task}", model, adapter, task, 2, ["a", "b"])
    assert main(["merge", "--method", "task_arithmetic", "--pretrained", str(tmp_path / "pre"), "--finetuned",
                 str(tmp_path / "ft_cola"), str(tmp_path / "ft_mystery"), "--out", str(tmp_path / "m"),
                 "--no-progress"]) == 0
    assert len(io.open_checkpoint(str(tmp_path / "m" / "vector"))) == len(adapter.pretrained_backbone_state())
    assert load_meta(tmp_path / "ft_mystery")["task"] == "mystery"
    assert main(["diagnose", "--pretrained", str(tmp_path / "pre"), "--finetuned", str(tmp_path / "ft_mystery"),
                 "--json", str(tmp_path / "d.json")]) == 0
    (row,) = json.loads((tmp_path / "d.json").read_text())["tasks"]
    assert row["name"] == "mystery" and row["norm"] > 0 and row["scaled_confidence"] is None
    shutil.rmtree(tmp_path / "m")
    with pytest.raises(SystemExit):
        main(["condition", "--pretrained", "p", "--finetuned", "f", "--out", "o", "--kappa", "x"])


def test_a_class_count_mismatch_names_the_data_files_not_the_spec_object(hf_models, tmp_path):
    import argparse
    from types import SimpleNamespace

    from distac.cli.common import task_data
    from distac.data import DataSpec

    spec = DataSpec(train=hf_models["reviews_train"], test=hf_models["reviews_test"], text="review", label="stars")
    two_classes = SimpleNamespace(task=None, class_names=[], meta={"num_classes": 2})
    args = argparse.Namespace(seed=0, data_root=None)
    with pytest.raises(ConfigError) as caught:
        task_data(two_classes, "ft_x", spec, args)
    message = str(caught.value)
    assert message == (f"ft_x has 2 classes but its data (train {hf_models['reviews_train']}, test "
                       f"{hf_models['reviews_test']}) has 3 (['mid', 'neg', 'pos'])")


def test_cli_errors_name_the_file(tmp_path, capsys):
    assert main(["evaluate", "--finetuned", str(tmp_path / "nowhere")]) == 2
    assert f"model not found: {tmp_path / 'nowhere'}" in capsys.readouterr().err
    with pytest.raises(DataError, match="bad.yaml: invalid data spec"):
        from distac.cli.common import read_data_spec

        (tmp_path / "bad.yaml").write_text("train: a.csv\n")
        read_data_spec(str(tmp_path / "bad.yaml"))


# --------------------------------------------------------------------------------------------- vision


class ImageEncoder(torch.nn.Module):
    """What the task-vector literature saves with ``torch.save(image_encoder)``: a module around an open_clip
    model (and its transforms); loading it must not need, or run, this class."""

    def __init__(self, clip, preprocess):
        super().__init__()
        self.model = clip
        self.val_preprocess = preprocess


class _Exploit:
    def __reduce__(self):
        import os

        return os.system, (f"touch {_Exploit.marker}",)


def _images(count: int, size: int = 32) -> list:
    from distac.data import ImageExample

    generator = torch.Generator().manual_seed(3)
    return [ImageExample(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator), None)
            for _ in range(count)]


@pytest.fixture(scope="module")
def open_clip_models(tmp_path_factory):
    import open_clip

    from distac.models.vision import create_random_clip_config

    base = tmp_path_factory.mktemp("open-clip")
    config = create_random_clip_config(base)
    spec = base / "pre.json"
    spec.write_text(json.dumps({"kind": "open_clip", "model_name": "tiny", "model_config": config}))
    from distac.models import build_adapter

    adapter = build_adapter(json.loads(spec.read_text()))
    tuned = {}
    for name, seed in (("a", 1), ("b", 2)):
        clip = __import__("copy").deepcopy(adapter.clip)
        with torch.no_grad():
            for parameter in clip.visual.parameters():
                parameter.add_(0.02 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(seed)))
        tuned[name] = clip
    torch.save(tuned["a"].state_dict(), base / "ft_a.pt")  # a full open_clip state dict
    torch.save(ImageEncoder(tuned["b"], open_clip.image_transform(32, is_train=False)), base / "ft_b.pt")
    return {"spec": str(spec), "a": str(base / "ft_a.pt"), "b": str(base / "ft_b.pt"), "clips": tuned,
            "adapter": adapter, "base": base}


def test_open_clip_state_dicts_and_pickled_image_encoders_load_without_running_code(open_clip_models, tmp_path):
    import open_clip

    names = ["cat", "dog", "car"]
    images = _images(4)
    for key in ("a", "b"):
        loaded = load_model(open_clip_models[key], pretrained=open_clip_models["spec"], class_names=names)
        clip = open_clip_models["clips"][key].eval()
        pixels = loaded.adapter.collate(images)["pixel_values"]
        with torch.no_grad():
            image = torch.nn.functional.normalize(clip.encode_image(pixels), dim=-1)
            text = torch.nn.functional.normalize(
                clip.encode_text(open_clip.SimpleTokenizer(context_length=16)([f"a photo of a {n}." for n in names])),
                dim=-1)
            expected = clip.logit_scale.exp() * image @ text.T
            assert torch.allclose(loaded.model(loaded.adapter.collate(images)), expected, atol=1e-5)
    _Exploit.marker = tmp_path / "pwned"
    torch.save({"weights": torch.ones(2), "payload": _Exploit()}, tmp_path / "evil.pt")
    from distac.models.pickled import load_pickled_weights

    assert set(load_pickled_weights(str(tmp_path / "evil.pt"))) == {"weights"}
    assert not _Exploit.marker.exists()


def test_cli_merges_open_clip_checkpoints_against_a_model_spec(open_clip_models, tmp_path, capsys):
    from distac import io

    assert main(["merge", "--method", "task_arithmetic", "--pretrained", open_clip_models["spec"],
                 "--finetuned", open_clip_models["a"], open_clip_models["b"], "--alpha", "0.5",
                 "--out", str(tmp_path / "m"), "--no-progress"]) == 0
    vector = io.load_state_dict(str(tmp_path / "m" / "vector"))
    visual = {k: v for k, v in open_clip_models["adapter"].pretrained_backbone_state().items()}
    assert set(vector) == set(visual)
    key = "conv1.weight"
    expected = 0.5 * sum(open_clip_models["clips"][t].visual.state_dict()[key] - visual[key] for t in ("a", "b"))
    assert torch.allclose(vector[key], expected, atol=1e-6)


def _tiny_hf_clip(path: Path) -> str:
    """A tiny random transformers CLIPModel with a real CLIP tokenizer (open_clip's BPE) and image processor."""
    import open_clip
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    bpe = open_clip.SimpleTokenizer()
    path.mkdir(parents=True, exist_ok=True)
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # transformers' spelling
    (path / "vocab.json").write_text(json.dumps({special.get(k, k): v for k, v in bpe.encoder.items()}))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n")
    CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt")).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    config = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "max_position_embeddings": 32},
                        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    return str(path)


def test_transformers_clip_vision_fine_tune_with_a_zero_shot_head(tmp_path):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, CLIPVisionModel

    pre = _tiny_hf_clip(tmp_path / "clip")
    vision = CLIPVisionModel.from_pretrained(pre)
    with torch.no_grad():
        for parameter in vision.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(5)))
    vision.save_pretrained(tmp_path / "ft")
    names = ["cat", "dog"]
    loaded = load_model(str(tmp_path / "ft"), pretrained=pre, class_names=names)
    assert loaded.adapter.kind == "hf_clip"
    reference = CLIPModel.from_pretrained(pre).eval()
    reference.vision_model.load_state_dict(vision.state_dict())
    images = _images(3)
    from torchvision.transforms.functional import to_pil_image

    pixels = AutoImageProcessor.from_pretrained(pre)(images=[to_pil_image(e.image) for e in images],
                                                    return_tensors="pt")["pixel_values"]
    tokens = AutoTokenizer.from_pretrained(pre)([f"a photo of a {n}." for n in names], padding=True,
                                               return_tensors="pt")
    with torch.no_grad():
        expected = reference(pixel_values=pixels, **tokens).logits_per_image
        assert torch.allclose(loaded.model(loaded.adapter.collate(images)), expected, atol=1e-5)
    pre_view, (ft_view,) = paired_backbones(pre, [str(tmp_path / "ft")])
    assert set(ft_view) == {k for k in loaded.model.backbone_state() if k.startswith("vision_model.")}


def test_image_tasks_from_datasets_and_from_tables_of_paths_are_lazy(tmp_path):
    import datasets
    from PIL import Image

    from distac.data import DatasetView, ImageExample

    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    images = [Image.new("RGB", (8, 8), colour) for colour in colours.values()] * 4
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list(colours))})
    table = {"img": images, "label": [0, 1, 2] * 4}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(table, features=features),
                          "test": datasets.Dataset.from_dict(table, features=features)}
                         ).save_to_disk(str(tmp_path / "colours"))
    task = load_task_data("colours", DataSpec(dataset=str(tmp_path / "colours"), image="img"))
    assert task.class_names == ["red", "green", "blue"]  # the ClassLabel's names, in its order
    assert isinstance(task.test, DatasetView) and len(task.test) == 12
    first = task.test[1]
    assert isinstance(first, ImageExample) and first.label == 1 and first.image.getpixel((0, 0)) == (0, 255, 0)
    (tmp_path / "pics").mkdir()
    rows = []
    for i, (name, colour) in enumerate(list(colours.items()) * 2):
        Image.new("RGB", (8, 8), colour).save(tmp_path / "pics" / f"{i}.png")
        rows.append({"path": f"pics/{i}.png", "colour": name})
    spec = DataSpec(train=_write_csv(tmp_path / "train.csv", rows), test=_write_csv(tmp_path / "test.csv", rows),
                    image="path", label="colour")
    task = load_task_data("pics", spec)
    assert task.class_names == ["blue", "green", "red"]
    assert task.test[0].label == 2 and task.test[0].image.getpixel((0, 0)) == (255, 0, 0)


def test_data_files_and_hf_checkpoints_on_s3(hf_models, s3_bucket):
    import fsspec

    fs = fsspec.filesystem("s3")
    for name in ("reviews_train", "reviews_test"):
        fs.put_file(hf_models[name], f"{s3_bucket}/data/{name}.csv")
    fs.put(hf_models["reviews"] + "/", f"{s3_bucket}/models/ft_reviews/", recursive=True)
    spec = DataSpec(train=f"{s3_bucket}/data/reviews_train.csv", test=f"{s3_bucket}/data/reviews_test.csv",
                    text="review", label="stars")
    remote = load_task_data("reviews", spec)
    local = load_task_data("reviews", DataSpec(train=hf_models["reviews_train"], test=hf_models["reviews_test"],
                                               text="review", label="stars"))
    assert list(remote.test) == list(local.test) and remote.class_names == local.class_names
    loaded = load_model(f"{s3_bucket}/models/ft_reviews", pretrained=hf_models["pre"])
    reference = load_model(hf_models["reviews"], pretrained=hf_models["pre"])
    with torch.no_grad():
        batch = reference.adapter.collate(list(local.test))
        assert torch.equal(loaded.model(batch), reference.model(batch))


def test_the_python_api_of_the_user_doc(hf_models):
    """docs/own-models.md's Python example, on the tiny checkpoint."""
    from distac.conditioning import DistacConfig, condition
    from distac.evaluation import evaluate_task
    from distac.models.resolve import load_pretrained_state
    from distac.vectors import TaskVector

    ft = load_model(hf_models["reviews"], pretrained=hf_models["pre"])
    spec = DataSpec(train=hf_models["reviews_train"], test=hf_models["reviews_test"], text="review", label="stars")
    task = load_task_data("reviews", spec, class_names=ft.class_names)
    assert evaluate_task(ft.model, task.test, ft.adapter.collate, task="reviews").accuracy > 0.5
    pre = load_pretrained_state(hf_models["pre"], list(ft.model.backbone_state()))
    tau = TaskVector.from_state_dicts(pre, ft.model.backbone_state())
    result = condition(ft.model, pre, tau, task.unlabeled(16), ft.adapter.collate,
                       DistacConfig(kappa=0.5, steps=2, batch_size=8), progress=False)
    assert result.kappa == 0.5 and result.vector.norm() > 0


@pytest.mark.parametrize("family", ["roberta", "deberta-v2", "llama"])
def test_other_architectures_predict_exactly_what_transformers_does(family, tmp_path, tiny_encoder):
    """RoBERTa (classifier on the sequence), DeBERTa-v2 (its own pooler) and a Llama-style decoder (score on the
    rightmost non-padding token), saved with save_pretrained beside a tokenizer."""
    import shutil

    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DebertaV2Config, LlamaConfig,
                              RobertaConfig)

    size = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 37, "num_labels": 3, "pad_token_id": 0}
    config = {"roberta": lambda: RobertaConfig(**size, max_position_embeddings=64),
              "deberta-v2": lambda: DebertaV2Config(**size, max_position_embeddings=64),
              "llama": lambda: LlamaConfig(**size, num_key_value_heads=2, max_position_embeddings=64)}[family]()
    torch.manual_seed(1)
    reference = AutoModelForSequenceClassification.from_config(config).eval()
    reference.save_pretrained(tmp_path / "ft")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(tiny_encoder) / name).exists():
            shutil.copy(Path(tiny_encoder) / name, tmp_path / "ft" / name)
    loaded = load_model(str(tmp_path / "ft"))
    examples = [TextExample(text, None, None) for text in ("a short one", "a somewhat longer sentence here", "x")]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ft")
    with torch.no_grad():
        inputs = tokenizer([e.text_a for e in examples], padding=True, return_tensors="pt")
        if family == "llama":
            inputs.pop("token_type_ids", None)
        expected = reference(**inputs).logits
        assert torch.equal(loaded.model(loaded.adapter.collate(examples)), expected)
    assert not set(loaded.model.head_state()) & set(loaded.model.backbone_state())


def test_cli_finetune_and_evaluate_a_task_of_ones_own(hf_models, tiny_encoder, tmp_path, capsys):
    spec = tmp_path / "reviews.yaml"
    spec.write_text(f"train: {hf_models['reviews_train']}\ntest: {hf_models['reviews_test']}\n"
                    "text: review\nlabel: stars\n")
    assert main(["finetune", "--task", "reviews", "--data", str(spec), "--model", tiny_encoder, "--steps", "2",
                 "--batch-size", "4", "--lr", "1e-3", "--out", str(tmp_path / "ft"), "--pretrained-out",
                 str(tmp_path / "pre"), "--no-progress"]) == 0
    meta = json.loads((tmp_path / "ft" / "meta.json").read_text())
    assert (meta["task"], meta["class_names"]) == ("reviews", ["mid", "neg", "pos"])
    assert meta["extra"]["recipe"]["steps"] == 2
    assert main(["evaluate", "--finetuned", str(tmp_path / "ft"), "--data", str(spec),
                 "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["models"][0]["task"] == "reviews"


def test_local_copies_of_s3_checkpoints_are_removed_at_exit(hf_models, s3_bucket):
    """A Hugging Face directory on S3 is copied to a temporary directory for transformers to read; the copy
    (a whole model's weights) is deleted when the process ends, not left in the temporary directory."""
    import fsspec

    fsspec.filesystem("s3").put(hf_models["reviews"] + "/", f"{s3_bucket}/models/ft/", recursive=True)
    script = ("import os, sys\nfrom distac.models.resolve import local_hf_dir\n"
              "copy = local_hf_dir(sys.argv[1])\nprint(copy, sorted(os.listdir(copy)))\n")
    result = subprocess.run([sys.executable, "-c", script, f"{s3_bucket}/models/ft"], capture_output=True,
                            text=True, check=True, env=os.environ.copy())
    copy, listing = result.stdout.split(" ", 1)
    assert "config.json" in listing and "model.safetensors" in listing
    assert not os.path.exists(copy)
