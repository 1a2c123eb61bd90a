"""Each merge method on small inputs whose result is derived by hand (METHODS.md's rules)."""

from __future__ import annotations

import pytest
import torch

from distac.errors import ConfigError
from distac.merging import METHODS, get_method, merge
from distac.merging.iso_cts import subspace_sizes


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def assert_close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert torch.allclose(actual, expected, atol=atol, rtol=0), f"{actual} != {expected}"


def test_all_eight_methods_are_registered():
    assert sorted(METHODS) == sorted(["task_arithmetic", "ties", "consensus", "tsv", "iso_c", "iso_cts", "emr", "wudi"])


def test_task_arithmetic_sums_and_scales():
    merged = merge("task_arithmetic", [{"a": t(1, 2)}, {"a": t(3, -5)}], alpha=0.5)
    assert_close(merged.vector["a"], [2.0, -1.5])


def test_ties_trims_globally_over_the_whole_task_vector():
    # k = 0.5 keeps 2 of 4 entries per task. Task 1 keeps 4 and 3 (both in "a"; a per-tensor trim would
    # keep 0.2 in "b"); task 2 keeps -5 and 2. Signs: a → (+, +), b → (−, 0). Disjoint means: a = (4, (3+2)/2).
    first = {"a": t(4, 3), "b": t(0.2, -0.1)}
    second = {"a": t(-1, 2), "b": t(-5, 0.3)}
    merged = merge("ties", [first, second], k=0.5)
    assert_close(merged.vector["a"], [4.0, 2.5])
    assert_close(merged.vector["b"], [-5.0, 0.0])
    assert_close(merge("ties", [first, second], k=0.5, alpha=2.0).vector["a"], [8.0, 5.0])


def test_ties_keeps_every_entry_tied_with_the_threshold():
    merged = merge("ties", [{"a": t(1, 1, 1, 1, 0.5)}], k=0.2)  # 1 of 5 to keep, but four tie at 1
    assert_close(merged.vector["a"], [1, 1, 1, 1, 0])


def test_ties_drops_entries_against_the_elected_sign():
    merged = merge("ties", [{"a": t(3, 1)}, {"a": t(-1, -2)}, {"a": t(0, 0)}], k=1.0)
    assert_close(merged.vector["a"], [3.0, -2.0])  # sums (2, -1): keep 3 alone, then -2 alone


def test_consensus_keeps_entries_where_enough_tall_masks_agree():
    # τ_MTL = (4, 0.5, 4). Masks |τ_t| > 0.5 |τ_MTL − τ_t|:
    #   entry 0: 2 > 1 yes, 1 > 1.5 no, 1 > 1.5 no → 1 vote; entry 1: 1 > .25, 1 > .75, .5 > 0 → 3 votes;
    #   entry 2: only task 3 (4 > 0) → 1 vote.
    tasks = [{"a": t(2, 1, 0)}, {"a": t(1, -1, 0)}, {"a": t(1, 0.5, 4)}]
    assert_close(merge("consensus", tasks).vector["a"], [0.0, 0.5, 0.0])
    assert_close(merge("consensus", tasks, min_agree=1, alpha=2.0).vector["a"], [8.0, 1.0, 8.0])
    assert_close(merge("consensus", tasks, min_agree=3).vector["a"], [0.0, 0.5, 0.0])


def test_tsv_keeps_each_tasks_top_directions_and_means_the_rest():
    # T = 2, r = 1: task 1 contributes 3·e1e1ᵀ, task 2 contributes 2·e2e2ᵀ; both already orthogonal.
    tasks = [{"w": torch.diag(t(3, 1)), "b": t(1, 3)}, {"w": torch.diag(t(1, 2)), "b": t(3, 5)}]
    merged = merge("tsv", tasks)
    assert_close(merged.vector["w"], torch.diag(t(3, 2)), atol=1e-5)
    assert_close(merged.vector["b"], [2.0, 4.0])
    assert_close(merge("tsv", tasks, alpha=0.5).vector["w"], torch.diag(t(1.5, 1)), atol=1e-5)
    excluded = merge("tsv", tasks, exclude_2d=("^w$",)).vector["w"]
    assert_close(excluded, torch.diag(t(2, 1.5)))  # the non-2-D rule: the mean


def test_iso_c_flattens_the_spectrum_of_the_sum():
    # Σ τ = [[0, 3], [1, 0]]: singular values 3 and 1 → both 2; U Vᵀ is the swap matrix.
    tasks = [{"w": torch.tensor([[0.0, 3.0], [0.0, 0.0]])}, {"w": torch.tensor([[0.0, 0.0], [1.0, 0.0]])}]
    assert_close(merge("iso_c", tasks).vector["w"], [[0.0, 2.0], [2.0, 0.0]], atol=1e-5)
    assert_close(merge("iso_c", tasks, alpha=1.5).vector["w"], [[0.0, 3.0], [3.0, 0.0]], atol=1e-5)


def test_iso_cts_adds_task_specific_directions_to_the_common_space():
    # d = 4, common_fraction 0.5: s = round(2/2) = 1 per task, k_c = 2. Σ τ = diag(12, 4, 3, 1) → common e1, e2;
    # residuals: task 1 → 3·e3e3ᵀ, task 2 → 1·e4e4ᵀ. Mean of (12, 4, 3, 1) = 5 → 5·I.
    tasks = [{"w": torch.diag(t(6, 0, 3, 0))}, {"w": torch.diag(t(6, 4, 0, 1))}]
    assert_close(merge("iso_cts", tasks, common_fraction=0.5).vector["w"], 5 * torch.eye(4), atol=1e-5)


def test_iso_cts_subspace_sizes():
    assert subspace_sizes(768, 8, 0.8) == (616, 19)  # round(154 / 8) = 19 per task
    assert subspace_sizes(4, 2, 0.5) == (2, 1)
    assert subspace_sizes(3, 2, 0.0) == (1, 1)  # round(1.5) = 2 would overflow d: ⌊3/2⌋ instead
    assert subspace_sizes(10, 3, 1.0) == (10, 0)


def test_emr_unified_vector_masks_and_scales():
    # Σ: a = (1, −4), b = (0, 3) → γ = (+, −), (−[0 counts as −], +).
    # τ_uni: a = (2, −3), b = (0, 2). M_1: a (1, 1), b (0, 1); M_2: a (0, 1), b (0, 1).
    # λ_1 = (1.5 + 0.5) / (2.5 + 1) = 4/7;  λ_2 = (2 + 1) / (1.5 + 1) = 6/5.
    tasks = [{"a": t(2, -1), "b": t(0, 1)}, {"a": t(-1, -3), "b": t(0, 2)}]
    merged = merge("emr", tasks)
    assert_close(merged.vector["a"], [2.0, -3.0])
    assert_close(merged.vector["b"], [0.0, 2.0])
    assert merged.masks[0]["a"].tolist() == [True, True] and merged.masks[0]["b"].tolist() == [False, True]
    assert merged.masks[1]["a"].tolist() == [False, True] and merged.masks[1]["b"].tolist() == [False, True]
    assert merged.scales == pytest.approx((4 / 7, 6 / 5))
    assert_close(merged.for_task(0)["a"], [8 / 7, -12 / 7])
    assert_close(merged.for_task(1)["a"], [0.0, -18 / 5])


def test_wudi_one_adam_step_and_convergence():
    # 1×1: L(x) = (x − 1)² + (x − 2)²·4/4; start 3, ∇ = 2(2 + 1) = 6; Adam's first step is lr·sign(∇).
    tasks = [{"w": t(1).reshape(1, 1), "b": t(1, 3)}, {"w": t(2).reshape(1, 1), "b": t(3, 5)}]
    one_step = merge("wudi", tasks, steps=1, lr=0.1)
    assert_close(one_step.vector["w"], [[2.9]])
    assert_close(one_step.vector["b"], [2.0, 4.0])  # non-2-D: mean
    converged = merge("wudi", tasks, steps=2000, lr=0.01).vector["w"]
    assert abs(float(converged) - 1.5) < 0.02  # the minimum of L


def test_wudi_keeps_the_sum_when_tasks_do_not_interfere():
    tasks = [{"w": torch.tensor([[1.0, 0.0], [0.0, 0.0]])}, {"w": torch.tensor([[0.0, 0.0], [0.0, 1.0]])}]
    assert_close(merge("wudi", tasks, lr=0.1).vector["w"], torch.eye(2))  # (τ_m − τ_t) τ_tᵀ = 0: no gradient


@pytest.mark.parametrize("name, bad", [
    ("ties", {"k": 0.0}), ("ties", {"k": 1.5}), ("ties", {"alpha": float("nan")}), ("ties", {"alpha": True}),
    ("consensus", {"lam": -0.1}), ("consensus", {"min_agree": 1.5}), ("consensus", {"min_agree": -1}),
    ("iso_cts", {"common_fraction": 1.2}), ("tsv", {"exclude_2d": ("(",)}), ("iso_c", {"exclude_2d": 3}),
    ("wudi", {"steps": -1}), ("wudi", {"lr": 0.0}), ("wudi", {"steps": 2.5}),
])
def test_out_of_range_hyperparameters_are_rejected(name, bad):
    with pytest.raises(ConfigError, match=f"{name}: {next(iter(bad))}"):
        get_method(name, **bad)


def test_unknown_method_and_hyperparameter_errors_list_what_exists():
    with pytest.raises(ConfigError, match="available: consensus, emr, iso_c"):
        get_method("tie")
    with pytest.raises(ConfigError, match="emr has no hyperparameter alpha; it accepts: none"):
        get_method("emr", alpha=1.0)
    with pytest.raises(ConfigError, match="it accepts: alpha, common_fraction, exclude_2d"):
        get_method("iso_cts", k=0.1)


def test_exclude_2d_accepts_one_pattern_as_a_string():
    assert get_method("tsv", exclude_2d="text_projection").exclude_2d == ("text_projection",)


def test_tsv_falls_back_to_the_mean_when_tasks_outnumber_the_rank():
    tasks = [{"w": torch.full((2, 2), float(i))} for i in range(3)]  # r = ⌊2/3⌋ = 0 would drop the tensor
    assert_close(merge("tsv", tasks).vector["w"], torch.full((2, 2), 1.0))


# ------------------------------------------------------- the fast linear algebra against the plain SVD rules


def _svd64(matrix):
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return u, s, vh.mT


def _polar64(matrix):
    u, _, v = _svd64(matrix)
    return u @ v.mT


def reference_tsv(tensors):
    rank = min(tensors[0].shape) // len(tensors)
    parts = [_svd64(x) for x in tensors]
    u = _polar64(torch.cat([p[0][:, :rank] for p in parts], dim=1))
    v = _polar64(torch.cat([p[2][:, :rank] for p in parts], dim=1))
    return (u * torch.cat([p[1][:rank] for p in parts])) @ v.mT


def reference_iso_c(tensors):
    u, s, v = _svd64(sum(x.double() for x in tensors))
    return s.mean() * (u @ v.mT)


def reference_iso_cts(tensors, common_fraction):
    common, per_task = subspace_sizes(min(tensors[0].shape), len(tensors), common_fraction)
    u, s, v = _svd64(sum(x.double() for x in tensors))
    us, ss, vs = [u[:, :common]], [s[:common]], [v[:, :common]]
    for x in tensors:
        x = x.double()
        u_t, s_t, v_t = _svd64(x - us[0] @ (us[0].mT @ x))
        us.append(u_t[:, :per_task])
        ss.append(s_t[:per_task])
        vs.append(v_t[:, :per_task])
    return torch.cat(ss).mean() * (_polar64(torch.cat(us, dim=1)) @ _polar64(torch.cat(vs, dim=1)).mT)


def relative_error(actual, expected) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
@pytest.mark.parametrize("name, reference", [("tsv", reference_tsv), ("iso_c", reference_iso_c),
                                             ("iso_cts", lambda x: reference_iso_cts(x, 0.8))])
def test_svd_merges_equal_the_float64_svd_rule(shape, name, reference):
    """The Gram-matrix route (eigh of AAᵀ or AᵀA in float64, polar factors from it) is the same rule: it
    matches the textbook SVD formulas evaluated in float64 to 1e-5 (float32 SVDs land about 2e-5 off)."""
    generator = torch.Generator().manual_seed(sum(shape))
    tensors = [torch.randn(shape, generator=generator) * (t + 1) for t in range(3)]
    merged = merge(name, [{"w": x} for x in tensors]).vector["w"]
    assert relative_error(merged, reference(tensors)) < 1e-5


def test_rank_deficient_matrices_take_the_svd_route():
    from distac.merging import linalg

    generator = torch.Generator().manual_seed(0)
    low_rank = torch.randn(20, 3, generator=generator) @ torch.randn(3, 30, generator=generator)
    eigenvalues, _, left = linalg.gram_eigh(low_rank)
    assert left and not linalg.well_conditioned(eigenvalues, 4)  # σ_4..σ_20 are rounding noise
    u, s, v = linalg.top_svd(low_rank, 5)
    p, sigma, q = linalg.svd(low_rank)
    assert torch.equal(s, sigma[:5]) and torch.equal(u, p[:, :5]) and torch.equal(v, q[:, :5])
    assert torch.equal(linalg.polar_factor(low_rank), p @ q.mT)
    u3, s3, v3 = linalg.top_svd(low_rank, 3)  # the three real directions are well conditioned: Gram route
    assert relative_error((u3 * s3) @ v3.mT, low_rank.double()) < 1e-5


def test_emr_zero_entries_stay_positive_zero():
    # Σ = 0 elects γ = −1 and no task agrees: τ_uni = γ ⊙ (+0) = −0, exactly as the elementwise rule gives
    # (a running torch.maximum of +0 and −0 may keep −0, which would flip it to +0).
    tasks = [{"w": torch.zeros(64)}, {"w": torch.zeros(64)}]
    unified = merge("emr", tasks).vector["w"]
    assert torch.equal(torch.signbit(unified), torch.ones(64, dtype=torch.bool))  # Σ = 0 elects −1


def test_the_cpu_eigensolver_uses_as_many_blas_threads_as_torch(monkeypatch):
    """SciPy's BLAS would take every core; the Gram route keeps it to torch's thread count."""
    import scipy.linalg
    from threadpoolctl import threadpool_info

    from distac.merging import linalg

    seen = []
    real_eigh = scipy.linalg.eigh

    def recording_eigh(*args, **kwargs):
        seen.extend(info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas")
        return real_eigh(*args, **kwargs)

    monkeypatch.setattr(scipy.linalg, "eigh", recording_eigh)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        u, s, v = linalg.top_svd(torch.randn(30, 20, generator=torch.Generator().manual_seed(0)), 3)
    finally:
        torch.set_num_threads(threads)
    assert seen and set(seen) == {1}
    assert u.shape == (30, 3) and s.shape == (3,) and v.shape == (20, 3)
