"""Random features of the NNGP / NTK (:mod:`ntkjax.features`): kernel regression in time linear
in the data.

* ``ntk_features_1m``: n = 1,000,000 synthetic inputs (d = 64, standard normal), targets
  ``sin(x W / sqrt(d))`` with 10 outputs, depth-3 ReLU MLP (width irrelevant: infinite; NTK
  parameterization, w_std = sqrt 2, b_std = 0.1), D = 1,024 NTK features: features and streamed
  ridge regression (:func:`ntkjax.feature_ridge`, diag_reg = 1e-4) in one pass over the data.
  Target: under 10 minutes and 6 GB on the 2-core CPU. Also reported: the held-out R^2 (10,000
  test points), the relative Frobenius and max errors of the feature NNGP / NTK against the
  exact kernels on a 2,000-point subset, and the exact kernel's cost: ``kernel_matrix`` timed at
  n = 4,000 and 8,000, ``t = a + b n^2`` fitted through both (a: its fixed cost, compilation
  included) and extrapolated to n = 40,000 and 1,000,000, with the memory of its NNGP + NTK
  (2 n^2 float32).
* ``ntk_features_digits``: scikit-learn digits (stratified 70/30), the demo's network (ReLU MLP
  512-512-10, NTK parameterization, w_std = sqrt 2, b_std = 0.1), ridge 1e-4 x the mean
  diagonal: test accuracy of NTK-feature regression against D (two keys each) and of exact NTK
  kernel regression (float64). One JSON line per D.
* ``cntk_features_digits``: the digits as 8 x 8 images, a ReLU CNN (one 3x3 SAME convolution,
  global average pooling, Dense(10): a CNTK-GAP, Arora et al. 2019), the same split and ridge:
  CNTK-feature regression against D (two keys each) and exact CNTK regression
  (``kernel_matrix``, float32; ~5 minutes on the 2-core CPU).
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import emit, log, peak_memory_mb

SQRT2 = math.sqrt(2.0)
DIAG_REG = 1e-4


def _timing(seconds: float, compile_s: float = 0.0) -> dict:
    return {"median_s": seconds, "compile_s": compile_s, "repeats": 1}


def _synthetic(n: int, d: int, outputs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Standard normal inputs and ``sin(x W / sqrt(d))`` targets, generated in chunks."""
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(12345).standard_normal((d, outputs)).astype(np.float32)
    x = np.empty((n, d), np.float32)
    for start in range(0, n, 1 << 18):
        stop = min(start + (1 << 18), n)
        x[start:stop] = rng.standard_normal((stop - start, d), dtype=np.float32)
    y = np.sin(x @ w / np.float32(math.sqrt(d)))
    return x, y


def ntk_features_1m(quick: bool = False) -> None:
    import ntkjax
    from ntkjax import models

    n, d, outputs, features, batch = (20_000, 64, 10, 1024, 4096) if quick else (
        1_000_000, 64, 10, 1024, 8192)
    module = models.MLP((512, 512, 512, outputs), "relu", w_std=SQRT2, b_std=0.1)
    x, y = _synthetic(n, d, outputs, seed=0)
    x_test, y_test = _synthetic(10_000, d, outputs, seed=1)
    log(f"ntk_features_1m: n = {n:,}, d = {d}, D = {features}, batch {batch}")
    fmap = ntkjax.feature_map(module, key=jax.random.key(0), num_features=features)

    t0 = time.perf_counter()
    fit = ntkjax.feature_ridge(fmap, x, y, diag_reg=DIAG_REG, batch_size=batch,
                               show_progress=True)
    jax.block_until_ready(fit.weights)
    fit_s = time.perf_counter() - t0
    fit_peak_mb = peak_memory_mb()
    pred = np.asarray(fit.predict(x_test))
    r2 = 1.0 - float(np.sum((pred - y_test) ** 2) / np.sum((y_test - y_test.mean(0)) ** 2))
    log(f"features + streamed ridge: {fit_s:.1f} s, peak {fit_peak_mb:.0f} MB, R^2 {r2:.4f}")

    # Approximation error on a 2,000-point subset.
    sub = jnp.asarray(x[:2000])
    exact = jax.jit(ntkjax.kernel_fn(module))(sub)
    f = fmap(sub)
    errors = {}
    for name, phi, k in (("ntk", f.ntk, exact.ntk), ("nngp", f.nngp, exact.nngp)):
        approx = np.asarray(jnp.matmul(phi, phi.T, precision="highest"), np.float64)
        k = np.asarray(k, np.float64)
        errors[f"{name}_rel_frobenius_2000"] = float(np.linalg.norm(approx - k)
                                                     / np.linalg.norm(k))
        errors[f"{name}_max_rel_2000"] = float(np.max(np.abs(approx - k)) / np.max(np.abs(k)))
    log(f"error on 2,000 points: {errors}")

    # The exact kernel: kernel_matrix timed at two sizes, extrapolated as n^2.
    sizes = (1000, 2000) if quick else (4000, 8000)
    block = sizes[0] // 2
    ntkjax.kernel_matrix(module, x[:block], block_size=block)  # compile outside the timing
    exact_s = []
    for m in sizes:
        t = time.perf_counter()
        ntkjax.kernel_matrix(module, x[:m], block_size=block)
        exact_s.append(time.perf_counter() - t)
        log(f"kernel_matrix n = {m}: {exact_s[-1]:.2f} s")
    # t = a + b n^2: a is kernel_matrix's fixed cost (it compiles on every call), b the cost
    # per pair of inputs.
    per_pair = (exact_s[1] - exact_s[0]) / (sizes[1] ** 2 - sizes[0] ** 2)
    fixed = exact_s[0] - per_pair * sizes[0] ** 2
    extrapolated = {m: fixed + per_pair * m**2 for m in (40_000, 1_000_000)}
    memory_gb = {m: 2 * m**2 * 4 / 1e9 for m in (40_000, 1_000_000)}
    emit(
        "ntk_features_1m",
        {"n": n, "d": d, "outputs": outputs, "depth": 3, "num_features": features,
         "batch_size": batch, "diag_reg": DIAG_REG, "dtype": "float32", "quick": quick},
        _timing(fit_s),
        accuracy={"test_r2": r2, **errors},
        fit_peak_memory_mb=round(fit_peak_mb, 1),
        target_s=600.0, target_peak_memory_mb=6144.0,
        exact_kernel_matrix_s={str(m): round(s, 3) for m, s in zip(sizes, exact_s, strict=True)},
        exact_fixed_s=round(fixed, 2), exact_s_per_million_pairs=round(per_pair * 1e6, 4),
        exact_extrapolated_s={str(m): round(s, 1) for m, s in extrapolated.items()},
        exact_memory_gb={str(m): round(g, 1) for m, g in memory_gb.items()},
        extrapolation=f"kernel_matrix (blocks of {block}) timed at n = {sizes}; t = a + b n^2 "
                      "through both, extrapolated",
    )


def ntk_features_digits(quick: bool = False) -> None:
    import ntkjax
    from ntkjax import models
    from ntkjax.study.datasets import load_digits

    digits = load_digits()
    module = models.MLP((512, 512, 10), "relu", w_std=SQRT2, b_std=0.1)
    labels = np.asarray(digits.labels_test)
    accuracy = lambda scores: float(np.mean(np.argmax(np.asarray(scores), -1) == labels))
    t = time.perf_counter()
    with jax.enable_x64(True):
        as64 = lambda a: jnp.asarray(np.asarray(a), jnp.float64)
        k_tt = np.asarray(ntkjax.kernel_fn(module)(as64(digits.x_train)).ntk)
        k_xt = np.asarray(ntkjax.kernel_fn(module)(as64(digits.x_test),
                                                   as64(digits.x_train)).ntk)
    lam = DIAG_REG * np.trace(k_tt) / k_tt.shape[0]
    exact = accuracy(k_xt @ np.linalg.solve(k_tt + lam * np.eye(k_tt.shape[0]),
                                            np.asarray(digits.y_train, np.float64)))
    exact_s = time.perf_counter() - t
    log(f"exact NTK regression: accuracy {exact:.4f} ({exact_s:.1f} s)")
    params = {"network": "ReLU MLP 512-512-10, NTK param., w_std = sqrt 2, b_std = 0.1",
              "diag_reg": DIAG_REG, "num_train": int(k_tt.shape[0]),
              "num_test": int(labels.size), "quick": quick}
    emit("ntk_features_digits", {**params, "num_features": "exact"}, _timing(exact_s),
         accuracy={"test_accuracy": exact})
    for features in (256, 1024) if quick else (256, 512, 1024, 2048, 4096, 8192):
        accs, secs = [], []
        for seed in (0, 1):
            t = time.perf_counter()
            fmap = ntkjax.feature_map(module, key=jax.random.key(seed), num_features=features)
            fit = ntkjax.feature_ridge(fmap, digits.x_train, digits.y_train, diag_reg=DIAG_REG)
            accs.append(accuracy(fit.predict(digits.x_test)))
            secs.append(time.perf_counter() - t)
        log(f"D = {features}: accuracy {accs} ({np.mean(secs):.1f} s each)")
        emit("ntk_features_digits", {**params, "num_features": features},
             _timing(float(np.mean(secs))),
             accuracy={"test_accuracy": float(np.mean(accs)), "per_key": accs,
                       "exact_test_accuracy": exact,
                       "gap_points": round(100 * (float(np.mean(accs)) - exact), 2)})


def cntk_features_digits(quick: bool = False) -> None:
    import ntkjax
    from ntkjax import models
    from ntkjax.study.datasets import load_digits

    digits = load_digits()
    n_train, n_test = (100, 100) if quick else (None, None)  # the split is shuffled already
    as_images = lambda a, k: np.asarray(a)[:k].reshape(-1, 8, 8, 1)
    x_train, x_test = as_images(digits.x_train, n_train), as_images(digits.x_test, n_test)
    y_train = np.asarray(digits.y_train)[:n_train]
    labels = np.asarray(digits.labels_test)[:n_test]
    module = models.CNN((64, 10), kernel_size=3, activation="relu",
                        readout="global_average_pool", w_std=SQRT2, b_std=0.1)
    accuracy = lambda scores: float(np.mean(np.argmax(np.asarray(scores), -1) == labels))
    t = time.perf_counter()
    k_tt = np.asarray(ntkjax.kernel_matrix(module, x_train).ntk, np.float64)
    k_xt = np.asarray(ntkjax.kernel_matrix(module, x_test, x_train).ntk, np.float64)
    lam = DIAG_REG * np.trace(k_tt) / k_tt.shape[0]
    exact = accuracy(k_xt @ np.linalg.solve(k_tt + lam * np.eye(k_tt.shape[0]), y_train))
    exact_s = time.perf_counter() - t
    log(f"exact CNTK-GAP regression: accuracy {exact:.4f} ({exact_s:.1f} s)")
    params = {"network": "ReLU CNN: 3x3 SAME conv, global average pooling, Dense(10); NTK "
                         "param., w_std = sqrt 2, b_std = 0.1",
              "images": [8, 8, 1], "diag_reg": DIAG_REG, "num_train": int(x_train.shape[0]),
              "num_test": int(x_test.shape[0]), "quick": quick}
    emit("cntk_features_digits", {**params, "num_features": "exact"}, _timing(exact_s),
         accuracy={"test_accuracy": exact})
    for features in (256, 512) if quick else (1024, 2048, 4096, 8192):
        accs, secs = [], []
        for seed in (0, 1):
            t = time.perf_counter()
            fmap = ntkjax.feature_map(module, key=jax.random.key(seed), num_features=features)
            fit = ntkjax.feature_ridge(fmap, x_train, y_train, diag_reg=DIAG_REG, batch_size=128)
            accs.append(accuracy(fit.predict(x_test)))
            secs.append(time.perf_counter() - t)
        log(f"D = {features}: accuracy {accs} ({np.mean(secs):.1f} s each)")
        emit("cntk_features_digits", {**params, "num_features": features},
             _timing(float(np.mean(secs))),
             accuracy={"test_accuracy": float(np.mean(accs)), "per_key": accs,
                       "exact_test_accuracy": exact,
                       "gap_points": round(100 * (float(np.mean(accs)) - exact), 2)})


WORKLOADS = {
    "ntk_features_1m": ntk_features_1m,
    "ntk_features_digits": ntk_features_digits,
    "cntk_features_digits": cntk_features_digits,
}
