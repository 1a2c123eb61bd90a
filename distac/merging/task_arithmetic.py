"""Task Arithmetic: τ_m = α Σ_t τ_t."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distac.merging.base import MergeMethod
from distac.merging.linalg import sum_over_tasks


@dataclass
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    has_alpha = True
    alpha: float = 1.0

    def merge_tensor(self, key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        return sum_over_tasks(tensors).mul_(self.alpha)
