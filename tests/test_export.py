"""Merged and conditioned models that transformers loads as they are: `distac merge`, `materialize` and
`condition` on tiny causal LMs (Llama, GPT-2; tied and untied) and tiny BERT classifiers, built in the test.

Every export is checked against what distac itself serves: θ_pre + the merged vector applied by hand (causal
LMs) or distac's own model of that task (classifiers, the task's head and pooler)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from causal_helpers import make_family
from distac import export, io
from distac.cli import main
from distac.data.examples import TextExample
from distac.merging import METHODS
from distac.merging.streaming import load_merged

IDS = torch.tensor([[2, 5, 9, 7, 11, 4], [2, 8, 6, 12, 3, 10]])
FAST = {"wudi": ["--set", "steps=2"], "ties": ["--set", "k=0.3"], "consensus": ["--set", "min_agree=2"]}
TEXTS = ["a good film, great acting", "a bad film, awful acting", "an okay plot", "superb and lovely",
         "dull, boring and poor", "plain average acting"]


def _merge(pretrained: str, finetuned: list[str], out: Path, method: str = "task_arithmetic", *extra: str) -> int:
    return main(["merge", "--method", method, "--pretrained", pretrained, "--finetuned", *finetuned,
                 "--out", str(out), "--device", "cpu", "--no-progress", *FAST.get(method, []), *extra])


def _causal_lm(path: str | Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _by_hand(pretrained: str, vector) -> torch.nn.Module:
    """θ_pre loaded by transformers with ``vector`` added to its parameters by name."""
    model = _causal_lm(pretrained)
    state = model.state_dict()
    with torch.no_grad():
        for key in vector:
            state[key].add_(vector[key].to(state[key].dtype))
    return model


def _logits(model: torch.nn.Module, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("llama"), "llama", tie=True, count=3)


# --------------------------------------------------------------------------------------------- causal LMs


@pytest.mark.parametrize("family,tie", [("llama", True), ("llama", False), ("gpt2", True), ("gpt2", False)])
def test_a_causal_lm_merge_is_a_directory_transformers_loads_and_generates_from(tmp_path, family, tie):
    pretrained, finetuned = make_family(tmp_path, family, tie=tie, count=3)
    out = tmp_path / "merged"
    assert _merge(pretrained, finetuned, out, "ties", "--alpha", "0.7") == 0

    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "model.safetensors", "README.md", "merge.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "config.json").read_text()) == json.loads(Path(pretrained, "config.json").read_text())
    record = json.loads((out / "merge.json").read_text())
    assert record["export"] == "causal_lm" and record["outputs"]["model"] == "." and not (out / "model").exists()

    merged = _causal_lm(out)
    vector = load_merged(str(out)).vector
    assert ("lm_head.weight" in vector) is (not tie)  # a tied lm_head is the embedding: merged once
    embedding = merged.get_input_embeddings().weight
    if tie:
        assert merged.lm_head.weight.data_ptr() == embedding.data_ptr()
    else:
        assert not torch.equal(merged.lm_head.weight, embedding)
    expected = _logits(_by_hand(pretrained, vector), input_ids=IDS)
    assert torch.allclose(_logits(merged, input_ids=IDS), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(expected, _logits(_causal_lm(pretrained), input_ids=IDS), atol=1e-3)  # it moved
    generated = merged.generate(IDS[:1], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, IDS.shape[1] + 4)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_writes_loadable_causal_lms(llama, tmp_path, method):
    pretrained, finetuned = llama
    out = tmp_path / "merged"
    assert _merge(pretrained, finetuned, out, method) == 0
    merged = load_merged(str(out))
    record = json.loads((out / "merge.json").read_text())
    if METHODS[method].per_task:  # EMR: one directory per task, θ_pre + λ_i M_i ⊙ τ_uni
        assert record["outputs"]["tasks"] == ["task-0", "task-1", "task-2"] and not (out / "config.json").exists()
        directories = [out / name for name in record["outputs"]["tasks"]]
    else:
        assert record["outputs"]["model"] == "." and record["outputs"]["tasks"] is None
        directories = [out]
    for task, directory in enumerate(directories):
        expected = _logits(_by_hand(pretrained, merged.for_task(task)), input_ids=IDS)
        assert torch.allclose(_logits(_causal_lm(directory), input_ids=IDS), expected, atol=1e-5, rtol=0), task
        card = json.loads((directory / export.MARKER).read_text())
        assert card["method"] == method and card["task"] == (task if METHODS[method].per_task else None)


def test_the_model_card_names_method_alpha_and_every_source_with_its_sha256(llama, tmp_path):
    pretrained, finetuned = llama
    out = tmp_path / "merged"
    assert _merge(pretrained, finetuned, out, "ties", "--alpha", "0.35") == 0
    card = (out / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: transformers" in front and "- merge" in front and "- distac" in front
    assert front.splitlines()[1:5] == [f"- {json.dumps(uri)}" for uri in (pretrained, *finetuned)]
    assert "`ties`" in body and "| α | 0.35 |" in body and "| k | 0.3 |" in body
    import importlib.metadata

    assert f"| distac | {importlib.metadata.version('distac')} |" in body
    record = json.loads((out / "merge.json").read_text())
    for uri in (pretrained, *finetuned):
        digest = hashlib.sha256(Path(uri, "model.safetensors").read_bytes()).hexdigest()
        assert f"| `{uri}` | model.safetensors | `{digest}` |" in body
        assert {"name": "model.safetensors", "sha256": digest} in next(
            s["files"] for s in record["sources"] if s["model"] == uri)


def test_a_sharded_export_has_transformers_index_and_loads_the_same(llama, tmp_path):
    pretrained, finetuned = llama
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert _merge(pretrained, finetuned, whole) == 0
    assert _merge(pretrained, finetuned, sharded, "task_arithmetic", "--shard-size", "8KB") == 0
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards == sorted(p.name for p in sharded.glob("model-*-of-*.safetensors"))
    assert all(name == f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, name in enumerate(shards))
    assert not (sharded / "model.safetensors").exists()
    total = 0
    for name in shards:
        with safe_open(str(sharded / name), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            for key in handle.keys():
                assert index["weight_map"][key] == name
                tensor = handle.get_tensor(key)
                total += tensor.numel() * tensor.element_size()
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(io.open_checkpoint(str(whole / "model.safetensors")))
    assert torch.equal(_logits(_causal_lm(sharded), input_ids=IDS), _logits(_causal_lm(whole), input_ids=IDS))


def test_a_merge_that_fails_midway_leaves_no_output(llama, tmp_path, monkeypatch):
    pretrained, finetuned = llama
    real, calls = export.write_export, []

    def fail_on_the_second_task(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(export, "write_export", fail_on_the_second_task)
    with pytest.raises(RuntimeError, match="disk full"):
        _merge(pretrained, finetuned, tmp_path / "merged", "emr")
    assert len(calls) == 2 and not (tmp_path / "merged").exists()
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".distac")]  # no staging left


def test_an_export_to_s3_arrives_whole_and_loads(llama, tmp_path, s3_bucket):
    import fsspec

    pretrained, finetuned = llama
    out = f"{s3_bucket}/merged"
    assert _merge(pretrained, finetuned, out, "emr") == 0
    fs = fsspec.filesystem("s3")
    fs.get(f"{out}/task-2", str(tmp_path / "task-2"), recursive=True)
    assert (tmp_path / "task-2" / export.MARKER).exists() and (tmp_path / "task-2" / "README.md").exists()
    expected = _logits(_by_hand(pretrained, load_merged(out).for_task(2)), input_ids=IDS)
    assert torch.allclose(_logits(_causal_lm(tmp_path / "task-2"), input_ids=IDS), expected, atol=1e-5, rtol=0)


def test_materialize_writes_a_loadable_causal_lm_and_refuses_a_file_or_a_fine_tune(llama, tmp_path, capsys):
    pretrained, finetuned = llama
    out = tmp_path / "merged"
    assert _merge(pretrained, finetuned, out, "emr", "--no-model") == 0
    assert sorted(os.listdir(out)) == ["masks", "merge.json", "vector"]
    served = tmp_path / "task1"
    argv = ["materialize", "--merged", str(out), "--pretrained", pretrained, "--task", "1", "--no-progress"]
    assert main([*argv, "--out", str(served)]) == 0
    assert main([*argv, "--out", str(served)]) == 0  # its own earlier export is replaced
    expected = _logits(_by_hand(pretrained, load_merged(str(out)).for_task(1)), input_ids=IDS)
    assert torch.allclose(_logits(_causal_lm(served), input_ids=IDS), expected, atol=1e-5, rtol=0)
    assert json.loads((served / export.MARKER).read_text())["details"]["scale"] == pytest.approx(
        json.loads((out / "merge.json").read_text())["scales"][1])
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "task1.safetensors")]) == 2
    assert "a transformers model is a directory" in capsys.readouterr().err
    assert main([*argv, "--finetuned", finetuned[1], "--out", str(tmp_path / "other")]) == 2
    assert "only for a merge of transformers sequence classifiers" in capsys.readouterr().err


def test_condition_writes_a_loadable_causal_lm(llama, tmp_path):
    pretrained, finetuned = llama
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                             ["the movie was good", "the cat sat on the mat", "a story and the plot"]))
    out = tmp_path / "cond"
    assert main(["condition", "--pretrained", pretrained, "--finetuned", finetuned[1], "--out", str(out),
                 "--unlabeled", str(texts), "--kappa", "0.5", "--steps", "2", "--batch-size", "2",
                 "--device", "cpu", "--no-progress"]) == 0
    assert (out / "history.json").exists() and (out / "model" / "meta.json").exists()
    vector = io.load_state_dict(str(out / "task_vector"))
    expected = _logits(_by_hand(pretrained, vector), input_ids=IDS)
    assert torch.allclose(_logits(_causal_lm(out), input_ids=IDS), expected, atol=1e-5, rtol=0)
    card = (out / "README.md").read_text()
    assert "DisTaC-conditioned" in card and "| kappa | 0.5 |" in card


# --------------------------------------------------------------------------------------------- classifiers


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    """θ_pre (a tiny random BertModel with a tokenizer) and two BertForSequenceClassification fine-tunes of
    it with 3 and 2 labels, every tensor moved (the pooler too), saved with save_pretrained."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from distac.models.text import create_random_encoder

    base = tmp_path_factory.mktemp("classifiers")
    pretrained = create_random_encoder(base / "pre")
    finetuned = []
    for task, labels in enumerate((["neg", "mid", "pos"], ["no", "yes"])):
        torch.manual_seed(task)
        model = AutoModelForSequenceClassification.from_pretrained(
            pretrained, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)})
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.1 * parameter.abs().mean() * torch.randn_like(parameter))
        model.save_pretrained(base / f"ft{task}")
        AutoTokenizer.from_pretrained(pretrained).save_pretrained(base / f"ft{task}")
        finetuned.append(str(base / f"ft{task}"))
    return pretrained, finetuned


def _distac_logits(pretrained: str, finetuned: str, vector) -> tuple[torch.Tensor, dict]:
    """What distac serves for the task of ``finetuned``: its loaded model, backbone θ_pre + vector."""
    from distac.evaluation import predict_logits
    from distac.models.resolve import load_model, load_pretrained_state

    loaded = load_model(finetuned, pretrained)
    state = load_pretrained_state(pretrained, list(loaded.model.backbone_state()))
    loaded.model.load_backbone(vector.apply_to(state))
    examples = [TextExample(text, None, 0) for text in TEXTS]
    return predict_logits(loaded.model, examples, loaded.adapter.collate), loaded.adapter.collate(examples)


def _classifier_logits(path: str | Path, inputs: dict) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification

    return _logits(AutoModelForSequenceClassification.from_pretrained(str(path)).eval(), **inputs)


def test_a_classifier_merge_writes_one_loadable_model_per_task_with_its_head(classifiers, tmp_path, capsys):
    pretrained, finetuned = classifiers
    out = tmp_path / "merged"
    assert _merge(pretrained, finetuned, out, "ties", "--alpha", "0.8") == 0
    record = json.loads((out / "merge.json").read_text())
    assert record["export"] == "seqcls" and record["outputs"]["tasks"] == ["task-0", "task-1"]
    assert not (out / "config.json").exists() and not (out / "model").exists()
    merged = load_merged(str(out))
    for task, source in enumerate(finetuned):
        directory = out / f"task-{task}"
        config = json.loads((directory / "config.json").read_text())
        assert config == json.loads(Path(source, "config.json").read_text())  # the task's labels
        expected, inputs = _distac_logits(pretrained, source, merged.for_task(task))
        actual = _classifier_logits(directory, inputs)
        assert actual.shape == (len(TEXTS), len(config["id2label"]))
        assert torch.allclose(actual, expected, atol=1e-5, rtol=0), task
        weights = io.open_checkpoint(str(directory / "model.safetensors"))
        fine_tune = io.open_checkpoint(str(Path(source, "model.safetensors")))
        for key in ("bert.pooler.dense.weight", "classifier.weight", "classifier.bias"):
            assert torch.equal(weights[key], fine_tune[key]), key  # the task's own head and pooler

    served = tmp_path / "served-1"
    argv = ["materialize", "--merged", str(out), "--pretrained", pretrained, "--task", "1", "--no-progress"]
    capsys.readouterr()
    assert main([*argv, "--out", str(served)]) == 2
    error = capsys.readouterr().err
    assert "--finetuned" in error and finetuned[1] in error and not served.exists()
    assert main([*argv, "--finetuned", finetuned[1], "--out", str(served)]) == 0
    first = io.open_checkpoint(str(served / "model.safetensors"))
    merged_task = io.open_checkpoint(str(out / "task-1" / "model.safetensors"))
    assert set(first) == set(merged_task) and all(torch.equal(first[k], merged_task[k]) for k in first)


def test_condition_writes_a_loadable_classifier_that_predicts_what_distac_serves(classifiers, tmp_path):
    pretrained, finetuned = classifiers
    unlabeled = tmp_path / "unlabeled.jsonl"
    unlabeled.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    out = tmp_path / "cond"
    assert main(["condition", "--pretrained", pretrained, "--finetuned", finetuned[0], "--out", str(out),
                 "--unlabeled", str(unlabeled), "--kappa", "0.5", "--steps", "2", "--batch-size", "3",
                 "--device", "cpu", "--no-progress"]) == 0
    from distac.evaluation import predict_logits
    from distac.models.resolve import load_model

    own = load_model(str(out / "model"))  # distac's conditioned model (its format), what merge/evaluate take
    examples = [TextExample(text, None, 0) for text in TEXTS]
    expected = predict_logits(own.model, examples, own.adapter.collate)
    actual = _classifier_logits(out, own.adapter.collate(examples))
    assert torch.allclose(actual, expected, atol=1e-5, rtol=0)
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "neg", "1": "mid", "2": "pos"}

    merged = tmp_path / "merged"  # the export is a fine-tuned model like any other: merged as it is
    assert _merge(pretrained, [str(out), finetuned[1]], merged) == 0
    assert json.loads((merged / "merge.json").read_text())["outputs"]["tasks"] == ["task-0", "task-1"]
    head = io.open_checkpoint(str(merged / "task-0" / "model.safetensors"))["classifier.weight"]
    assert torch.equal(head, io.open_checkpoint(str(Path(finetuned[0], "model.safetensors")))["classifier.weight"])
