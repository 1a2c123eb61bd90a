"""Iso-C: make the spectrum of the summed task matrix isotropic.

For each 2-D tensor: Σ_t τ_t = U S Vᵀ, every singular value replaced by their mean, τ_m = α · mean(S) U Vᵀ.
Non-2-D tensors (and keys matching ``exclude_2d``): mean over tasks, times α.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distac.merging.base import MatrixMethod
from distac.merging.linalg import svd


def isotropic(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` with all singular values set to their mean."""
    u, s, v = svd(matrix)
    return s.mean() * (u @ v.mT)


@dataclass
class IsoC(MatrixMethod):
    name = "iso_c"
    has_alpha = True
    alpha: float = 1.0

    def merge_matrix(self, key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        return isotropic(torch.stack(tensors).sum(dim=0))
