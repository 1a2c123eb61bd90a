"""Iso-C: make the spectrum of the summed task matrix isotropic.

For each 2-D tensor: Σ_t τ_t = U S Vᵀ, every singular value replaced by their mean, τ_m = α · mean(S) U Vᵀ.
Non-2-D tensors (and keys matching ``exclude_2d``): mean over tasks, times α.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distac.merging.base import MatrixMethod
from distac.merging.linalg import gram_eigh, polar_from_gram, sum_over_tasks, svd


def isotropic(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` with all singular values set to their mean: mean(σ) times its polar factor.

    Both come from one eigendecomposition of the Gram matrix (σ = √λ); the SVD only when the matrix is
    close to rank-deficient.
    """
    eigenvalues, eigenvectors, left = gram_eigh(matrix)
    polar = polar_from_gram(matrix, eigenvalues, eigenvectors, left)
    if polar is None:
        u, s, v = svd(matrix)
        return s.mean() * (u @ v.mT)
    return float(eigenvalues.sqrt().mean()) * polar


@dataclass
class IsoC(MatrixMethod):
    name = "iso_c"
    has_alpha = True
    alpha: float = 1.0

    def merge_matrix(self, key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        return isotropic(sum_over_tasks(tensors))
