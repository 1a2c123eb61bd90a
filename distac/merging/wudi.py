"""WUDI-Merging: reduce the interference each task sees from the others' updates.

For each 2-D tensor: start from τ_m = Σ_t τ_t and minimize L(τ_m) = Σ_t ‖(τ_m − τ_t) τ_tᵀ‖²_F / ‖τ_t‖²_F
with Adam (``lr`` 1e-5, ``steps`` 300). Non-2-D tensors (and keys matching ``exclude_2d``): mean over tasks.
No α (coefficient 1).

The loss is quadratic, so its gradient has the closed form ∇L = 2 (τ_m G − B) with G = Σ_t τ_tᵀ τ_t / ‖τ_t‖²
and B = Σ_t τ_t τ_tᵀ τ_t / ‖τ_t‖², computed once; each Adam step then costs one matrix product instead of
a forward and backward pass over all T tasks. Tasks with a zero matrix contribute nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distac.merging.base import MatrixMethod, check_number
from distac.merging.linalg import sum_over_tasks


def wudi_optimize(tensors: list[torch.Tensor], steps: int, lr: float) -> torch.Tensor:
    """Adam on the WUDI loss of one matrix, from the task sum."""
    gram = torch.zeros(tensors[0].shape[1], tensors[0].shape[1], device=tensors[0].device)
    target = torch.zeros_like(tensors[0])
    for tensor in tensors:
        squared_norm = tensor.pow(2).sum()
        if squared_norm > 0:
            task_gram = tensor.mT @ tensor / squared_norm
            gram += task_gram
            target += tensor @ task_gram
    merged = torch.nn.Parameter(sum_over_tasks(tensors))
    optimizer = torch.optim.Adam([merged], lr=lr)
    for _ in range(steps):
        merged.grad = 2 * (merged.detach() @ gram - target)
        optimizer.step()
    return merged.detach()


@dataclass
class WUDI(MatrixMethod):
    name = "wudi"
    steps: int = 300
    lr: float = 1e-5

    def validate(self) -> None:
        super().validate()
        check_number(self.name, "steps", self.steps, minimum=0, integer=True)
        check_number(self.name, "lr", self.lr, minimum=0.0, exclusive_minimum=True)

    def merge_matrix(self, key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        return wudi_optimize(tensors, self.steps, self.lr)
