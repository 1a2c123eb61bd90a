"""Iso-C: make the spectrum of the summed task matrix isotropic.

For each 2-D tensor: Σ_t τ_t = U S Vᵀ, every singular value replaced by their mean, τ_m = α · mean(S) U Vᵀ.
Non-2-D tensors (and keys matching ``exclude_2d``): mean over tasks, times α.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distac.merging.base import MergeMethod, check_number, check_patterns, is_matrix
from distac.merging.linalg import mean_over_tasks, svd


def isotropic(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` with all singular values set to their mean."""
    u, s, v = svd(matrix)
    return s.mean() * (u @ v.mT)


@dataclass
class IsoC(MergeMethod):
    name = "iso_c"
    alpha: float = 1.0
    exclude_2d: tuple[str, ...] = ()

    def validate(self) -> None:
        check_number(self.name, "alpha", self.alpha)
        self.exclude_2d = check_patterns(self.name, "exclude_2d", self.exclude_2d)

    def merge_tensor(self, key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        if not is_matrix(key, tensors[0], self.exclude_2d):
            return self.alpha * mean_over_tasks(tensors)
        return self.alpha * isotropic(torch.stack(tensors).sum(dim=0))
