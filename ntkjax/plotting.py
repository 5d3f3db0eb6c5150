"""matplotlib figures for ntkjax, in one consistent style.

Every function takes data (numpy arrays or dicts of them), draws one figure, saves it as PNG when
``path`` is given, and returns the ``Figure``. Titles, labelled axes, log scales where the
quantity spans decades, and colorbars on heatmaps. Uses the non-interactive Agg backend.

Edit this file only with small inserts/replacements: several sweep/demo figures live here.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 130,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 9,
    "figure.autolayout": False,
}


def new_figure(ncols: int = 1, nrows: int = 1, *, width: float = 5.0, height: float = 4.0):
    """A figure with ``nrows x ncols`` axes in the ntkjax style."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows),
                                 squeeze=False)
    return fig, axes


def save_figure(fig, path: str | Path | None):
    """Lays out ``fig``, writes it as PNG when ``path`` is given, closes it, and returns it."""
    with plt.rc_context(STYLE):
        fig.tight_layout()
        if path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path)
    plt.close(fig)
    return fig
