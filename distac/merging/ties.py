"""TIES-Merging: trim, elect sign, disjoint mean.

Trim: in each τ_t keep the entries whose magnitude is in the top ``k`` fraction of that *whole* task vector
(global over all its tensors). Elect: γ = sign(Σ_t τ̂_t). Disjoint mean: each entry is the mean of the
trimmed, non-zero entries whose sign equals γ (0 if none). τ_m = α · that.

Threshold and tie rule: with N_t entries in τ_t, n = ⌈k·N_t⌉ entries are to be kept; the threshold is
exactly the n-th largest magnitude and every entry with |τ_t| ≥ threshold is kept, so entries tied with
the threshold are all kept (as the reference's ``>= kthvalue``), possibly more than n.

The threshold is a whole-model quantity, found in a first pass with bounded memory and no approximation:
a non-negative float32's bit pattern read as an int32 orders like the float itself, so a histogram of the
high 16 bits locates the bin holding the n-th largest magnitude, and a second histogram of the low 16 bits
of the entries in that bin pins the exact value (a two-digit radix select, 2 × T × 64 Ki counters).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from distac.merging.base import READ_AHEAD_BYTES, MergeMethod, check_number, iter_task_tensors

log = logging.getLogger(__name__)

_HIGH_BINS = 1 << 15  # the sign bit of |x| is 0, so the high half-word is < 2**15
_LOW_BINS = 1 << 16


def magnitude_halves(tensor: torch.Tensor, scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The high and low 16 bits of |tensor|'s float32 bit patterns (as int32, monotone in the magnitude),
    read as int16 views, without shifting or copying; |tensor| goes into ``scratch`` (float32, at least
    ``tensor.numel()`` entries) when given, so T tasks of one key share one buffer.

    Shifting an int32 tensor costs several times a ``bincount`` of it on CPU; reading the high half-word
    through a strided int16 view costs nothing. The high half is non-negative (the sign bit of |x| is 0);
    the low half is read as signed and must be masked with 0xFFFF once selected.
    """
    out = None if scratch is None else scratch[:tensor.numel()].view(tensor.shape)
    words = torch.abs(tensor.float(), out=out).reshape(-1).view(torch.int16).view(-1, 2)
    return (words[:, 1], words[:, 0]) if sys.byteorder == "little" else (words[:, 0], words[:, 1])


def _select_from_top(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin holding the ``rank``-th largest item (1-based) and that item's rank inside the bin."""
    from_top = counts.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, torch.tensor(rank, device=counts.device)))
    above = int(from_top[position - 1]) if position else 0
    return counts.numel() - 1 - position, rank - above


def _just_below(value: float) -> float:
    """The largest float32 smaller than ``value`` (a float32), or ``value`` itself when it is 0."""
    if value == 0:
        return 0.0
    return float(torch.nextafter(torch.tensor(value, dtype=torch.float32), torch.tensor(0.0)))


def _bits_to_float(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))


def _at_least(buffer: torch.Tensor | None, numel: int, device: torch.device) -> torch.Tensor:
    """``buffer`` if it holds ``numel`` float32 entries on ``device``, else a new one that does: buffers kept
    from key to key, since fresh memory for every tensor is page-faulted in again, which costs more than the
    arithmetic on it."""
    if buffer is not None and buffer.numel() >= numel and buffer.device == device:
        return buffer
    return torch.empty(numel, device=device)


def top_k_thresholds(vectors: Sequence[Mapping[str, torch.Tensor]], keys: Sequence[str], k: float,
                     device: torch.device, read_ahead_bytes: int = READ_AHEAD_BYTES) -> list[float]:
    """Per task vector, the exact ⌈k·N⌉-th largest magnitude over all its tensors (two passes)."""
    num_tasks = len(vectors)
    high = torch.zeros(num_tasks, _HIGH_BINS, dtype=torch.int64, device=device)
    scratch = None  # |τ|, reused from key to key
    for _, tensors, _ in iter_task_tensors(keys, vectors, device, read_ahead_bytes):
        scratch = _at_least(scratch, tensors[0].numel(), tensors[0].device)
        for t, tensor in enumerate(tensors):
            high[t] += torch.bincount(magnitude_halves(tensor, scratch)[0], minlength=_HIGH_BINS)
    totals = high.sum(dim=1).tolist()
    wanted = [max(1, math.ceil(k * total)) for total in totals]
    bins, ranks = zip(*(_select_from_top(high[t], wanted[t]) if totals[t] else (0, 0) for t in range(num_tasks)))

    low = torch.zeros(num_tasks, _LOW_BINS, dtype=torch.int64, device=device)
    for _, tensors, _ in iter_task_tensors(keys, vectors, device, read_ahead_bytes):
        scratch = _at_least(scratch, tensors[0].numel(), tensors[0].device)
        for t, tensor in enumerate(tensors):
            high_half, low_half = magnitude_halves(tensor, scratch)
            in_bin = low_half[high_half == bins[t]].to(torch.int32) & 0xFFFF
            low[t] += torch.bincount(in_bin, minlength=_LOW_BINS)
    thresholds = []
    for t in range(num_tasks):
        if not totals[t]:
            thresholds.append(0.0)
            continue
        low_bits, _ = _select_from_top(low[t], ranks[t])
        thresholds.append(_bits_to_float((bins[t] << 16) | low_bits))
    return thresholds


@dataclass
class Ties(MergeMethod):
    name = "ties"
    has_alpha = True
    needs_first_pass = True
    alpha: float = 1.0
    k: float = 0.2

    def validate(self) -> None:
        check_number(self.name, "alpha", self.alpha)
        check_number(self.name, "k", self.k, minimum=0.0, exclusive_minimum=True, maximum=1.0)

    def prepare(self, vectors: Sequence[Mapping[str, torch.Tensor]], keys: Sequence[str],
                device: torch.device, read_ahead_bytes: int = READ_AHEAD_BYTES) -> None:
        if self.k == 1:  # keep everything: no pass needed
            self.thresholds = [0.0] * len(vectors)
            return
        log.info("ties: two passes over %d tensors to find each task's global top-%g threshold", len(keys), self.k)
        self.thresholds = top_k_thresholds(vectors, keys, self.k, device, read_ahead_bytes)

    def merge_tensor(self, key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        thresholds = getattr(self, "thresholds", None)
        if thresholds is None or len(thresholds) != len(tensors):
            raise RuntimeError("ties: prepare() must run over the same task vectors before merge_tensor()")
        # Fused elementwise ops instead of boolean masks and torch.where, which are several times slower on
        # CPU. hardshrink keeps |x| > λ: with λ the float32 just below the threshold, that is |x| ≥ threshold.
        # The trimmed τ̂_t are recomputed in the second loop rather than kept, and every τ̂_t lands in the one
        # ``trimmed`` buffer: four tensors in memory whatever T is, three of them reused from key to key.
        limits = [_just_below(limit) for limit in thresholds]
        elected, trimmed, count = self._scratch(tensors[0])
        torch.hardshrink(tensors[0], limits[0], out=elected)
        for tensor, limit in zip(tensors[1:], limits[1:]):
            elected += torch.hardshrink(tensor, limit, out=trimmed)
        elected.sign_()
        magnitude_sum = torch.zeros_like(elected)
        count.zero_()
        for tensor, limit in zip(tensors, limits):
            agreeing = torch.hardshrink(tensor, limit, out=trimmed).mul_(elected).relu_()  # |τ̂_t| where sign = γ
            magnitude_sum += agreeing
            count += agreeing.sign_()
        # γ · Σ|τ̂_t| equals Σ τ̂_t over the agreeing entries exactly (negation is exact)
        return magnitude_sum.mul_(elected).mul_(self.alpha).div_(count.clamp_(min=1))

    def _scratch(self, like: torch.Tensor) -> list[torch.Tensor]:
        """Three float32 tensors shaped like ``like``, views of one buffer kept from key to key."""
        numel = like.numel()
        self._buffer = _at_least(getattr(self, "_buffer", None), 3 * numel, like.device)
        return [part.view(like.shape) for part in self._buffer[:3 * numel].view(3, numel)]
