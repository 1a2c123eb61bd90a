"""Linear-algebra helpers shared by the SVD-based merges (TSV, Iso-C, Iso-CTS).

Everything runs in float32 on the tensor's own device (the engine hands methods float32 tensors on the
compute device, so the SVD runs on the accelerator when there is one).
"""

from __future__ import annotations

import torch


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduced SVD ``matrix = U diag(S) Vᵀ``; returns (U, S, V) with V (not Vᵀ), singular values descending."""
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    return u, s, vh.mT


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrix closest to ``matrix`` in Frobenius norm: P Qᵀ from its SVD P Σ Qᵀ."""
    p, _, q = svd(matrix)
    return p @ q.mT


def mean_over_tasks(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The non-2-D rule of TSV, Iso and WUDI: the elementwise mean over tasks."""
    return torch.stack(tensors).mean(dim=0)
