"""Properties every merge must keep, checked on random inputs (hypothesis draws seeds, shapes, task counts)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distac.merging import METHODS, merge
from distac.merging.iso_cts import iso_cts_factors
from distac.merging.ties import top_k_thresholds
from distac.merging.tsv import tsv_factors

FAST = dict(max_examples=15, deadline=None)
# Hyperparameters under which one task merged with α = 1 must come back unchanged.
IDENTITY_SETTINGS = {"task_arithmetic": {}, "ties": {"k": 1.0}, "consensus": {"min_agree": 1}, "tsv": {},
                     "emr": {}, "wudi": {"steps": 20}}


def random_vectors(seed: int, num_tasks: int, rows: int = 6, cols: int = 5) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(rows, cols, generator=generator), "bias": torch.randn(cols, generator=generator),
             "conv": torch.randn(2, 3, 2, generator=generator)} for _ in range(num_tasks)]


def fast(name: str) -> dict:
    return {"steps": 5} if name == "wudi" else {}


@pytest.mark.parametrize("name", sorted(IDENTITY_SETTINGS))
@settings(**FAST)
@given(seed=st.integers(0, 2**31 - 1))
def test_one_task_with_alpha_one_comes_back(name, seed):
    (task,) = random_vectors(seed, 1)
    served = merge(name, [task], **IDENTITY_SETTINGS[name]).for_task(0)
    for key, tensor in task.items():
        assert torch.allclose(served[key], tensor, atol=1e-5), key


@settings(**FAST)
@given(seed=st.integers(0, 2**31 - 1), num_tasks=st.integers(1, 4))
def test_ties_with_k_one_and_agreeing_signs_is_the_mean(seed, num_tasks):
    vectors = random_vectors(seed, num_tasks)
    signs = {key: torch.sign(tensor) for key, tensor in vectors[0].items()}
    agreeing = [{key: tensor.abs() * signs[key] for key, tensor in vector.items()} for vector in vectors]
    merged = merge("ties", agreeing, k=1.0)
    for key in signs:
        assert torch.allclose(merged.vector[key], torch.stack([v[key] for v in agreeing]).mean(0), atol=1e-6)


@pytest.mark.parametrize("name", sorted(METHODS))
@settings(**FAST)
@given(seed=st.integers(0, 2**31 - 1), num_tasks=st.integers(2, 4), data=st.data())
def test_task_order_does_not_change_the_merge(name, seed, num_tasks, data):
    vectors = random_vectors(seed, num_tasks)
    order = data.draw(st.permutations(range(num_tasks)))
    original = merge(name, vectors, **fast(name))
    permuted = merge(name, [vectors[i] for i in order], **fast(name))
    for position, task in enumerate(order):  # what each task is served with (EMR: per task) must not move
        for key in vectors[0]:
            assert torch.allclose(permuted.for_task(position)[key], original.for_task(task)[key], atol=1e-4), key


@settings(**FAST)
@given(seed=st.integers(0, 2**31 - 1), num_tasks=st.integers(1, 4), rows=st.integers(4, 9), cols=st.integers(4, 9))
def test_tsv_factors_are_orthonormal_and_keep_the_singular_values(seed, num_tasks, rows, cols):
    tensors = [v["w"] for v in random_vectors(seed, num_tasks, rows, cols)]
    u, s, v = tsv_factors(tensors)
    kept = u.shape[1]
    assert kept == (min(rows, cols) // num_tasks) * num_tasks
    assert torch.allclose(u.mT @ u, torch.eye(kept), atol=1e-5)
    assert torch.allclose(v.mT @ v, torch.eye(kept), atol=1e-5)
    merged = merge("tsv", [{"w": w} for w in tensors]).vector["w"]
    singular_values = torch.linalg.svdvals(merged)[:kept]
    assert torch.allclose(singular_values, s.sort(descending=True).values, atol=1e-4)


@settings(**FAST)
@given(seed=st.integers(0, 2**31 - 1), num_tasks=st.integers(1, 4), rows=st.integers(4, 9), cols=st.integers(4, 9),
       common_fraction=st.floats(0.0, 1.0))
def test_iso_cts_factors_are_orthonormal_and_its_spectrum_flat(seed, num_tasks, rows, cols, common_fraction):
    tensors = [v["w"] for v in random_vectors(seed, num_tasks, rows, cols)]
    u, mean_singular_value, v = iso_cts_factors(tensors, common_fraction)
    dim = min(rows, cols)
    assert torch.allclose(u.mT @ u, torch.eye(u.shape[1]), atol=1e-5)
    assert torch.allclose(v.mT @ v, torch.eye(v.shape[1]), atol=1e-5)
    merged = merge("iso_cts", [{"w": w} for w in tensors], common_fraction=common_fraction).vector["w"]
    singular_values = torch.linalg.svdvals(merged)[:u.shape[1]]
    assert u.shape[1] <= dim
    assert torch.allclose(singular_values, mean_singular_value.expand_as(singular_values), atol=1e-4)


@settings(**FAST)
@given(seed=st.integers(0, 2**31 - 1), num_tasks=st.integers(1, 4))
def test_iso_c_singular_values_are_all_equal_to_the_mean(seed, num_tasks):
    vectors = random_vectors(seed, num_tasks)
    summed = torch.stack([v["w"] for v in vectors]).sum(0)
    singular_values = torch.linalg.svdvals(merge("iso_c", vectors).vector["w"])
    expected = torch.linalg.svdvals(summed).mean()
    assert torch.allclose(singular_values, expected.expand_as(singular_values), atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.lists(st.integers(-4, 4), min_size=1, max_size=12), min_size=1, max_size=3),
       scale=st.sampled_from([1.0, 1e-3, 1e7]), k=st.floats(0.01, 1.0))
def test_ties_threshold_is_the_exact_kth_largest_magnitude(values, scale, k):
    # Small integers force many ties; the scales cover several float exponents.
    vector = {f"t{i}": torch.tensor(v, dtype=torch.float32) * scale for i, v in enumerate(values)}
    (threshold,) = top_k_thresholds([vector], list(vector), k, torch.device("cpu"))
    magnitudes = torch.cat(list(vector.values())).abs().sort(descending=True).values
    assert threshold == float(magnitudes[max(1, math.ceil(k * magnitudes.numel())) - 1])


def test_ties_threshold_reads_scalars_transposed_and_half_precision_tensors():
    generator = torch.Generator().manual_seed(0)
    vector = {"scalar": torch.tensor(-3.0), "transposed": torch.randn(5, 7, generator=generator).mT,
              "half": torch.randn(11, generator=generator).to(torch.bfloat16)}
    magnitudes = torch.cat([v.float().abs().flatten() for v in vector.values()]).sort(descending=True).values
    for k in (0.05, 0.3, 1.0):
        (threshold,) = top_k_thresholds([vector], list(vector), k, torch.device("cpu"))
        assert threshold == float(magnitudes[math.ceil(k * magnitudes.numel()) - 1])


@settings(**FAST)
@given(seed=st.integers(0, 2**31 - 1), num_tasks=st.integers(1, 4))
def test_emr_masks_follow_the_elected_sign_and_unified_magnitudes_dominate(seed, num_tasks):
    vectors = random_vectors(seed, num_tasks)
    merged = merge("emr", vectors)
    for key in vectors[0]:
        unified = merged.vector[key]
        for i, vector in enumerate(vectors):
            mask = merged.masks[i][key]
            assert torch.equal(mask, vector[key] * unified > 0)
            assert (unified.abs()[mask] >= vector[key].abs()[mask]).all()
