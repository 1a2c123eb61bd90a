"""TaskVector: construction, arithmetic, geometry, storage and the errors bad input gets."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distac import io
from distac.errors import MismatchError, NonFiniteError
from distac.vectors import LastKeyCache, LazyTaskVector, TaskVector, all_finite, select_keys
from helpers import CountingReader


@pytest.fixture
def pretrained():
    return {"a.weight": torch.zeros(2, 2), "a.bias": torch.ones(2), "pos": torch.arange(3)}


@pytest.fixture
def finetuned():
    return {"a.weight": torch.tensor([[3.0, 0.0], [0.0, 4.0]]), "a.bias": torch.ones(2), "pos": torch.arange(3)}


def test_from_state_dicts_takes_floating_differences(pretrained, finetuned):
    tv = TaskVector.from_state_dicts(pretrained, finetuned)
    assert sorted(tv) == ["a.bias", "a.weight"]  # integer buffers are not part of a task vector
    assert torch.equal(tv["a.weight"], torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
    assert tv.norm() == 5.0


def test_include_and_exclude_are_regexes(pretrained, finetuned):
    assert list(TaskVector.from_state_dicts(pretrained, finetuned, include=[r"\.weight$"])) == ["a.weight"]
    assert list(TaskVector.from_state_dicts(pretrained, finetuned, exclude=["weight"])) == ["a.bias"]
    assert select_keys(["x.w", "y.w", "y.b"], include=["^y"], exclude=["b$"]) == ["y.w"]


def test_arithmetic_and_geometry():
    u = TaskVector({"w": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0])})
    v = TaskVector({"w": torch.tensor([0.0, 2.0]), "b": torch.tensor([0.0])})
    assert torch.equal((u + v)["w"], torch.tensor([1.0, 2.0]))
    assert torch.equal((u - v)["w"], torch.tensor([1.0, -2.0]))
    assert torch.equal((2 * u)["w"], torch.tensor([2.0, 0.0]))
    assert torch.equal((u * 0.5)["w"], torch.tensor([0.5, 0.0]))
    assert torch.equal((-u)["w"], torch.tensor([-1.0, 0.0]))
    assert u.cosine(v) == 0.0 and u.cosine(u) == pytest.approx(1.0)
    assert (u + v).norm() == pytest.approx(math.sqrt(5))


def test_is_immutable():
    tv = TaskVector({"w": torch.ones(1)})
    with pytest.raises(AttributeError):
        tv.extra = 1
    with pytest.raises(TypeError):
        tv["w"] = torch.zeros(1)


def test_apply_to_adds_scaled_vector_and_keeps_other_entries(pretrained, finetuned):
    tv = TaskVector.from_state_dicts(pretrained, finetuned)
    applied = tv.apply_to(pretrained, alpha=0.5)
    assert torch.equal(applied["a.weight"], torch.tensor([[1.5, 0.0], [0.0, 2.0]]))
    assert applied["pos"] is pretrained["pos"]
    full = tv.apply_to(pretrained)
    assert all(torch.equal(full[k], finetuned[k]) for k in finetuned)


@pytest.mark.parametrize("suffix", ["tv.safetensors", "tv_dir", "tv.pt"])
def test_save_load_round_trip(tmp_path, suffix):
    tv = TaskVector({"w": torch.randn(3, 3), "b": torch.randn(3, dtype=torch.float64)})
    tv.save(tmp_path / suffix)
    back = TaskVector.load(tmp_path / suffix)
    assert all(torch.equal(back[k], tv[k]) and back[k].dtype == tv[k].dtype for k in tv)


def test_from_checkpoints_reads_any_format(tmp_path, pretrained, finetuned):
    io.save_state_dict(pretrained, tmp_path / "pre.safetensors")
    io.save_state_dict(finetuned, tmp_path / "ft", max_shard_bytes=16)
    tv = TaskVector.from_checkpoints(tmp_path / "pre.safetensors", tmp_path / "ft")
    assert tv.norm() == 5.0


def test_mismatched_keys_are_named(pretrained, finetuned):
    del finetuned["a.bias"]
    with pytest.raises(MismatchError, match="a.bias"):
        TaskVector.from_state_dicts(pretrained, finetuned)


def test_mismatched_shape_and_dtype_are_named(pretrained, finetuned):
    with pytest.raises(MismatchError, match="'a.weight'.*shape"):
        TaskVector.from_state_dicts(pretrained, {**finetuned, "a.weight": torch.zeros(2, 3)})
    with pytest.raises(MismatchError, match="'a.bias'.*dtype"):
        TaskVector.from_state_dicts(pretrained, {**finetuned, "a.bias": torch.ones(2, dtype=torch.float16)})
    u = TaskVector({"w": torch.ones(2)})
    with pytest.raises(MismatchError, match="'w'"):
        u + TaskVector({"w": torch.ones(3)})
    with pytest.raises(MismatchError, match="different tensors"):
        u + TaskVector({"v": torch.ones(2)})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_named(pretrained, finetuned, bad):
    finetuned["a.weight"][0, 1] = bad
    with pytest.raises(NonFiniteError, match="'a.weight'.*fine-tuned"):
        TaskVector.from_state_dicts(pretrained, finetuned)
    with pytest.raises(NonFiniteError, match="'w'"):
        TaskVector({"w": torch.tensor([bad])})


def test_non_floating_entries_are_refused():
    with pytest.raises(TypeError, match="'ids'.*floating"):
        TaskVector({"ids": torch.arange(3)})
    with pytest.raises(TypeError, match="finite number"):
        TaskVector({"w": torch.ones(1)}) * float("nan")


def test_lazy_task_vector_matches_eager(tmp_path, pretrained, finetuned):
    io.save_state_dict(pretrained, tmp_path / "pre")
    io.save_state_dict(finetuned, tmp_path / "ft")
    lazy = LazyTaskVector.from_checkpoints(tmp_path / "pre", tmp_path / "ft")
    eager = TaskVector.from_state_dicts(pretrained, finetuned)
    assert sorted(lazy) == sorted(eager) and "pos" not in lazy
    assert all(torch.equal(lazy[k], eager[k]) for k in eager)


def test_lazy_task_vector_checks_shapes_before_any_read(tmp_path, pretrained, finetuned):
    io.save_state_dict(pretrained, tmp_path / "pre")
    io.save_state_dict({**finetuned, "a.bias": torch.ones(5)}, tmp_path / "ft")
    with pytest.raises(MismatchError, match="'a.bias'"):
        LazyTaskVector.from_checkpoints(tmp_path / "pre", tmp_path / "ft")


finite = st.floats(-100, 100, allow_nan=False, width=32)


@settings(max_examples=50, deadline=None)
@given(st.lists(finite, min_size=1, max_size=8), st.lists(finite, min_size=1, max_size=8),
       st.floats(-3, 3, allow_nan=False))
def test_linear_algebra_invariants(xs, ys, scale):
    n = min(len(xs), len(ys))
    u = TaskVector({"w": torch.tensor(xs[:n], dtype=torch.float64)})
    v = TaskVector({"w": torch.tensor(ys[:n], dtype=torch.float64)})
    assert (u * scale).norm() == pytest.approx(abs(scale) * u.norm(), rel=1e-9, abs=1e-9)
    assert (u + v).norm() <= u.norm() + v.norm() + 1e-9
    assert -1 - 1e-9 <= u.cosine(v) <= 1 + 1e-9
    assert torch.allclose((u + v - v)["w"], u["w"])


def test_tasks_sharing_a_last_key_cache_read_each_pretrained_tensor_once(tmp_path, pretrained, finetuned):
    io.save_state_dict(pretrained, tmp_path / "pre.safetensors")
    io.save_state_dict(finetuned, tmp_path / "ft.safetensors")
    counting = CountingReader(io.open_checkpoint(tmp_path / "pre.safetensors"))
    shared = LastKeyCache(counting)
    vectors = [LazyTaskVector(shared, io.open_checkpoint(tmp_path / "ft.safetensors")) for _ in range(3)]
    for key in vectors[0]:  # the merge engine's order: key by key, every task
        tensors = [vector[key] for vector in vectors]
        assert all(torch.equal(t, finetuned[key] - pretrained[key]) for t in tensors)
    assert counting.reads == list(vectors[0])  # once per key, not once per task
    assert torch.equal(shared[list(vectors[0])[-1]], pretrained[list(vectors[0])[-1]])  # θ_pre left untouched


def test_lazy_task_vector_names_the_model_with_the_bad_values(tmp_path, pretrained, finetuned):
    io.save_state_dict(pretrained, tmp_path / "pre.safetensors")
    bad_pre = {**pretrained, "a.weight": pretrained["a.weight"].clone()}
    bad_pre["a.weight"][0, 0] = float("inf")
    io.save_state_dict(bad_pre, tmp_path / "bad-pre.safetensors")
    bad_ft = {**finetuned, "a.weight": finetuned["a.weight"].clone()}
    bad_ft["a.weight"][1, 1] = float("nan")
    io.save_state_dict(bad_ft, tmp_path / "bad-ft.safetensors")
    io.save_state_dict(finetuned, tmp_path / "ft.safetensors")
    with pytest.raises(NonFiniteError, match=r"'a.weight' in .*bad-ft.safetensors has 1 NaN/Inf"):
        LazyTaskVector.from_checkpoints(tmp_path / "pre.safetensors", tmp_path / "bad-ft.safetensors")["a.weight"]
    with pytest.raises(NonFiniteError, match="'a.weight' in the pretrained model has 1 NaN/Inf"):
        LazyTaskVector.from_checkpoints(tmp_path / "bad-pre.safetensors", tmp_path / "ft.safetensors")["a.weight"]


def test_all_finite_sees_through_an_overflowing_sum():
    big = torch.full((4,), 3e38)
    assert all_finite(big)  # the sum overflows to inf; the entries are finite
    assert not all_finite(torch.tensor([1.0, float("nan")]))
    assert not all_finite(torch.tensor([float("inf"), float("-inf")]))
    assert all_finite(torch.zeros(0)) and all_finite(torch.ones(3, dtype=torch.bfloat16) * 60000)
