"""EMR-Merging: elect a unified vector, then serve each task through its own mask and scale.

γ = sign(Σ_t τ_t) with 0 counted as −1; τ_uni = γ ⊙ max_t(|τ_t| ⊙ 1[τ_t γ > 0]); M_t = 1[τ_t γ > 0];
λ_t = Σ_tensors mean|τ_t| / Σ_tensors mean|M_t ⊙ τ_uni|. Task t is served with θ_pre + λ_t M_t ⊙ τ_uni.
No α. λ_t only needs per-tensor sums, accumulated while tensors stream by, so one pass suffices.
If task t's masked unified vector is zero everywhere (then so is what it is served with), λ_t = 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from distac.merging.base import MergeMethod, TensorParts
from distac.merging.linalg import sum_over_tasks


@dataclass
class EMR(MergeMethod):
    name = "emr"
    per_task = True

    def __post_init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._task_means: list[float] = []
        self._masked_means: list[float] = []

    def merge_tensor(self, key: str, tensors: list[torch.Tensor]) -> TensorParts:
        elected = (sum_over_tasks(tensors) > 0) * 2.0 - 1.0  # +1 / −1; a product is faster than torch.where
        magnitude = torch.zeros_like(elected)  # max_t |τ_t| over the tasks agreeing with γ
        masks = []
        for tensor in tensors:
            signed = tensor * elected  # |τ_t| where τ_t agrees with γ, ≤ 0 elsewhere
            masks.append(signed > 0)
            torch.maximum(magnitude, signed, out=magnitude)
        magnitude.abs_()  # max(+0, −0) may be −0: make every zero +0, as the elementwise rule gives
        if not self._task_means:
            self._task_means = [0.0] * len(tensors)
            self._masked_means = [0.0] * len(tensors)
        for t, (tensor, mask) in enumerate(zip(tensors, masks)):
            self._task_means[t] += float(tensor.abs().mean())
            self._masked_means[t] += float((magnitude * mask).mean())  # = mean|M_t ⊙ τ_uni|, magnitude ≥ +0
        return TensorParts(magnitude.mul_(elected), masks)

    def finish(self) -> dict[str, Any]:
        scales = [task / masked if masked > 0 else 1.0 for task, masked in zip(self._task_means, self._masked_means)]
        self._reset()
        return {"scales": scales}
