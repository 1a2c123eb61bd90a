"""benchmarks.causal_lm.pretrain on a tiny corpus and a tiny Llama: the output loads with transformers' Auto
classes and generates, a matching fingerprint is reused, changed params retrain, bad inputs are named."""

from __future__ import annotations

import json
import random

import pytest
import torch

from benchmarks.causal_lm.pretrain import RECORD, PretrainParams, pretrain
from distac.errors import DistacError, OutputError

WORDS = "the a movie film plot story was is very not good bad fun dull and but cat dog sat on mat".split()


def corpus(count: int = 80, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(count)]


def tiny(**changes) -> PretrainParams:
    fields = dict(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_positions=32,
                  steps=3, batch_size=2, seq_len=32, holdout_fraction=0.1, log_every=1, progress=False, threads=1)
    return PretrainParams(**{**fields, **changes})


def record(path) -> dict:
    return json.loads((path / RECORD).read_text())


def test_output_loads_is_reused_and_retrains_on_changed_params(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "pretrained"
    texts = corpus()
    assert pretrain(str(out), tiny(), texts=texts) == str(out)
    first = record(out)
    assert first["steps_done"] == 3 and first["parameters"] > 0
    assert first["corpus"]["heldout_texts"] == 8 and first["corpus"]["train_texts"] == 72
    assert all(first[key] > 0 for key in ("heldout_perplexity", "unigram_perplexity", "final_train_loss"))

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.tie_word_embeddings and model.config.vocab_size == len(tokenizer)
    inputs = tokenizer("the movie", return_tensors="pt")
    assert inputs["input_ids"][0, 0] == tokenizer.bos_token_id
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(generated[0]), str)

    capsys.readouterr()
    weights_mtime = (out / "model.safetensors").stat().st_mtime_ns
    pretrain(str(out), tiny(log_every=2), texts=texts)  # a cosmetic field: still the same fingerprint
    assert capsys.readouterr().out.strip() == f"reused {out}"
    assert (out / "model.safetensors").stat().st_mtime_ns == weights_mtime
    assert record(out)["fingerprint"] == first["fingerprint"]

    pretrain(str(out), tiny(steps=4), texts=texts)
    second = record(out)
    assert "reused" not in capsys.readouterr().out
    assert second["fingerprint"] != first["fingerprint"] and second["steps_done"] == 4
    pretrain(str(out), tiny(steps=4), texts=texts[:-1])  # other data: retrained too
    assert record(out)["fingerprint"] != second["fingerprint"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pretrained"]  # no temp dirs left beside OUT


def test_same_inputs_give_the_same_files(tmp_path):
    texts = corpus()
    hashes = [record(tmp_path / name)["files_sha256"] for name in ("a", "b")
              if pretrain(str(tmp_path / name), tiny(), texts=texts)]
    assert hashes[0] == hashes[1]


def test_missing_glue_dir_and_foreign_output_are_refused(tmp_path):
    missing = tmp_path / "no-glue"
    with pytest.raises(DistacError, match="no-glue"):
        pretrain(str(tmp_path / "out"), tiny(glue_dir=str(missing)))
    incomplete = tmp_path / "glue"
    (incomplete / "CoLA").mkdir(parents=True)
    with pytest.raises(DistacError, match="CoLA/train.tsv"):
        pretrain(str(tmp_path / "out"), tiny(glue_dir=str(incomplete)))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="foreign"):
        pretrain(str(foreign), tiny(), texts=corpus())
    assert (foreign / "notes.txt").read_text() == "mine"


def test_the_generation_benchmark_asks_the_pipeline_for_its_failure_modes():
    from benchmarks.causal_lm.glue_generation import (BASE_LR, LABEL_SMOOTHING, LR_FACTOR, SETTINGS,
                                                      benchmark_params, lifts, setting_root)
    from distac.pipeline import parse_params

    for setting, spec in SETTINGS.items():
        raw = benchmark_params(setting)
        params = parse_params(raw, source=setting)
        assert params.model.kind == "hf_causal_lm" and params.merge.variants == ["as-is", "distac"]
        assert raw["storage"]["root"] == setting_root(setting) not in raw["storage"]["reuse"]
        for task in params.task_names:  # each changed recipe is what the setting says, the others the base one
            changed, recipe = spec["recipes"].get(task, {}), params.recipe(task)
            assert recipe.lr == pytest.approx(BASE_LR * (LR_FACTOR if "lr" in changed else 1))
            assert recipe.label_smoothing == (LABEL_SMOOTHING if "label_smoothing" in changed else 0.0)
    both = parse_params(benchmark_params("both"), source="both")
    assert both.recipe("sst2").lr >= 3 * BASE_LR and both.recipe("mrpc").label_smoothing > 0  # the two modes
    rows = [{"method": "ties", "variant": v, "a_norm": a, "b_norm": b, "mean_norm": (a + b) / 2,
             "mean_abs": (a + b) / 2} for v, a, b in (("as-is", 90.0, 40.0), ("distac", 80.0, 70.0))]
    assert lifts(rows, ["a", "b"]) == {"ties": {"mean_norm": 10.0, "worst_norm": 30.0, "mean_abs": 10.0}}
