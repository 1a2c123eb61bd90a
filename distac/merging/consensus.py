"""Consensus merging with TALL masks.

τ_MTL = Σ_t τ_t; task t's mask m_t = 1[|τ_t| > λ |τ_MTL − τ_t|] elementwise; entries where at least
``min_agree`` masks are on keep τ_MTL, the rest are zeroed: τ_m = α · (τ_MTL ⊙ consensus mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distac.merging.base import MergeMethod, check_number


def tall_masks(tensors: list[torch.Tensor], lam: float) -> torch.Tensor:
    """The T boolean TALL masks of one tensor, stacked on dim 0."""
    stacked = torch.stack(tensors)
    total = stacked.sum(dim=0)
    return stacked.abs() > lam * (total - stacked).abs()


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
        agreeing = tall_masks(tensors, self.lam).sum(dim=0)
        total = torch.stack(tensors).sum(dim=0)
        return self.alpha * torch.where(agreeing >= self.min_agree, total, 0.0)
