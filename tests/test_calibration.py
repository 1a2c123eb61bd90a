"""ECE, confidence statistics and temperature scaling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distac.calibration import (calibrate, confidence_stats, expected_calibration_error, fit_temperature,
                                negative_log_likelihood)
from distac.errors import ConfigError


def test_ece_exact_on_a_hand_made_example():
    probs = [[0.9, 0.05, 0.05],   # conf 0.9, correct  → bin (0.75, 1]
             [0.6, 0.3, 0.1],     # conf 0.6, wrong    → bin (0.5, 0.75]
             [0.2, 0.7, 0.1],     # conf 0.7, correct  → bin (0.5, 0.75]
             [0.4, 0.35, 0.25]]   # conf 0.4, wrong    → bin (0.25, 0.5]
    labels = [0, 1, 1, 2]
    # 1/4·|1 − 0.9| + 2/4·|0.5 − 0.65| + 1/4·|0 − 0.4|
    assert expected_calibration_error(probs, labels, n_bins=4) == pytest.approx(0.2, abs=1e-12)
    assert expected_calibration_error(np.array(probs), np.array(labels), n_bins=1) == pytest.approx(
        abs(0.5 - (0.9 + 0.6 + 0.7 + 0.4) / 4), abs=1e-12)


def test_ece_is_zero_for_perfect_one_hot_predictions():
    labels = torch.tensor([0, 2, 1])
    assert expected_calibration_error(torch.eye(3)[labels], labels) == 0.0


def test_ece_rejects_bad_input():
    with pytest.raises(ConfigError, match="labels"):
        expected_calibration_error([[0.5, 0.5]], [2])
    with pytest.raises(ConfigError, match="logits"):
        expected_calibration_error([[2.0, -1.0]], [0])
    with pytest.raises(ConfigError, match="n_bins"):
        expected_calibration_error([[0.5, 0.5]], [0], n_bins=0)


def test_confidence_stats_exact():
    stats = confidence_stats(torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]]))
    assert stats.mean_max_prob == pytest.approx((0.5 + 0.75) / 2)
    entropy_b = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert stats.mean_entropy == pytest.approx((math.log(2) + entropy_b) / 2)
    assert stats.scaled_confidence == pytest.approx((0.625 - 0.5) / 0.5)
    assert stats.normalized_entropy == pytest.approx(stats.mean_entropy / math.log(2))


def _calibrated_logits(n: int = 4000, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits z with labels drawn from softmax(z): calibrated at T = 1 by construction."""
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(n, classes, generator=g, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).squeeze(1)
    return logits, labels


def test_fit_temperature_recovers_the_overconfidence_factor():
    logits, labels = _calibrated_logits()
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.1)
    assert fit_temperature(4.0 * logits, labels) == pytest.approx(4.0, rel=0.1)


def test_temperature_scaling_lowers_ece_of_an_overconfident_model():
    logits, labels = _calibrated_logits()
    fit, held_out = slice(0, 2000), slice(2000, None)
    report = calibrate(4.0 * logits[fit], labels[fit], eval_logits=4.0 * logits[held_out],
                       eval_labels=labels[held_out])
    assert report.temperature > 3
    assert report.ece_after < report.ece_before / 3
    assert report.nll_after < report.nll_before
    assert report.nll_after == pytest.approx(negative_log_likelihood(4.0 * logits[held_out], labels[held_out],
                                                                     report.temperature))
    assert set(report.to_dict()) == {"temperature", "ece_before", "ece_after", "nll_before", "nll_after", "n_bins"}
