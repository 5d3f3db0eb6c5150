"""fit_power_law against exact power laws and noisy ones with known exponents."""

from __future__ import annotations

import numpy as np
import pytest

from ntkjax.scaling import fit_power_law


def test_fit_power_law_recovers_exact_law():
    widths = np.array([64, 256, 1024, 4096])
    fit = fit_power_law(widths, 3.0 * widths**-0.5)
    assert abs(fit.slope + 0.5) < 1e-12 and abs(fit.prefactor - 3.0) < 1e-10
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([1, 2], [1.0, -1.0])


def test_fit_power_law_on_noisy_data_within_its_standard_error():
    # log-normal noise of 5 % on y = 2 x^-0.75: least squares in log-log is unbiased, and its
    # slope's standard error is 0.05 / sqrt(sum (log x - mean)^2)
    rng = np.random.default_rng(0)
    x = np.geomspace(16, 16384, 40)
    y = 2.0 * x**-0.75 * np.exp(0.05 * rng.standard_normal(x.size))
    fit = fit_power_law(x, y)
    se = 0.05 / np.sqrt(np.sum((np.log(x) - np.log(x).mean()) ** 2))
    assert abs(fit.slope + 0.75) < 4 * se


def test_fit_power_law_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2 points"):
        fit_power_law([1.0], [1.0])
    with pytest.raises(ValueError, match="equal-length"):
        fit_power_law([1.0, 2.0, 3.0], [1.0, 2.0])
