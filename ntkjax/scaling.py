"""Power laws fitted in log-log: the scaling exponents that NTK theory predicts.

Finite-width corrections scale as powers of the width n (Jacot et al. 2018; Lee et al. 2019):
the empirical NTK deviates from its limit like ``n^-1/2``, the relative change of the kernel during
training falls like ``n^-1/2``. :func:`fit_power_law` measures such an exponent from data.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["PowerLawFit", "fit_power_law"]


class PowerLawFit(NamedTuple):
    """``y ~ prefactor * x**slope``, fitted by least squares on ``log y`` against ``log x``.

    Attributes:
      slope: the exponent.
      prefactor: the factor.

    >>> fit = PowerLawFit(slope=-0.5, prefactor=2.0)
    >>> fit.prefactor * 16.0**fit.slope
    0.5
    """

    slope: float
    prefactor: float


def fit_power_law(x: ArrayLike, y: ArrayLike) -> PowerLawFit:
    """Least-squares line through ``(log x, log y)``: ``log y = slope log x + log prefactor``.

    Args:
      x, y: equal-length sequences of >= 2 positive, finite numbers (e.g. widths and errors).

    Returns:
      :class:`PowerLawFit` ``(slope, prefactor)``.

    Raises:
      ValueError: for fewer than two points, unequal lengths, or values that are not positive
        and finite.

    >>> fit = fit_power_law([1.0, 4.0, 16.0], [2.0, 1.0, 0.5])  # y = 2 x^(-1/2)
    >>> round(fit.slope, 6), round(fit.prefactor, 6)
    (-0.5, 2.0)
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"need two equal-length arrays of >= 2 points; got {x.size} and {y.size}.")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x > 0) and np.all(y > 0)):
        raise ValueError("fit_power_law needs positive, finite x and y (it fits in log-log).")
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return PowerLawFit(slope=float(slope), prefactor=float(np.exp(intercept)))
