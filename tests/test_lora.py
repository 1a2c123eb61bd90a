"""LoRA / PEFT adapters as fine-tuned models: ΔW = s·B·A read tensor by tensor equals peft's merge_and_unload();
merges, evaluate and diagnose take adapter directories; ``distac merge --out-format lora`` writes adapters peft
loads. Tiny random models built here; nothing is downloaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from causal_helpers import save_causal_lm, tiny_causal_lm
from distac.cli import main
from distac.errors import CheckpointError, MismatchError
from distac.models.resolve import backbone_checkpoint, load_model, model_form, paired_backbones

peft = pytest.importorskip("peft")

TEXTS = ["a good film", "a bad film , awful acting", "fine plot"]


def _perturb_lora(model, seed: int, std: float = 0.2) -> None:
    """LoRA starts at ΔW = 0 (B = 0; an embedding's A = 0): draw them, and move the stored modules."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "lora_embedding" in name or "modules_to_save" in name:
                parameter.add_(std * torch.randn(parameter.shape, generator=generator))


def _bert_adapter(pretrained: str, path: Path, seed: int, num_labels: int, **options) -> tuple[str, dict]:
    """A LoRA adapter of a BertForSequenceClassification on ``pretrained`` (classifier in modules_to_save), and
    the state dict peft's merge_and_unload() gives."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(pretrained, num_labels=num_labels)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], modules_to_save=["classifier"],
                        task_type="SEQ_CLS", **options)
    wrapped = get_peft_model(model, config)
    _perturb_lora(wrapped, seed)
    wrapped.save_pretrained(path)
    merged = wrapped.merge_and_unload().eval()
    return str(path), {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """θ_pre (a tiny random BertModel with a tokenizer) and two classifier adapters (3 and 2 labels)."""
    from distac.models.text import create_random_encoder

    base = tmp_path_factory.mktemp("lora-bert")
    pretrained = create_random_encoder(base / "pre")
    adapters, merged = [], []
    for task, (labels, options) in enumerate(((3, {}), (2, {"use_rslora": True, "alpha_pattern": {"value": 2}}))):
        path, state = _bert_adapter(pretrained, base / f"adapter{task}", task + 1, labels, **options)
        adapters.append(path)
        merged.append(state)
    return {"pre": pretrained, "adapters": adapters, "merged": merged, "base": base}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """θ_pre (a tiny Llama, untied head) and two adapters, one on the embedding with a stored norm."""
    from peft import LoraConfig, get_peft_model

    base = tmp_path_factory.mktemp("lora-llama")
    pretrained = save_causal_lm(tiny_causal_lm("llama", tie=False), base / "pre")
    adapters, merged = [], []
    options = ({"target_modules": ["q_proj", "v_proj", "embed_tokens"], "modules_to_save": ["norm"]},
               {"target_modules": ["q_proj", "k_proj", "o_proj", "down_proj", "lm_head"], "lora_bias": False})
    for task, extra in enumerate(options):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(pretrained)
        wrapped = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, task_type="CAUSAL_LM", **extra))
        _perturb_lora(wrapped, task + 7)
        wrapped.save_pretrained(base / f"adapter{task}")
        adapters.append(str(base / f"adapter{task}"))
        merged.append({k: v.detach().clone() for k, v in wrapped.merge_and_unload().state_dict().items()})
    return {"pre": pretrained, "adapters": adapters, "merged": merged, "base": base}


# --------------------------------------------------------------------------------------------- ΔW


def _check_delta(pretrained: str, adapter: str, merged: dict, prefix: str) -> int:
    pre, (view,) = paired_backbones(pretrained, [adapter])
    base = backbone_checkpoint(pretrained)
    moved = 0
    for key in view:
        expected = merged[prefix + key].float() - base[key].float()
        actual = view[key].float() - pre[key].float()
        assert torch.allclose(actual, expected, atol=1e-6, rtol=0), key
        moved += bool(expected.abs().max() > 0)
    return moved


def test_delta_of_a_classifier_adapter_is_merge_and_unload_minus_the_base(bert):
    assert model_form(bert["adapters"][0]) == "lora"
    for adapter, merged in zip(bert["adapters"], bert["merged"]):
        moved = _check_delta(bert["pre"], adapter, merged, "bert.")
        assert moved == 2 * 5  # query, value and three dense layers in each of the two layers
    view = paired_backbones(bert["pre"], bert["adapters"][:1])[1][0]
    assert not any(key.startswith("pooler.") for key in view)  # the pooler is the head's


def test_delta_of_causal_lm_adapters_is_merge_and_unload_minus_the_base(llama):
    moved = [_check_delta(llama["pre"], adapter, merged, "") for adapter, merged in zip(llama["adapters"],
                                                                                         llama["merged"])]
    assert moved[0] == 2 * 2 + 1 + 2 * 2 + 1  # q, v per layer, the embedding, the stored norms
    assert moved[1] == 4 * 2 + 1  # four projections per layer and lm_head


def test_delta_of_a_conv1d_adapter_is_merge_and_unload_minus_the_base(tmp_path):
    """GPT-2's Conv1D weights are [in, out]: peft's fan_in_fan_out transposes B·A."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    pretrained = save_causal_lm(tiny_causal_lm("gpt2"), tmp_path / "pre")
    wrapped = get_peft_model(AutoModelForCausalLM.from_pretrained(pretrained),
                             LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                        task_type="CAUSAL_LM"))
    _perturb_lora(wrapped, 3)
    wrapped.save_pretrained(tmp_path / "adapter")
    merged = {k: v.detach() for k, v in wrapped.merge_and_unload().state_dict().items()}
    assert _check_delta(pretrained, str(tmp_path / "adapter"), merged, "") == 2 * 2


def test_an_adapter_is_served_as_peft_serves_it(bert, llama):
    from transformers import AutoModelForSequenceClassification

    from distac.evaluation import predict_logits
    from distac.data import TextExample

    loaded = load_model(bert["adapters"][0], bert["pre"])
    assert loaded.meta["num_classes"] == 3 and loaded.meta["extra"]["form"] == "lora"
    reference = AutoModelForSequenceClassification.from_pretrained(bert["pre"], num_labels=3).eval()
    reference.load_state_dict(bert["merged"][0])
    examples = [TextExample(text, None, 0) for text in TEXTS]
    inputs = loaded.adapter.collate(examples)
    with torch.no_grad():
        expected = reference(**inputs).logits
    assert torch.allclose(predict_logits(loaded.model, examples, loaded.adapter.collate), expected, atol=1e-5)
    causal = load_model(llama["adapters"][1], llama["pre"])
    state = causal.model.backbone.state_dict()
    for key, value in llama["merged"][1].items():
        assert torch.allclose(state[key], value, atol=1e-6), key


def test_bad_adapters_are_refused_naming_the_file(bert, llama, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(Path(bert["adapters"][0], "adapter_config.json").read_text())
    with pytest.raises(CheckpointError, match="no adapter weights"):
        paired_backbones(bert["pre"], [str(broken)])
    with pytest.raises(MismatchError, match="adapter_config.json adapts a sequence classifier"):
        paired_backbones(llama["pre"], [bert["adapters"][0]])
    with pytest.raises(MismatchError, match="adapts a causal language model.*is a base model"):
        paired_backbones(bert["pre"], [llama["adapters"][0]])
    untyped = tmp_path / "untyped"  # no task type: the tensor names tell
    shutil.copytree(llama["adapters"][0], untyped)
    config = json.loads((untyped / "adapter_config.json").read_text())
    (untyped / "adapter_config.json").write_text(json.dumps({**config, "task_type": None, "auto_mapping": None}))
    with pytest.raises(MismatchError, match="adapter_model.safetensors: 'model.embed_tokens.weight' is not in the "
                                            "pretrained model"):
        paired_backbones(bert["pre"], [str(untyped)])
    dora = tmp_path / "dora"
    dora.mkdir()
    config = json.loads(Path(bert["adapters"][0], "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CheckpointError, match="DoRA"):
        paired_backbones(bert["pre"], [str(dora)])


# --------------------------------------------------------------------------------------------- the CLI


def _merge(pretrained: str, finetuned: list[str], out: Path, *extra: str) -> dict:
    assert main(["merge", "--method", "task_arithmetic", "--alpha", "0.7", "--pretrained", pretrained,
                 "--finetuned", *finetuned, "--out", str(out), "--no-progress", *extra]) == 0
    return json.loads((out / "merge.json").read_text())


def _expected_vector(pretrained: str, finetuned: list[str], alpha: float = 0.7) -> dict[str, torch.Tensor]:
    pre, views = paired_backbones(pretrained, finetuned)
    return {key: alpha * sum(view[key].float() - pre[key].float() for view in views) for key in pre}


def test_cli_merges_adapters(bert, tmp_path):
    from distac.merging.streaming import load_merged

    record = _merge(bert["pre"], bert["adapters"], tmp_path / "merged")
    assert record["inputs"]["finetuned"] == bert["adapters"] and record["outputs"]["model"] == "model"
    merged = load_merged(str(tmp_path / "merged")).vector
    expected = _expected_vector(bert["pre"], bert["adapters"])
    assert set(merged) == set(expected)
    for key, value in expected.items():
        assert torch.allclose(merged[key].float(), value, atol=1e-6), key


def test_a_merge_of_causal_lm_adapters_loads_with_from_pretrained(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    record = _merge(llama["pre"], llama["adapters"], tmp_path / "merged")
    assert record["export"] == "causal_lm" and record["outputs"]["model"] == "."
    assert [len(source["files"] or []) for source in record["sources"]] == [1, 1, 1]  # adapters' sha256 too
    state = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).state_dict()
    base = backbone_checkpoint(llama["pre"])
    for key, delta in _expected_vector(llama["pre"], llama["adapters"]).items():
        assert torch.allclose(state[key].float() - base[key].float(), delta, atol=1e-6), key


def test_evaluate_and_diagnose_take_an_adapter(bert, tmp_path):
    rows = [("a good film", "pos"), ("a bad film", "neg"), ("fine plot", "mid")] * 4
    for split in ("train", "test"):
        (tmp_path / f"{split}.csv").write_text("review,stars\n" + "".join(f"{t},{s}\n" for t, s in rows))
    spec = tmp_path / "reviews.yaml"
    spec.write_text(f"train: {tmp_path / 'train.csv'}\ntest: {tmp_path / 'test.csv'}\ntext: review\nlabel: stars\n")
    assert main(["evaluate", "--finetuned", bert["adapters"][0], "--pretrained", bert["pre"], "--data", str(spec),
                 "--json", str(tmp_path / "eval.json")]) == 0
    accuracy = json.loads((tmp_path / "eval.json").read_text())["models"][0]["accuracy"]
    assert 0.0 <= accuracy <= 1.0
    two = tmp_path / "polarity.csv"  # the second adapter's task has two classes
    two.write_text("review,stars\n" + "".join(f"{t},{s}\n" for t, s in rows if s != "mid"))
    polarity = tmp_path / "polarity.yaml"
    polarity.write_text(f"train: {two}\ntest: {two}\ntext: review\nlabel: stars\n")
    _merge(bert["pre"], bert["adapters"], tmp_path / "merged")
    assert main(["evaluate", "--finetuned", *bert["adapters"], "--pretrained", bert["pre"], "--data", str(spec),
                 str(polarity), "--merged", str(tmp_path / "merged"), "--json", str(tmp_path / "merged.json")]) == 0
    merged = json.loads((tmp_path / "merged.json").read_text())["merged"]
    assert merged["alpha"] == 0.7 and len(merged["tasks"]) == 2
    assert main(["diagnose", "--pretrained", bert["pre"], "--finetuned", *bert["adapters"], "--names", "a", "b",
                 "--json", str(tmp_path / "diag.json")]) == 0
    norms = {row["name"]: row["norm"] for row in json.loads((tmp_path / "diag.json").read_text())["tasks"]}
    view = paired_backbones(bert["pre"], bert["adapters"][:1])[1][0]
    assert norms["a"] == pytest.approx(float(torch.sqrt(sum((view.delta(k) ** 2).sum() for k in view))), rel=1e-4)


def test_condition_takes_an_adapter(bert, tmp_path):
    unlabeled = tmp_path / "unlabeled.csv"
    unlabeled.write_text("text\n" + "".join(f"\"{t}\"\n" for t in TEXTS * 3))
    out = tmp_path / "conditioned"
    assert main(["condition", "--pretrained", bert["pre"], "--finetuned", bert["adapters"][0], "--out", str(out),
                 "--unlabeled", str(unlabeled), "--steps", "2", "--batch-size", "4", "--kappa", "0.5",
                 "--no-progress"]) == 0
    history = json.loads((out / "history.json").read_text())
    view = paired_backbones(bert["pre"], bert["adapters"][:1])[1][0]
    norm = float(torch.sqrt(sum((view.delta(k) ** 2).sum() for k in view)))
    assert history["original_norm"] == pytest.approx(norm, rel=1e-4)
    assert (out / "model" / "meta.json").exists()


def _peft_merged(model, adapter: str) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def test_lora_output_at_full_rank_reproduces_the_merge_in_peft(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    record = _merge(llama["pre"], llama["adapters"], tmp_path / "lora", "--out-format", "lora", "--rank", "32")
    lora = record["outputs"]["lora"]
    assert lora["adapters"] == ["."] and lora["max_relative_error"] < 1e-5
    report = json.loads((tmp_path / "lora" / "lora_report.json").read_text())["per_tensor"]
    assert report["model.norm.weight"]["stored"] == "modules_to_save"
    assert report["model.layers.0.self_attn.q_proj.weight"]["rank"] == 32
    expected = _expected_vector(llama["pre"], llama["adapters"])
    base = backbone_checkpoint(llama["pre"])
    state = _peft_merged(AutoModelForCausalLM.from_pretrained(llama["pre"]), str(tmp_path / "lora"))
    for key, delta in expected.items():
        assert torch.allclose(state[key].float() - base[key].float(), delta, atol=1e-5), key
    assert model_form(str(tmp_path / "lora")) == "lora"  # the merged adapter is a fine-tuned model in turn
    _check_delta(llama["pre"], str(tmp_path / "lora"), state, "")


def test_lora_output_at_low_rank_reports_its_error(llama, tmp_path, capsys):
    record = _merge(llama["pre"], llama["adapters"], tmp_path / "low", "--out-format", "lora", "--rank", "1")
    report = json.loads((tmp_path / "low" / "lora_report.json").read_text())["per_tensor"]
    expected = _expected_vector(llama["pre"], llama["adapters"])
    key = "model.layers.0.self_attn.q_proj.weight"  # rank 2 + rank 2: a rank-1 copy loses some
    u, s, vh = torch.linalg.svd(expected[key])
    assert report[key]["relative_error"] == pytest.approx(float(s[1:].norm() / s.norm()), rel=1e-4)
    assert record["outputs"]["lora"]["max_relative_error"] > 0.01
    base = ["merge", "--method", "task_arithmetic", "--pretrained", llama["pre"], "--finetuned", *llama["adapters"],
            "--no-progress", "--out-format", "lora"]
    assert main([*base, "--out", str(tmp_path / "big"), "--rank", "100"]) == 2
    assert "--rank 100 is larger than any weight matrix's full rank (the largest is 32" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "none")]) == 2
    assert "--out-format lora needs --rank R" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "emr"), "--rank", "2", "--method", "emr"]) == 2
    assert "cannot be written as one LoRA adapter" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("big", "none", "emr"))


def test_classifier_lora_output_carries_each_task_head(bert, tmp_path):
    """An adapter and a plain fine-tune (every tensor moved: embeddings, LayerNorms, biases) merged into one
    adapter per task, each with its task's classifier."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(5)
    plain = AutoModelForSequenceClassification.from_pretrained(bert["pre"], num_labels=2)
    with torch.no_grad():
        for parameter in plain.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    plain.save_pretrained(tmp_path / "plain")
    AutoTokenizer.from_pretrained(bert["pre"]).save_pretrained(tmp_path / "plain")
    finetuned = [bert["adapters"][0], str(tmp_path / "plain")]
    record = _merge(bert["pre"], finetuned, tmp_path / "lora", "--out-format", "lora", "--rank", "32")
    lora = record["outputs"]["lora"]
    assert lora["adapters"] == ["task-0", "task-1"] and lora["max_relative_error"] < 1e-5
    assert "bert.embeddings.LayerNorm" in lora["modules_to_save"]
    expected = _expected_vector(bert["pre"], finetuned)
    base = backbone_checkpoint(bert["pre"])
    heads = [bert["merged"][0], {k: v for k, v in plain.state_dict().items()}]
    for task, labels in enumerate((3, 2)):
        model = AutoModelForSequenceClassification.from_pretrained(bert["pre"], num_labels=labels)
        state = _peft_merged(model, str(tmp_path / "lora" / f"task-{task}"))
        for key, delta in expected.items():
            assert torch.allclose(state["bert." + key].float() - base[key].float(), delta, atol=1e-5), key
        for key in ("classifier.weight", "classifier.bias", "bert.pooler.dense.weight"):
            assert torch.allclose(state[key], heads[task][key], atol=1e-6), (task, key)


def test_a_causal_lm_adapter_is_scored_on_its_task_like_its_merged_model(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    rows = [("a good film", "good"), ("a bad film", "bad"), ("fine plot", "good"), ("awful acting", "bad")] * 2
    data = tmp_path / "films.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    spec = tmp_path / "films.yaml"
    spec.write_text(f"train: {data}\ntest: {data}\n")
    model = AutoModelForCausalLM.from_pretrained(llama["pre"])
    model.load_state_dict(llama["merged"][1])
    unloaded = save_causal_lm(model, tmp_path / "unloaded")  # what merge_and_unload() gives, as a checkpoint
    reports = []
    for name, source in (("adapter", llama["adapters"][1]), ("unloaded", unloaded)):
        assert main(["evaluate", "--pretrained", llama["pre"], "--finetuned", source, "--data", str(spec),
                     "--template", "{text_a} :", "--no-progress", "--json", str(tmp_path / f"{name}.json")]) == 0
        reports.append(json.loads((tmp_path / f"{name}.json").read_text())["models"][0])
    assert reports[0]["accuracy"] == reports[1]["accuracy"]
    assert reports[0]["perplexity"] == pytest.approx(reports[1]["perplexity"], rel=1e-5)
