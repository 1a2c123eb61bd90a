"""Causal LMs as a model kind: candidate scoring, token-level DisTaC, SFT loss, tied embeddings, tokenizer checks.

Tiny random GPT-2 and Llama configs are built in the test (tests/causal_helpers.py); nothing downloads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from causal_helpers import WORDS, make_family, save_causal_lm, tiny_causal_lm, tiny_tokenizer
from distac.conditioning import DistacConfig, condition, distillation_loss, prediction_stats
from distac.data.examples import TaskData, TextExample
from distac.errors import CheckpointError, ConfigError, DistacError, MismatchError
from distac.evaluation import completion_perplexity, evaluate_task, predict_logits
from distac.models.resolve import backbone_checkpoint, load_model, model_family, paired_backbones
from distac.training import FinetuneRecipe, finetune
from distac.vectors import TaskVector

EXAMPLES = [TextExample("the movie was", None, 0), TextExample("a story and the plot", None, 1),
            TextExample("the cat sat on the mat", None, 0)]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def family(request, tmp_path_factory):
    return make_family(tmp_path_factory.mktemp(request.param), request.param, tie=True)


def _hand_log_likelihood(model, tokenizer, prompt: str, completion: str) -> float:
    """log P(completion | prompt) from one plain forward pass over the concatenated ids."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        log_probs = F.log_softmax(model(ids).logits[0].float(), dim=-1)
    return sum(float(log_probs[len(prompt_ids) - 1 + j, token]) for j, token in enumerate(completion_ids))


def test_candidates_are_scored_by_their_log_likelihood_after_the_prompt(family):
    pretrained, (finetuned, _) = family
    loaded = load_model(finetuned, pretrained, class_names=["good", "bad film"])
    scores = predict_logits(loaded.model, EXAMPLES, loaded.adapter.collate, batch_size=2)
    backbone = loaded.model.backbone
    for row, example in enumerate(EXAMPLES):
        for column, name in enumerate(["good", "bad film"]):
            expected = _hand_log_likelihood(backbone, loaded.adapter.tokenizer, example.text_a, " " + name)
            assert scores[row, column].item() == pytest.approx(expected, abs=1e-5)


def test_single_token_candidates_take_the_one_pass_route_and_agree(family):
    pretrained, (finetuned, _) = family
    loaded = load_model(finetuned, pretrained, class_names=["yes", "no"])
    scores = predict_logits(loaded.model, EXAMPLES, loaded.adapter.collate)
    for row, example in enumerate(EXAMPLES):
        expected = _hand_log_likelihood(loaded.model.backbone, loaded.adapter.tokenizer, example.text_a, " no")
        assert scores[row, 1].item() == pytest.approx(expected, abs=1e-5)


def test_sft_loss_is_cross_entropy_on_the_completion_tokens_only(family):
    pretrained, (finetuned, _) = family
    loaded = load_model(finetuned, pretrained, class_names=["good", "bad film"])
    inputs = loaded.adapter.collate(EXAMPLES)
    labels = torch.tensor([0, 1, 1])
    lengths = {0: 1, 1: 2}
    expected_nll = -sum(_hand_log_likelihood(loaded.model.backbone, loaded.adapter.tokenizer, e.text_a,
                                             " " + ["good", "bad film"][int(y)]) for e, y in zip(EXAMPLES, labels))
    tokens = sum(lengths[int(y)] for y in labels)
    assert loaded.model.supervised_loss(inputs, labels).item() == pytest.approx(expected_nll / tokens, abs=1e-5)
    labeled = [TextExample(e.text_a, None, int(y)) for e, y in zip(EXAMPLES, labels)]
    assert completion_perplexity(loaded.model, labeled, loaded.adapter.collate) == pytest.approx(
        math.exp(expected_nll / tokens), rel=1e-5)


def test_token_level_kd_loss_equals_the_hand_computed_sum_over_non_padding_positions():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    t_tcr, t_stu = 2.0, 4.0
    total = 0.0
    for b in range(2):
        for p in range(3):
            if mask[b, p]:
                q = torch.softmax(teacher[b, p] / t_tcr, -1)
                log_s = torch.log_softmax(student[b, p] / t_stu, -1)
                total += float((q * (q.log() - log_s)).sum())
    expected = t_tcr * t_stu * total / 2
    assert distillation_loss(student, teacher, t_tcr, t_stu, mask).item() == pytest.approx(expected, rel=1e-6)
    max_prob, _ = prediction_stats(student, mask)
    assert max_prob == pytest.approx(float(torch.softmax(student, -1).max(-1).values[mask].mean()), rel=1e-6)


@pytest.mark.parametrize("tie", [True, False])
def test_a_tied_lm_head_is_one_tensor_and_an_untied_one_is_two(tmp_path, tie):
    pretrained, (finetuned, _) = make_family(tmp_path, "llama", tie=tie)
    view = backbone_checkpoint(finetuned)
    assert ("lm_head.weight" in view) is (not tie)
    loaded = load_model(finetuned, pretrained, class_names=["yes", "no"])
    assert set(loaded.model.backbone_state()) == set(view)
    vector = TaskVector.from_state_dicts(loaded.adapter.pretrained_backbone_state(), loaded.model.backbone_state())
    if tie:  # the output layer is the embedding: conditioning it moves both
        backbone = loaded.model.backbone
        assert backbone.lm_head.weight.data_ptr() == backbone.model.embed_tokens.weight.data_ptr()
        loaded.model.load_backbone((vector * 2.0).apply_to(loaded.adapter.pretrained_backbone_state()))
        assert torch.equal(backbone.lm_head.weight, backbone.model.embed_tokens.weight)


def test_a_different_vocabulary_is_refused_naming_both_tokenizer_files(tmp_path):
    pretrained = save_causal_lm(tiny_causal_lm("llama"), tmp_path / "pre")
    other = tiny_tokenizer(list(WORDS[:-1]) + ["zebra"])  # same size, one token differs
    other_dir = save_causal_lm(tiny_causal_lm("llama", seed=3), tmp_path / "other", tokenizer=other)
    with pytest.raises(MismatchError) as error:
        paired_backbones(pretrained, [other_dir])
    message = str(error.value)
    assert f"{tmp_path}/other/tokenizer.json" in message and f"{tmp_path}/pre/tokenizer.json" in message


def test_a_causal_lm_is_its_own_family_and_other_heads_are_refused(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    pretrained, (finetuned, _) = make_family(tmp_path, "gpt2")
    assert model_family(finetuned) == "hf_causal_lm"
    masked = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=32))
    save_causal_lm(masked, tmp_path / "mlm")
    with pytest.raises(CheckpointError, match=r"mlm/config.json: architecture 'BertForMaskedLM'.*supports"):
        load_model(str(tmp_path / "mlm"))


def test_distac_on_a_causal_lm_shrinks_the_vector_and_distils_token_by_token(family):
    pretrained, (_, finetuned) = family
    loaded = load_model(finetuned, pretrained, class_names=["yes", "no"])
    pre = loaded.adapter.pretrained_backbone_state()
    vector = TaskVector.from_state_dicts(pre, loaded.model.backbone_state())
    texts = [TextExample(" ".join(WORDS[i:i + 6]), None, None) for i in range(0, 24, 3)]
    config = DistacConfig(kappa=0.5, steps=4, batch_size=len(texts), lr=1e-4, beta=0.0, log_every=1)
    result = condition(loaded.model, pre, vector, texts, loaded.adapter.collate, config, progress=False)
    assert result.kappa == 0.5 and result.anchor_norm == pytest.approx(0.5 * vector.norm(), rel=1e-6)
    assert result.teacher_cache_hits == 0 and result.teacher_forward_passes == 4  # recomputed per batch
    assert set(result.vector) == set(vector)
    losses = [h["kd_loss"] for h in result.history]  # every step sees the whole set: the KD loss falls
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0]
    assert 0 <= result.history[-1]["teacher_agreement"] <= 1


def test_fine_tuning_a_causal_lm_learns_its_label_words(tmp_path):
    from distac.models import build_adapter

    pretrained = save_causal_lm(tiny_causal_lm("llama"), tmp_path / "pre")
    adapter = build_adapter({"kind": "hf_causal_lm", "name_or_path": pretrained, "template": "{text_a} answer:"})
    train = [TextExample(f"the movie was {w}", None, int(w in ("bad", "awful", "boring")))
             for w in ("good", "bad", "great", "awful", "fun", "boring") * 4]
    data = TaskData("sentiment", train, train[:6], train[:6], 2, ["positive", "negative"])
    result = finetune(adapter, data, FinetuneRecipe(lr=3e-3, steps=30, batch_size=8, warmup_fraction=0.0),
                      progress=False)
    assert result.history[-1]["loss"] < result.history[0]["loss"] / 2
    assert evaluate_task(result.model, train[:6], adapter.collate).accuracy == 1.0
    with pytest.raises(DistacError, match="mixup_alpha"):
        finetune(adapter, data, FinetuneRecipe(steps=1, mixup_alpha=0.2), progress=False)


def test_scoring_needs_completions(family):
    pretrained, (finetuned, _) = family
    loaded = load_model(finetuned, pretrained)
    with pytest.raises(ConfigError, match="completions"):
        predict_logits(loaded.model, EXAMPLES, loaded.adapter.collate)


def test_commands_refuse_a_checkpoint_without_a_head_they_can_serve_before_any_work(tmp_path, capsys):
    from distac.cli import main
    from distac.models.text import create_random_encoder

    pretrained = create_random_encoder(tmp_path / "pre")
    bare = create_random_encoder(tmp_path / "bare", seed=1)  # a BertModel: no classification or LM head
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "a good film"}\n{"text": "a bad film"}\n')
    for argv in (["condition", "--pretrained", pretrained, "--finetuned", bare, "--unlabeled", str(texts),
                  "--kappa", "0.5", "--out", str(tmp_path / "out")],
                 ["evaluate", "--pretrained", pretrained, "--finetuned", bare, "--data", "sst2"]):
        assert main(argv) == 2
        error = capsys.readouterr().err
        assert f"{bare}/config.json: architecture 'BertModel' has no trained classification head" in error
        assert "supports" in error
    assert not (tmp_path / "out").exists()
