"""Consensus merging with TALL masks.

τ_MTL = Σ_t τ_t; task t's mask m_t = 1[|τ_t| > λ |τ_MTL − τ_t|] elementwise; entries where at least
``min_agree`` masks are on keep τ_MTL, the rest are zeroed: τ_m = α · (τ_MTL ⊙ consensus mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distac.merging.base import MergeMethod, check_number
from distac.merging.linalg import sum_over_tasks


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
        agreeing, margin = torch.zeros_like(total), torch.empty_like(total)
        for tensor in tensors:
            # m_t as a number, without the slow boolean comparison: |τ_t| − λ|τ_MTL − τ_t| is positive exactly
            # when |τ_t| > λ|τ_MTL − τ_t| (a float difference is 0 only for equal floats), so relu + sign = m_t
            torch.sub(total, tensor, out=margin).abs_().mul_(-self.lam).add_(tensor.abs()).relu_().sign_()
            agreeing += margin
        return torch.where(agreeing >= self.min_agree, total, 0.0).mul_(self.alpha)
