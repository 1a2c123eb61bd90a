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
from distac.merging.linalg import polar_factor, svd


def subspace_sizes(dim: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """(k_c common directions, s directions per task) for a matrix of rank ``dim``."""
    per_task = round((dim - int(common_fraction * dim)) / num_tasks)
    if per_task * num_tasks > dim:
        per_task = dim // num_tasks
    return dim - per_task * num_tasks, per_task


def iso_cts_factors(tensors: list[torch.Tensor], common_fraction: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U⊥, mean singular value, V⊥) of the Iso-CTS merge of one 2-D tensor."""
    common, per_task = subspace_sizes(min(tensors[0].shape), len(tensors), common_fraction)
    u, s, v = svd(torch.stack(tensors).sum(dim=0))
    us, ss, vs = [u[:, :common]], [s[:common]], [v[:, :common]]
    if per_task:
        u_common = us[0]
        for tensor in tensors:
            u_t, s_t, v_t = svd(tensor - u_common @ (u_common.mT @ tensor))
            us.append(u_t[:, :per_task])
            ss.append(s_t[:per_task])
            vs.append(v_t[:, :per_task])
    return polar_factor(torch.cat(us, dim=1)), torch.cat(ss).mean(), polar_factor(torch.cat(vs, dim=1))


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
