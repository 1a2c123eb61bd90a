"""`distac diagnose` and `distac evaluate` on causal LMs from the command line: next-token confidence over free
text, the split accuracy comes from, gold-completion and held-out text perplexity, --no-progress (and, for
comparison, a classifier's confidence on the same --unlabeled texts).

Tiny random Llamas with a word-level tokenizer are built in the test (tests/causal_helpers.py); every number is
checked against a plain transformers forward pass."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from causal_helpers import make_family, tiny_tokenizer
from distac.cli import main

TEXTS = ["the movie was good", "the cat sat on the mat", "a story and the plot", "yes"]
ROWS = [("the movie was good", "yes"), ("the film was bad", "no"), ("a great story", "yes"), ("boring plot", "no"),
        ("the actors were fun", "yes"), ("an awful film", "no"), ("the cat sat on the mat", "yes"),
        ("not very good", "no"), ("fine", "yes"), ("the story was boring", "no")]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """θ_pre, three fine-tunes (the third's vector ten times longer), texts and two data specs (with and without
    a validation file)."""
    root = tmp_path_factory.mktemp("cli-causal")
    pretrained, finetuned = make_family(root, "llama", count=3, scales=(0.05, 0.05, 0.5))
    texts = _jsonl(root / "texts.jsonl", [{"text": t} for t in TEXTS])
    labelled = lambda rows: [{"text": t, "label": y} for t, y in rows]  # noqa: E731
    train = _jsonl(root / "train.jsonl", labelled(ROWS))
    test = _jsonl(root / "test.jsonl", labelled(ROWS[:6]))
    validation = _jsonl(root / "validation.jsonl", labelled(ROWS[4:]))
    with_validation = root / "with_validation.yaml"
    with_validation.write_text(f"train: {train}\ntest: {test}\nvalidation: {validation}\n")
    train_only = root / "train_only.yaml"
    train_only.write_text(f"train: {train}\ntest: {test}\n")
    return {"pre": pretrained, "ft": finetuned, "texts": texts, "with_validation": str(with_validation),
            "train_only": str(train_only), "test": ROWS[:6]}


def _causal_lm(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _log_probs(model, text: str) -> tuple[list[int], torch.Tensor]:
    """The tokenizer's ids of ``text`` (BOS first) and the next-token log-probabilities at each position."""
    ids = tiny_tokenizer()(text)["input_ids"]
    with torch.no_grad():
        return ids, F.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)


def test_diagnose_with_texts_only_reports_next_token_confidence_and_shrinks_the_long_vector(llamas, tmp_path,
                                                                                            capsys):
    out = tmp_path / "diagnosis.json"
    assert main(["diagnose", "--pretrained", llamas["pre"], "--finetuned", *llamas["ft"],
                 "--unlabeled", llamas["texts"], "--json", str(out)]) == 0
    markdown = capsys.readouterr().out
    header = markdown.splitlines()[0]
    assert "mean max-prob" in header and "accuracy" not in header and "ECE" not in header
    report = json.loads(out.read_text())
    for row, path in zip(report["tasks"], llamas["ft"]):  # every non-padding position of every text
        probs = [_log_probs(_causal_lm(path), text)[1].exp() for text in TEXTS]
        expected = torch.cat([p.max(dim=-1).values for p in probs]).mean().item()
        assert row["mean_max_prob"] == pytest.approx(expected, rel=1e-5)
        assert row["num_classes"] == len(tiny_tokenizer()) and row["confidence_over"] == "text tokens"
        assert row["accuracy"] is None and "low_confidence" not in row["flags"]
    long, short = report["recommendations"][2], report["recommendations"][0]
    assert long["condition"] and long["kappa"] < 1 and "norm" in long["reasons"][0]
    assert not short["condition"] and short["kappa"] == 1.0
    assert any("next-token probability" in note for note in report["notes"])

    per_model = [llamas["texts"], llamas["texts"], _jsonl(tmp_path / "other.jsonl", [{"text": "the plot"}])]
    assert main(["diagnose", "--pretrained", llamas["pre"], "--finetuned", *llamas["ft"], "--unlabeled", *per_model,
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["tasks"]
    assert rows[0]["mean_max_prob"] == report["tasks"][0]["mean_max_prob"]
    assert rows[2]["mean_max_prob"] != report["tasks"][2]["mean_max_prob"]  # its own file
    assert main(["diagnose", "--pretrained", llamas["pre"], "--finetuned", *llamas["ft"],
                 "--unlabeled", llamas["texts"], llamas["texts"]]) == 2
    assert "--unlabeled gives 2 files for 3 models" in capsys.readouterr().err


def test_diagnose_names_the_split_accuracy_comes_from(llamas, tmp_path, capsys):
    out = tmp_path / "diagnosis.json"
    argv = ["diagnose", "--pretrained", llamas["pre"], "--finetuned", *llamas["ft"][:2], "--json", str(out)]
    assert main([*argv, "--data", llamas["with_validation"], llamas["with_validation"]]) == 0
    markdown = capsys.readouterr().out
    assert "| accuracy (validation) |" in markdown and "hold-out" not in markdown
    rows = json.loads(out.read_text())["tasks"]
    assert [row["accuracy_split"] for row in rows] == ["validation", "validation"]
    evaluated = tmp_path / "evaluate.json"  # the validation file itself
    assert main(["evaluate", "--pretrained", llamas["pre"], "--finetuned", llamas["ft"][0], "--data",
                 llamas["with_validation"], "--split", "validation", "--no-progress", "--json", str(evaluated)]) == 0
    assert rows[0]["accuracy"] == pytest.approx(json.loads(evaluated.read_text())["models"][0]["accuracy"])

    capsys.readouterr()
    assert main([*argv, "--data", llamas["with_validation"], llamas["train_only"]]) == 0
    markdown = capsys.readouterr().out
    assert "(validation) |" in markdown and "(hold-out of train) |" in markdown  # per cell when they differ
    report = json.loads(out.read_text())
    assert [row["accuracy_split"] for row in report["tasks"]] == ["validation", "hold-out of train"]
    (note,) = report["notes"]
    assert note.startswith(f"accuracy, acc. − conf. and ECE of {report['tasks'][1]['name']}: on a seeded hold-out")
    assert "Note: accuracy" in markdown


def test_evaluate_reports_gold_completion_and_text_perplexity_as_computed_by_hand(llamas, tmp_path, capsys):
    out = tmp_path / "evaluate.json"
    assert main(["evaluate", "--pretrained", llamas["pre"], "--finetuned", *llamas["ft"][:2],
                 "--data", llamas["train_only"], llamas["train_only"], "--text", llamas["texts"],
                 "--method", "task_arithmetic", "--alpha", "0.5", "--no-progress", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "Perplexity (gold completions)" in captured.out and f"Perplexity on {llamas['texts']}" in captured.out
    assert "batch/s" not in captured.err and "predict" not in captured.err  # --no-progress: no bars
    report = json.loads(out.read_text())
    for row, path in zip(report["models"], llamas["ft"]):
        model = _causal_lm(path)
        nll = 0.0
        for prompt, label in llamas["test"]:  # one-token label words: -log p(label | prompt)
            ids, log_probs = _log_probs(model, prompt)
            nll -= float(log_probs[-1, tiny_tokenizer().convert_tokens_to_ids(label)])
        assert row["perplexity"] == pytest.approx(math.exp(nll / len(llamas["test"])), rel=1e-5)
        nll, tokens = 0.0, 0
        for text in TEXTS:  # every token after the first, from the ones before it
            ids, log_probs = _log_probs(model, text)
            nll -= sum(float(log_probs[p, ids[p + 1]]) for p in range(len(ids) - 1))
            tokens += len(ids) - 1
        assert row["text_perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    merged = report["merged"]
    assert all(t["perplexity"] > 1 for t in merged["tasks"])
    assert len(set(merged["text_perplexity"].values())) == 1  # one merged model serves both tasks


def test_evaluate_shows_progress_unless_told_not_to(llamas, capsys):
    argv = ["evaluate", "--pretrained", llamas["pre"], "--finetuned", llamas["ft"][0], "--data", llamas["train_only"]]
    assert main(argv) == 0
    assert "predict" in capsys.readouterr().err
    assert main([*argv, "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "predict" not in captured.err and "perplexity (gold completions)" in captured.out


def test_evaluate_takes_causal_lms_alone_without_their_base_and_refuses_to_merge_them(llamas, tmp_path):
    out = tmp_path / "alone.json"
    specs = [llamas["train_only"]] * 2
    assert main(["evaluate", "--finetuned", *llamas["ft"][:2], "--data", *specs, "--no-progress",
                 "--json", str(out)]) == 0
    with_base = tmp_path / "with_base.json"
    assert main(["evaluate", "--pretrained", llamas["pre"], "--finetuned", *llamas["ft"][:2], "--data", *specs,
                 "--no-progress", "--json", str(with_base)]) == 0
    alone, based = (json.loads(p.read_text())["models"] for p in (out, with_base))
    assert [r["accuracy"] for r in alone] == [r["accuracy"] for r in based]
    assert [r["perplexity"] for r in alone] == pytest.approx([r["perplexity"] for r in based])
    assert main(["evaluate", "--finetuned", *llamas["ft"][:2], "--data", *specs, "--merged", str(tmp_path)]) == 2


def test_diagnose_reads_a_classifiers_confidence_on_unlabeled_texts_over_its_classes(tmp_path):
    """--unlabeled is not only for causal LMs: a sequence classifier with no task data gets its label-free
    confidence over its classes on the file's texts (and the low-confidence check by threshold)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from distac.models.text import create_random_encoder

    pretrained = create_random_encoder(tmp_path / "pre")
    tokenizer = AutoTokenizer.from_pretrained(pretrained)
    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_pretrained(pretrained, num_labels=3).eval()
    classifier.save_pretrained(tmp_path / "ft")
    tokenizer.save_pretrained(tmp_path / "ft")
    texts = _jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in TEXTS])
    out = tmp_path / "diagnosis.json"
    assert main(["diagnose", "--pretrained", pretrained, "--finetuned", str(tmp_path / "ft"), "--unlabeled", texts,
                 "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["tasks"]
    with torch.no_grad():
        logits = classifier(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    assert row["num_classes"] == 3 and row["confidence_over"] == "inputs"
    assert row["mean_max_prob"] == pytest.approx(torch.softmax(logits.double(), -1).max(-1).values.mean().item(),
                                                 rel=1e-4)
