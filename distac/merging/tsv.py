"""TSV-M (Task Singular Vectors, merge variant).

For each 2-D tensor: keep the top r = ⌊min(m, n)/T⌋ singular triplets of every τ_t, concatenate the kept
U's, singular values and V's of all tasks, replace the concatenated U and V by their polar factors (the
closest matrices with orthonormal columns) and rebuild U⊥ diag(S) V⊥ᵀ. Non-2-D tensors (and keys matching
``exclude_2d``): mean over tasks. τ_m = α · that.

When T > min(m, n), r would be 0 and the tensor would vanish; such a tensor gets the non-2-D treatment
instead (a choice of this project; the reference code silently returns zeros).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from distac.merging.base import MatrixMethod
from distac.merging.linalg import mean_over_tasks, polar_factor, top_svd

log = logging.getLogger(__name__)


def tsv_factors(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U⊥, S, V⊥): orthonormalized concatenation of every task's top ⌊min(m,n)/T⌋ singular triplets."""
    rank = min(tensors[0].shape) // len(tensors)
    us, ss, vs = [], [], []
    for tensor in tensors:
        u, s, v = top_svd(tensor, rank)
        us.append(u)
        ss.append(s)
        vs.append(v)
    return polar_factor(torch.cat(us, dim=1)), torch.cat(ss), polar_factor(torch.cat(vs, dim=1))


@dataclass
class TSV(MatrixMethod):
    name = "tsv"
    has_alpha = True
    alpha: float = 1.0

    def merge_matrix(self, key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        if min(tensors[0].shape) < len(tensors):
            # e.g. BERT's 2 × 384 token-type embeddings: too few singular vectors to split, and harmless
            log.info("tsv: %r has fewer rows or columns than the %d tasks; merged by the mean", key, len(tensors))
            return mean_over_tasks(tensors)
        u, s, v = tsv_factors(tensors)
        return (u * s) @ v.mT
