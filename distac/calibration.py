"""Confidence and calibration: ECE, mean max-probability / entropy, post-hoc temperature scaling.

The paper's guideline is "overconfident → merge → calibrate": an overconfident merged model is fixed after
the merge by one scalar temperature fitted on labeled validation data (Guo et al., 2017).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from distac.errors import ConfigError

ArrayLike = torch.Tensor | np.ndarray | list


def _as_tensor(values: ArrayLike, name: str, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(values) if isinstance(values, list) else values).to(dtype)
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ConfigError(f"{name} contains NaN or Inf values")
    return tensor


def _check_labels(scores: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if scores.ndim != 2:
        raise ConfigError(f"{name} must be a [N, C] matrix, got shape {tuple(scores.shape)}")
    if labels.ndim != 1 or labels.shape[0] != scores.shape[0]:
        raise ConfigError(f"labels must be a vector of length {scores.shape[0]} (one per row of {name}), "
                          f"got shape {tuple(labels.shape)}")
    if scores.shape[0] == 0:
        raise ConfigError(f"{name} is empty")
    if labels.min() < 0 or labels.max() >= scores.shape[1]:
        raise ConfigError(f"labels must lie in [0, {scores.shape[1] - 1}], got {int(labels.min())}.."
                          f"{int(labels.max())}")


def expected_calibration_error(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """ECE = Σ_b |B_b|/N · |accuracy(B_b) − mean confidence(B_b)|.

    Confidence is the max probability; bins are equal-width, (i/n, (i+1)/n], the first one closed at 0.
    """
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ConfigError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    probs = _as_tensor(probs, "probs", torch.float64)
    labels = _as_tensor(labels, "labels", torch.int64)
    _check_labels(probs, labels, "probs")
    if probs.min() < 0 or probs.max() > 1 + 1e-6:
        raise ConfigError("probs must lie in [0, 1] (pass softmax probabilities, not logits)")
    confidence, prediction = probs.max(dim=1)
    correct = (prediction == labels).double()
    bins = torch.clamp(torch.ceil(confidence * n_bins).long() - 1, 0, n_bins - 1)
    error = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            error += float(in_bin.double().mean() * (correct[in_bin].mean() - confidence[in_bin].mean()).abs())
    return error


@dataclass(frozen=True)
class ConfidenceStats:
    """How confident a model is, label-free: mean max softmax probability and mean entropy (nats)."""

    mean_max_prob: float
    mean_entropy: float
    num_classes: int

    @property
    def chance(self) -> float:
        return 1.0 / self.num_classes

    @property
    def scaled_confidence(self) -> float:
        """(mean max-prob − 1/C) / (1 − 1/C): 0 at chance, 1 for one-hot predictions.

        For a model that fits label smoothing ε exactly this equals 1 − ε, whatever C is.
        """
        if self.num_classes < 2:
            return 1.0
        return (self.mean_max_prob - self.chance) / (1.0 - self.chance)

    @property
    def normalized_entropy(self) -> float:
        """Mean entropy / log C, in [0, 1]."""
        return self.mean_entropy / math.log(self.num_classes) if self.num_classes > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "scaled_confidence": self.scaled_confidence,
                "normalized_entropy": self.normalized_entropy}


def confidence_stats(logits: ArrayLike) -> ConfidenceStats:
    """Mean max-probability and mean entropy of softmax(logits) over the rows."""
    logits = _as_tensor(logits, "logits", torch.float64)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ConfigError(f"logits must be a non-empty [N, C] matrix, got shape {tuple(logits.shape)}")
    log_probs = F.log_softmax(logits, dim=1)
    probs = log_probs.exp()
    entropy = -(probs * log_probs).sum(dim=1)
    return ConfidenceStats(mean_max_prob=float(probs.max(dim=1).values.mean()),
                           mean_entropy=float(entropy.mean()), num_classes=int(logits.shape[1]))


def negative_log_likelihood(logits: ArrayLike, labels: ArrayLike, temperature: float = 1.0) -> float:
    logits = _as_tensor(logits, "logits", torch.float64)
    labels = _as_tensor(labels, "labels", torch.int64)
    _check_labels(logits, labels, "logits")
    return float(F.cross_entropy(logits / temperature, labels))


def fit_temperature(logits: ArrayLike, labels: ArrayLike, max_iter: int = 100) -> float:
    """The temperature T > 0 minimizing the NLL of softmax(logits / T); LBFGS on log T (so T stays > 0)."""
    logits = _as_tensor(logits, "logits", torch.float64)
    labels = _as_tensor(labels, "labels", torch.int64)
    _check_labels(logits, labels, "logits")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


@dataclass(frozen=True)
class CalibrationReport:
    """Temperature scaling fitted on one split, measured (ECE, NLL) before and after on another."""

    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    n_bins: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate(logits: ArrayLike, labels: ArrayLike, *, eval_logits: ArrayLike | None = None,
              eval_labels: ArrayLike | None = None, n_bins: int = 15) -> CalibrationReport:
    """Fit T on (logits, labels); report ECE/NLL on (eval_logits, eval_labels), the fit data by default."""
    temperature = fit_temperature(logits, labels)
    if (eval_logits is None) != (eval_labels is None):
        raise ConfigError("give both eval_logits and eval_labels, or neither")
    if eval_logits is None:
        eval_logits, eval_labels = logits, labels
    eval_logits = _as_tensor(eval_logits, "eval_logits", torch.float64)
    probs_before = F.softmax(eval_logits, dim=1)
    probs_after = F.softmax(eval_logits / temperature, dim=1)
    return CalibrationReport(
        temperature=temperature,
        ece_before=expected_calibration_error(probs_before, eval_labels, n_bins),
        ece_after=expected_calibration_error(probs_after, eval_labels, n_bins),
        nll_before=negative_log_likelihood(eval_logits, eval_labels),
        nll_after=negative_log_likelihood(eval_logits, eval_labels, temperature),
        n_bins=n_bins)
