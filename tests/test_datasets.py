"""The study's real data: scikit-learn's digits split (ntkjax.study.datasets)."""

from __future__ import annotations

import builtins

import numpy as np
import pytest

from ntkjax.study import datasets


def test_load_digits_split():
    pytest.importorskip("sklearn")
    data = datasets.load_digits()
    assert data.x_train.shape == (1257, 64) and data.x_test.shape == (540, 64)
    assert data.y_train.shape == (1257, 10) and data.y_test.shape == (540, 10)
    assert float(data.x_train.min()) == 0.0 and float(data.x_train.max()) == 1.0
    np.testing.assert_array_equal(np.argmax(data.y_test, 1), data.labels_test)
    np.testing.assert_array_equal(data.y_train.sum(1), 1.0)
    # stratified: class proportions of the test split match the full data within one sample
    counts_test = np.bincount(np.asarray(data.labels_test), minlength=10)
    counts_all = counts_test + np.bincount(np.asarray(data.labels_train), minlength=10)
    assert np.all(np.abs(counts_test - 0.3 * counts_all) <= 1.0)
    assert counts_all.sum() == 1797


def test_load_digits_without_sklearn(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install ntkjax\[examples\]"):
        datasets.load_digits()
