"""Linear-algebra helpers shared by the merge methods.

Everything runs in float32 on the tensor's own device (the engine hands methods float32 tensors on the
compute device, so the work runs on the accelerator when there is one). Sums over tasks are running sums:
``torch.stack`` would copy all T tensors of a key once more just to reduce them.
"""

from __future__ import annotations

import functools

import torch


def sum_over_tasks(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Σ_t tensors[t], added left to right into one new tensor (the inputs are left untouched)."""
    if len(tensors) == 1:
        return tensors[0].clone()
    total = torch.add(tensors[0], tensors[1])
    for tensor in tensors[2:]:
        total += tensor
    return total


def mean_over_tasks(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The non-2-D rule of TSV, Iso and WUDI: the elementwise mean over tasks."""
    return sum_over_tasks(tensors).div_(len(tensors))


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduced SVD ``matrix = U diag(S) Vᵀ``; returns (U, S, V) with V (not Vᵀ), singular values descending."""
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    return u, s, vh.mT


# The SVD-based merges need a few singular triplets or only the orthogonal factor. Both follow exactly from
# the eigendecomposition of the small Gram matrix (AAᵀ or AᵀA, min(m, n) wide): about half the time of a
# float32 SVD for a rectangular matrix, about the same for a square one, and far more accurate (see
# benchmarks/results/merge_bench.md). Squaring A squares its condition number, so the Gram matrix is
# formed and decomposed in float64 (products of float32 numbers are exact there), and a matrix whose kept
# eigenvalues fall below GRAM_MIN_RATIO × the largest (σ below 1e-5 σ_max, where float64 no longer keeps
# float32 accuracy) is handed to the SVD instead.
GRAM_MIN_RATIO = 1e-10


def gram_eigh(matrix: torch.Tensor, top: int | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Eigenvalues (descending, ≥ 0) and eigenvectors of the float64 Gram matrix on the short side of
    ``matrix`` (only the ``top`` largest when given), and whether that side is the left one (AAᵀ,
    eigenvectors = left singular vectors)."""
    a = matrix.double()
    left = a.shape[0] <= a.shape[1]
    if a.device.type != "cpu":
        eigenvalues, eigenvectors = torch.linalg.eigh(a @ a.mT if left else a.mT @ a)
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    else:
        eigenvalues, eigenvectors = _cpu_gram_eigh(a, left, top)
    return eigenvalues[:top].clamp_(min=0), eigenvectors[:, :top], left


def _cpu_gram_eigh(a: torch.Tensor, left: bool, top: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``gram_eigh`` on the CPU through SciPy's LAPACK, on as many threads as torch may use: the Gram matrix
    by a symmetric rank-k update (half the flops of a product), then divide and conquer for every eigenpair
    or MRRR for the ``top`` ones. On one thread that is 1.8× faster than ``a @ a.mT`` and 1.2× (every
    eigenpair) to 1.8× (TSV's top eighth) faster than ``torch.linalg.eigh``
    (benchmarks/results/merge_bench.md); the numbers agree to float64 rounding."""
    from scipy.linalg import eigh
    from scipy.linalg.blas import dsyrk

    with _blas_threads(torch.get_num_threads()):
        transposed = a.numpy().T  # Fortran order, no copy: syrk of Aᵀ with trans=1 is A Aᵀ, with trans=0 AᵀA
        gram = dsyrk(1.0, transposed, trans=1 if left else 0, lower=1)
        size = gram.shape[0]
        subset = [size - top, size - 1] if top is not None and 0 < top < size else None
        eigenvalues, eigenvectors = eigh(gram, lower=True, subset_by_index=subset,
                                         driver="evr" if subset else "evd", overwrite_a=True, check_finite=False)
    return torch.from_numpy(eigenvalues[::-1].copy()), torch.from_numpy(eigenvectors[:, ::-1].copy())


@functools.cache
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()  # SciPy's BLAS is loaded by then


def _blas_threads(count: int):
    """SciPy's BLAS on ``count`` threads within the block (it would otherwise take every core)."""
    return _blas_controller().limit(limits=count, user_api="blas")


def well_conditioned(eigenvalues: torch.Tensor, count: int) -> bool:
    """Whether the ``count`` largest eigenvalues are all safely above zero."""
    return count == 0 or bool(eigenvalues[count - 1] > GRAM_MIN_RATIO * eigenvalues[0])


def top_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``rank`` largest singular triplets (U, S, V) of ``matrix``, float32, singular values descending."""
    eigenvalues, eigenvectors, left = gram_eigh(matrix, top=rank)
    if not well_conditioned(eigenvalues, rank):
        u, s, v = svd(matrix)
        return u[:, :rank], s[:rank], v[:, :rank]
    s = eigenvalues[:rank].sqrt()
    side = eigenvectors[:, :rank]
    other = (matrix.double().mT @ side if left else matrix.double() @ side) / s
    u, v = (side, other) if left else (other, side)
    return u.float(), s.float(), v.float()


def _inverse_sqrt(eigenvalues: torch.Tensor, eigenvectors: torch.Tensor) -> torch.Tensor:
    """G^{-1/2} = Q diag(λ^{-1/2}) Qᵀ from G's eigendecomposition."""
    return (eigenvectors * eigenvalues.rsqrt()) @ eigenvectors.mT


def polar_from_gram(matrix: torch.Tensor, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor,
                    left: bool) -> torch.Tensor | None:
    """The polar factor of ``matrix`` given its Gram eigendecomposition (``gram_eigh``): (AAᵀ)^{-1/2} A or
    A (AᵀA)^{-1/2}; None when the matrix is too close to rank-deficient for that to be exact."""
    if not well_conditioned(eigenvalues, eigenvalues.numel()):
        return None
    root = _inverse_sqrt(eigenvalues, eigenvectors)
    a = matrix.double()
    return (root @ a if left else a @ root).float()


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrix closest to ``matrix`` in Frobenius norm: P Qᵀ from its SVD P Σ Qᵀ."""
    polar = polar_from_gram(matrix, *gram_eigh(matrix))
    if polar is None:
        p, _, q = svd(matrix)
        polar = p @ q.mT
    return polar
