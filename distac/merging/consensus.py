"""Consensus merging with TALL masks.

τ_MTL = Σ_t τ_t; task t's mask m_t = 1[|τ_t| > λ |τ_MTL − τ_t|] elementwise; entries where at least
``min_agree`` masks are on keep τ_MTL, the rest are zeroed: τ_m = α · (τ_MTL ⊙ consensus mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distac.merging.base import MergeMethod, check_number
from distac.merging.linalg import sum_over_tasks


def tall_mask(tensor: torch.Tensor, total: torch.Tensor, lam: float) -> torch.Tensor:
    """One task's boolean TALL mask 1[|τ_t| > λ |τ_MTL − τ_t|]."""
    return tensor.abs() > (total - tensor).abs_().mul_(lam)


def tall_masks(tensors: list[torch.Tensor], lam: float) -> torch.Tensor:
    """The T boolean TALL masks of one tensor, stacked on dim 0."""
    total = sum_over_tasks(tensors)
    return torch.stack([tall_mask(tensor, total, lam) for tensor in tensors])


@dataclass
class Consensus(MergeMethod):
    name = "consensus"
    has_alpha = True
    alpha: float = 1.0
    lam: float = 0.5
    min_agree: int = 2

    def validate(self) -> None:
        check_number(self.name, "alpha", self.alpha)
        check_number(self.name, "lam", self.lam, minimum=0.0)
        check_number(self.name, "min_agree", self.min_agree, minimum=0, integer=True)

    def merge_tensor(self, key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        total = sum_over_tasks(tensors)
        agreeing = torch.zeros(total.shape, dtype=torch.int32, device=total.device)
        for tensor in tensors:
            agreeing += tall_mask(tensor, total, self.lam)
        return torch.where(agreeing >= self.min_agree, total, 0.0).mul_(self.alpha)
