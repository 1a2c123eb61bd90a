"""Iso-CTS: an isotropic merge over a common subspace plus task-specific subspaces.

For each 2-D tensor with d = min(m, n): s = round((d − ⌊common_fraction·d⌋)/T) task-specific directions per
task (Python's round, as the reference) and k_c = d − s·T common directions (if rounding up would make
s·T > d, s = ⌊d/T⌋ instead). The common space is the top k_c singular triplets of Σ_t τ_t; each τ_t,
projected off the common left subspace (τ_t − U_c U_cᵀ τ_t), contributes its top s triplets. The stacked
U's and V's are orthonormalized (polar factor) and every singular value is set to the mean of all kept
singular values. Non-2-D tensors (and keys matching ``exclude_2d``): mean over tasks. τ_m = α · that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distac.merging.base import MatrixMethod, check_number
from distac.merging.linalg import gram_eigh, polar_factor, sum_over_tasks, svd, top_svd, well_conditioned


def subspace_sizes(dim: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """(k_c common directions, s directions per task) for a matrix of rank ``dim``."""
    per_task = round((dim - int(common_fraction * dim)) / num_tasks)
    if per_task * num_tasks > dim:
        per_task = dim // num_tasks
    return dim - per_task * num_tasks, per_task


def iso_cts_factors(tensors: list[torch.Tensor], common_fraction: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U⊥, mean singular value, V⊥) of the Iso-CTS merge of one 2-D tensor."""
    common, per_task = subspace_sizes(min(tensors[0].shape), len(tensors), common_fraction)
    u_common, s_common, v_common, complement = common_subspace(sum_over_tasks(tensors), common)
    us, ss, vs = [u_common], [s_common], [v_common]
    for tensor in tensors if per_task else ():
        if complement is None:
            u_t, s_t, v_t = top_svd(tensor - u_common @ (u_common.mT @ tensor), per_task)
        else:  # τ_t − U_c U_cᵀ τ_t = U_⊥ (U_⊥ᵀ τ_t): decompose the small (m − k_c) × n factor instead
            u_small, s_t, v_t = top_svd(complement.mT @ tensor.double(), per_task)
            u_t = (complement @ u_small.double()).float()
        us.append(u_t)
        ss.append(s_t)
        vs.append(v_t)
    return polar_factor(torch.cat(us, dim=1)), torch.cat(ss).mean(), polar_factor(torch.cat(vs, dim=1))


def common_subspace(total: torch.Tensor, common: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                 torch.Tensor | None]:
    """The top ``common`` singular triplets (U_c, S_c, V_c) of the task sum, and, when they come from the
    eigenvectors of ΣΣᵀ (m ≤ n), the orthonormal complement U_⊥ of U_c in float64 (else None)."""
    eigenvalues, eigenvectors, left = gram_eigh(total)
    if not well_conditioned(eigenvalues, common):
        u, s, v = svd(total)
        return u[:, :common], s[:common], v[:, :common], None
    s = eigenvalues[:common].sqrt()
    side = eigenvectors[:, :common]
    other = (total.double().mT @ side if left else total.double() @ side) / s
    u, v = (side, other) if left else (other, side)
    return u.float(), s.float(), v.float(), eigenvectors[:, common:] if left else None


@dataclass
class IsoCTS(MatrixMethod):
    name = "iso_cts"
    has_alpha = True
    alpha: float = 1.0
    common_fraction: float = 0.8

    def validate(self) -> None:
        super().validate()
        check_number(self.name, "common_fraction", self.common_fraction, minimum=0.0, maximum=1.0)

    def merge_matrix(self, key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        u, mean_singular_value, v = iso_cts_factors(tensors, self.common_fraction)
        return mean_singular_value * (u @ v.mT)
