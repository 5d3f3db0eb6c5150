"""The empirical NTK of real models (issue 25): parameter subsets, the pseudo-NTK, the
chosen-logit kernel, the SignGD kernel and NNX modules, each against a float64 brute-force
Jacobian of the flattened parameters."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import ntkjax
from tests.helpers import max_relative_error
from tests.models_for_ntk import make_case


@contextlib.contextmanager
def _backend_compiles():
    """A list that collects the duration of every XLA backend compile made inside the block."""
    from jax import monitoring

    compiles: list[float] = []

    def listen(event: str, duration_secs: float, **_: str | int) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration_secs)

    monitoring.register_event_duration_secs_listener(listen)
    try:
        yield compiles
    finally:
        monitoring.unregister_event_duration_listener(listen)

METHODS = ("jacobian", "ntk_vp", "structured")
# (model, method) pairs: the reductions are views of the model, the same for every method;
# the structured method is the one that reads the model's layers, so it meets both models
PAIRS = [("mlp", "jacobian"), ("mlp", "ntk_vp"), ("mlp", "structured"), ("embed", "structured")]


def _jacobian(apply_fn, variables, x, select=None):
    """(N, O, P) float64 Jacobian with respect to the selected leaves of variables["params"]
    (``select(path_string) -> bool``), by forward differences of nothing: jacfwd of the
    flattened selected parameters."""
    params = variables["params"]
    flat = jax.tree_util.tree_flatten_with_path(params)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    names = ["/".join(k.key for k in kp) for kp, _ in flat[0]]
    keep = [select is None or select(name) for name in names]
    chosen = [leaf for leaf, k in zip(leaves, keep, strict=True) if k]
    vec, unravel = ravel_pytree(chosen)

    def f(v):
        it = iter(unravel(v))
        merged = [next(it) if k else leaf for leaf, k in zip(leaves, keep, strict=True)]
        out = apply_fn({**variables, "params": jax.tree_util.tree_unflatten(treedef, merged)}, x)
        return out.reshape(out.shape[0], -1)

    return np.asarray(jax.jit(jax.jacfwd(f))(vec))  # jitted: op by op, each op compiles apart


def _head_only(path, leaf):
    return path[0] == "Dense_2"


@pytest.mark.parametrize(("case", "method"), PAIRS)
def test_params_filter_differentiates_only_the_subset(case, method, x64):
    apply_fn, params, x1, x2 = make_case(case, jnp.float64)
    last = sorted(params["params"])[-1]  # the readout layer
    first = sorted(params["params"])[0]
    j1 = _jacobian(apply_fn, params, x1, lambda n: n.startswith(last) or n == f"{first}/bias")
    j2 = _jacobian(apply_fn, params, x2, lambda n: n.startswith(last) or n == f"{first}/bias")
    expected = np.einsum("aip,bjp->abij", j1, j2)
    mask = jax.tree_util.tree_map(lambda _: False, params["params"])
    mask[last] = True  # a prefix entry: the whole readout layer
    mask[first] = {"kernel": False, "bias": True} if "bias" in params["params"][first] else False
    predicate = (lambda path, leaf: path[0] == last
                 or ("bias" in params["params"][first] and path == (first, "bias")))
    for params_filter in (mask, predicate):
        ntk = ntkjax.empirical_ntk_fn(apply_fn, ntk_method=method, outputs="full",
                                      params_filter=params_filter)
        got = ntk(params, x1, x2)
        assert got.dtype == jnp.float64
        assert max_relative_error(got, expected) < 1e-10, (case, method)


def test_params_filter_freezes_the_rest_in_the_compiled_kernel():
    """The frozen leaves enter the program as constants: the Jacobian of a head-only kernel
    has the head's leaves only, so its cost does not grow with the frozen body."""
    apply_fn, params, x1, _ = make_case("mlp")
    seen = []

    def spy(path, leaf):
        seen.append(path)
        return path[0] == sorted(params["params"])[-1]

    ntk = ntkjax.empirical_ntk_fn(apply_fn, ntk_method="jacobian", params_filter=spy)
    plain = ntkjax.empirical_ntk_fn(apply_fn, ntk_method="jacobian")
    text = str(jax.make_jaxpr(ntk.__wrapped__)(params, x1))  # type: ignore[attr-defined]
    full = str(jax.make_jaxpr(plain.__wrapped__)(params, x1))  # type: ignore[attr-defined]
    assert set(seen) == {tuple(kp.key for kp in p) for p, _ in
                         jax.tree_util.tree_flatten_with_path(params["params"])[0]}
    assert len(text) < 0.8 * len(full)


def test_params_filter_errors_name_the_filter():
    apply_fn, params, x1, _ = make_case("mlp")
    nothing = ntkjax.empirical_ntk_fn(apply_fn, batch="per_sample",
                                     params_filter=lambda path, leaf: False)
    with pytest.raises(ValueError, match=r"params_filter=.*selects no parameter.*Dense_0/bias"):
        nothing(params, x1)
    with pytest.raises(ValueError, match="selects no parameter"):
        ntkjax.empirical_ntk_fn(apply_fn, params_filter={"Dense_0": False, "Dense_1": False,
                                                         "Dense_2": False})(params, x1)
    with pytest.raises(ValueError, match="no entry for Dense_1/bias"):
        ntkjax.empirical_ntk_fn(apply_fn, params_filter={"Dense_0": True})(params, x1)
    with pytest.raises(ValueError, match="must hold Python bools"):
        ntkjax.empirical_ntk_fn(apply_fn, params_filter={"Dense_0": 1, "Dense_1": 0,
                                                         "Dense_2": 0})(params, x1)


@pytest.mark.parametrize(("case", "method"), PAIRS)
def test_pseudo_ntk_is_the_kernel_of_the_summed_outputs(case, method, x64):
    apply_fn, params, x1, x2 = make_case(case, jnp.float64)
    j1, j2 = _jacobian(apply_fn, params, x1), _jacobian(apply_fn, params, x2)
    o = j1.shape[1]
    expected = j1.sum(1) @ j2.sum(1).T / o  # the trace eNTK of sum_i f_i / sqrt(O)
    np.testing.assert_allclose(expected, np.einsum("aip,bjp->ab", j1, j2) / o, rtol=1e-12)
    ntk = ntkjax.empirical_ntk_fn(apply_fn, ntk_method=method, outputs="pseudo")
    assert max_relative_error(ntk(params, x1, x2), expected) < 1e-10, method


@pytest.mark.parametrize(("case", "method"), PAIRS)
def test_chosen_logit_kernel_is_the_product_of_jacobian_rows(case, method, x64):
    apply_fn, params, x1, x2 = make_case(case, jnp.float64)
    j1, j2 = _jacobian(apply_fn, params, x1), _jacobian(apply_fn, params, x2)
    o = j1.shape[1]
    i1 = np.arange(x1.shape[0]) % o
    i2 = (np.arange(x2.shape[0]) + 1) % o
    expected = j1[np.arange(len(i1)), i1] @ j2[np.arange(len(i2)), i2].T
    ntk = ntkjax.empirical_ntk_fn(apply_fn, ntk_method=method, outputs="logit")
    got = ntk(params, x1, x2, index1=jnp.asarray(i1), index2=jnp.asarray(i2))
    assert max_relative_error(got, expected) < 1e-10, method
    if method != "jacobian":
        return
    rows = j1[:, o - 1]
    np.testing.assert_allclose(ntk(params, x1, index1=o - 1), rows @ rows.T, rtol=1e-10)
    jitted = jax.jit(lambda p, a, b, i, j: ntk(p, a, b, index1=i, index2=j))
    got = jitted(params, x1, x2, jnp.asarray(i1), jnp.asarray(i2))
    assert max_relative_error(got, expected) < 1e-10


def test_chosen_logit_errors():
    apply_fn, params, x1, x2 = make_case("mlp")
    ntk = ntkjax.empirical_ntk_fn(apply_fn, outputs="logit")
    with pytest.raises(ValueError, match="needs index1"):
        ntk(params, x1)
    with pytest.raises(ValueError, match=r"index1 must lie in \[0, 3\).*\[1\]"):
        ntk(params, x1, index1=jnp.array([0, 3, 1, 1, 1]))
    with pytest.raises(ValueError, match=r"index2 must be an int or have shape \(4,\)"):
        ntk(params, x1, x2, index1=0, index2=jnp.zeros(5, int))
    with pytest.raises(ValueError, match="must hold integers"):
        ntk(params, x1, index1=jnp.zeros(5))
    with pytest.raises(ValueError, match="outputs='logit'"):
        ntkjax.empirical_ntk_fn(apply_fn)(params, x1, index1=0)


def test_signgd_kernel_is_gradient_dot_sign_of_gradient(x64):
    apply_fn, params, x1, x2 = make_case("mlp", jnp.float64)
    j1, j2 = _jacobian(apply_fn, params, x1), _jacobian(apply_fn, params, x2)
    ntk = ntkjax.empirical_ntk_fn(apply_fn, variant="signgd", outputs="full")
    expected = np.einsum("aip,bjp->abij", j1, np.sign(j2))
    assert max_relative_error(ntk(params, x1, x2), expected) < 1e-10
    own = ntkjax.empirical_ntk_fn(apply_fn, variant="signgd")(params, x1)
    np.testing.assert_allclose(own, np.einsum("aip,bip->ab", j1, np.sign(j1)), rtol=1e-10)
    assert not np.allclose(own, own.T)  # asymmetric: not symmetrized away
    head = ntkjax.empirical_ntk_fn(apply_fn, variant="signgd", outputs="pseudo",
                                   params_filter=lambda path, leaf: path[-1] == "bias")
    js1 = _jacobian(apply_fn, params, x1, lambda n: n.endswith("bias")).sum(1)
    js2 = _jacobian(apply_fn, params, x2, lambda n: n.endswith("bias")).sum(1)
    o = j1.shape[1]
    np.testing.assert_allclose(head(params, x1, x2), js1 @ np.sign(js2).T / np.sqrt(o),
                               rtol=1e-10)  # g = sum_i f_i / sqrt(O); sign(dg) drops the scale
    with pytest.raises(ValueError, match=r"variant='signgd'.*ntk_method='jacobian'"):
        ntkjax.empirical_ntk_fn(apply_fn, variant="signgd", ntk_method="structured")


def _nnx_net(dtype=jnp.float64):
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(3, 6, rngs=rngs, param_dtype=dtype)
            self.norm = nnx.LayerNorm(6, rngs=rngs, param_dtype=dtype)
            self.l2 = nnx.Linear(6, 2, rngs=rngs, param_dtype=dtype)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.norm(self.l1(x))))

    return Net(nnx.Rngs(0))


def test_nnx_module_passed_directly(x64):
    from flax import nnx

    net = _nnx_net()
    x1 = jax.random.normal(jax.random.key(1), (4, 3), jnp.float64)
    x2 = jax.random.normal(jax.random.key(2), (3, 3), jnp.float64)
    graphdef, state = nnx.split(net, nnx.Param)
    vec, unravel = ravel_pytree(state)

    def jac(x):
        return np.asarray(jax.jit(jax.jacfwd(lambda v: nnx.merge(graphdef, unravel(v))(x)))(vec))

    j1, j2 = jac(x1), jac(x2)
    expected = np.einsum("aip,bjp->abij", j1, j2)
    apply_fn, params = ntkjax.nnx_apply_fn(net)
    reference = ntkjax.empirical_ntk_fn(apply_fn, outputs="full", ntk_method="jacobian")(
        params, x1, x2)
    for method in ("jacobian", "ntk_vp"):  # (no linen layer: "structured" is "jacobian")
        ntk = ntkjax.empirical_ntk_fn(net, ntk_method=method, outputs="full",
                                      batch="per_sample")
        for params in (net, None, state) if method == "jacobian" else (net,):
            got = ntk(params, x1, x2)
            assert got.dtype == jnp.float64
            assert max_relative_error(got, expected) < 1e-10, method
            assert max_relative_error(got, reference) < 1e-10, method
    head = ntkjax.empirical_ntk_fn(net, params_filter=lambda path, leaf: path[0] == "l2")
    order = [jax.tree_util.keystr(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    sizes = [np.size(v) for v in jax.tree_util.tree_leaves(state)]
    starts = np.cumsum([0, *sizes])
    sel = np.concatenate([np.arange(starts[i], starts[i + 1]) for i, name in enumerate(order)
                          if "'l2'" in name])
    np.testing.assert_allclose(head(net, x1, x2),
                               np.einsum("aip,bip->ab", j1[..., sel], j2[..., sel]), rtol=1e-10)



def test_nnx_and_linen_mixups_are_refused():
    from flax import nnx

    net = _nnx_net(jnp.float32)
    x = jnp.ones((2, 3))
    apply_fn, variables, _, _ = make_case("mlp")
    with pytest.raises(ValueError, match=r"built from a flax.nnx Module.*linen variables"):
        ntkjax.empirical_ntk_fn(net)(variables, x)
    with pytest.raises(ValueError, match="nnx Module passed has another structure"):
        ntkjax.empirical_ntk_fn(net)(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), x)
    with pytest.raises(ValueError, match=r"got a flax.nnx Net for a flax.linen apply_fn"):
        ntkjax.empirical_ntk_fn(apply_fn)(net, jnp.ones((2, 6)))
    with pytest.raises(ValueError, match=r"got a flax.nnx State for a flax.linen apply_fn"):
        ntkjax.empirical_ntk_fn(apply_fn)(nnx.state(net, nnx.Param), jnp.ones((2, 6)))
    dropout = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
                             nnx.Dropout(0.5, rngs=nnx.Rngs(1)))
    with pytest.raises(ValueError, match="training mode"):
        ntkjax.empirical_ntk_fn(dropout)


def test_projected_features_are_unbiased_with_error_falling_like_dim_to_minus_half(x64):
    """Squared errors over 24 keys at three feature counts (rank 4: 4, 16 and 64 Kronecker
    blocks shared by the model's 6 leaves): the RMS error's fitted slope in D is -1/2 (a sum
    of D independent features), and at each D the mean over the keys is within 4 standard
    errors of the exact (float64 Jacobian) eNTK."""
    apply_fn, params, x1, _ = make_case("mlp", jnp.float64)
    j = _jacobian(apply_fn, params, x1)
    exact = np.einsum("aip,bip->ab", j, j)
    dims, keys = (64, 256, 1024), 24
    rms = []
    for dim in dims:
        estimates = np.stack([
            np.einsum("aip,bip->ab", phi, phi) for phi in (
                ntkjax.projected_ntk_features(apply_fn, params, x1, dim=dim, rank=4,
                                              key=jax.random.key(s)) for s in range(keys))
        ])
        errors = np.linalg.norm(estimates - exact, axis=(1, 2)) / np.linalg.norm(exact)
        rms.append(np.sqrt(np.mean(errors**2)))
        mean_error = np.linalg.norm(estimates.mean(0) - exact) / np.linalg.norm(exact)
        assert mean_error < 4 * rms[-1] / np.sqrt(keys), (dim, mean_error, rms[-1])
    slope = np.polyfit(np.log(dims), np.log(rms), 1)[0]
    assert -0.65 <= slope <= -0.35, (slope, rms)


def test_shared_space_variance_matches_the_gaussian_closed_form(x64):
    """``|sum_l R_l^T g_l|^2`` over 4,000 keys in one shared space (rank 2, D = 16 = 4
    Kronecker blocks) for two matrices, a vector of 9 (more than rank^2: Kronecker blocks of
    it as a 3 x 3 matrix) and a vector of 3 (a dense sketch): its mean is ``sum_l |g_l|^2``
    and its variance the closed form of Gaussian moments, ``sum_l (2 |G_l|^4 + (4 r + 2)
    sum_k s_{l,k}^4) / D`` (``s`` the singular values; no second term for the dense sketch)
    ``+ 4 sum_{l<m} |g_l|^2 |g_m|^2 / D`` (the cross terms of independent leaves)."""
    from ntkjax.structured import project_gradient

    rng = np.random.default_rng(0)
    grads = [rng.normal(size=(1, 1, 6, 5)), rng.normal(size=(1, 1, 4, 7)),
             rng.normal(size=(1, 1, 9)), rng.normal(size=(1, 1, 3))]
    matrices = [grads[0][0, 0], grads[1][0, 0], grads[2][0, 0].reshape(3, 3)]
    dim, rank, keys = 16, 2, 4000

    def squared_norm(key):
        phi = sum(project_gradient(jnp.asarray(g), jax.random.fold_in(key, i), dim, rank)
                  for i, g in enumerate(grads))
        return jnp.sum(phi**2)

    samples = np.asarray(jax.jit(jax.vmap(squared_norm))(
        jax.random.split(jax.random.key(11), keys)))
    norms = np.array([np.sum(g**2) for g in grads])
    quartic = [np.sum(np.linalg.svd(m, compute_uv=False) ** 4) for m in matrices]
    cross = sum(norms[a] * norms[b] for a in range(4) for b in range(a + 1, 4))
    variance = (2 * np.sum(norms**2) + (4 * rank + 2) * sum(quartic) + 4 * cross) / dim
    assert abs(samples.mean() - norms.sum()) < 4 * np.sqrt(variance / keys)
    assert samples.var() == pytest.approx(variance, rel=0.15), (samples.var(), variance)


def test_projected_features_in_blocks_streamed_and_for_feature_ridge(tmp_path, x64):
    apply_fn, params, x1, _ = make_case("mlp", jnp.float64)
    key = jax.random.key(3)
    whole = ntkjax.projected_ntk_features(apply_fn, params, x1, dim=16, key=key)
    assert whole.shape == (x1.shape[0], 3, 16) and whole.dtype == np.float64
    blocks = ntkjax.projected_ntk_features(apply_fn, params, x1, dim=16, key=key, block_size=2)
    np.testing.assert_allclose(blocks, whole, rtol=1e-12, atol=1e-12 * np.abs(whole).max())
    stored = ntkjax.projected_ntk_features(apply_fn, params, x1, dim=16, key=key, block_size=2,
                                           out=tmp_path / "features")
    assert stored.shape == (x1.shape[0], 1, *whole.shape[1:])
    np.testing.assert_allclose(stored[:][:, 0], whole, rtol=1e-12,
                               atol=1e-12 * np.abs(whole).max())
    # the readout only: its two leaves (bias, kernel: leaves 0 and 1 of the selection)
    # projected from their float64 Jacobians
    head = ntkjax.projected_ntk_features(apply_fn, params, x1, dim=16, key=key,
                                         params_filter=lambda path, leaf: path[0] == "Dense_2")
    j = _jacobian(apply_fn, params, x1, select=lambda name: name.startswith("Dense_2/"))
    bias = params["params"]["Dense_2"]["bias"].size
    from ntkjax.structured import project_gradient

    n, o = j.shape[:2]
    kernel_shape = params["params"]["Dense_2"]["kernel"].shape
    want = (project_gradient(jnp.asarray(j[..., :bias]), jax.random.fold_in(key, 0), 16, 16)
            + project_gradient(jnp.asarray(j[..., bias:]).reshape(n, o, *kernel_shape),
                               jax.random.fold_in(key, 1), 16, 16))
    np.testing.assert_allclose(head, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())
    fmap = ntkjax.projected_ntk_feature_fn(apply_fn, params, dim=16, key=key)
    feats = fmap(x1)
    np.testing.assert_allclose(feats.ntk @ feats.ntk.T, np.einsum("aip,bip->ab", whole, whole),
                               rtol=1e-10)
    fit = ntkjax.feature_ridge(fmap, x1, np.arange(x1.shape[0], dtype=np.float64), diag_reg=0.0)
    np.testing.assert_allclose(fit.predict(x1), np.arange(x1.shape[0]), atol=1e-6)


def test_projected_features_errors():
    apply_fn, params, x1, _ = make_case("mlp")
    key = jax.random.key(0)
    for bad in (0, -16, 2.5):
        with pytest.raises(ValueError, match="dim must be a positive integer"):
            ntkjax.projected_ntk_features(apply_fn, params, x1, dim=bad, key=key)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        ntkjax.projected_ntk_features(apply_fn, params, x1, dim=16, rank=0, key=key)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        ntkjax.projected_ntk_feature_fn(apply_fn, params, dim=16, rank=-1, key=key)
    with pytest.raises(ValueError, match="array of logits"):
        ntkjax.projected_ntk_features(
            lambda p, x: jnp.argmax(jnp.asarray(apply_fn(p, x)), -1), params, x1, dim=16, key=key)
    with pytest.raises(ValueError, match="must return one array"):
        ntkjax.projected_ntk_features(lambda p, x: (apply_fn(p, x),) * 2, params, x1,
                                      dim=16, key=key)


@pytest.mark.parametrize("case", ["embed", "cnn"])
def test_factored_projections_of_embeddings_and_convolutions_are_unbiased(case, x64):
    """Embed (token rows of P_in) and Conv (patches, in parts) on positions: the mean over
    16 keys is within 4 standard errors of the exact float64 eNTK."""
    apply_fn, params, x1, _ = make_case(case, jnp.float64, n1=3)
    j = _jacobian(apply_fn, params, x1)
    exact = np.einsum("aip,bip->ab", j, j)
    keys = 16
    estimates = np.stack([
        np.einsum("aip,bip->ab", phi, phi) for phi in (
            ntkjax.projected_ntk_features(apply_fn, params, x1, dim=16, key=jax.random.key(s))
            for s in range(keys))
    ])
    errors = np.linalg.norm(estimates - exact, axis=(1, 2)) / np.linalg.norm(exact)
    mean_error = np.linalg.norm(estimates.mean(0) - exact) / np.linalg.norm(exact)
    assert mean_error < 4 * np.sqrt(np.mean(errors**2)) / np.sqrt(keys), (mean_error, errors)


def test_blocked_matrix_takes_the_filter_and_the_pseudo_ntk(x64):
    apply_fn, params, x1, _ = make_case("mlp", jnp.float64)
    j = _jacobian(apply_fn, params, x1, lambda n: n.startswith("Dense_2")).sum(1)
    expected = j @ j.T / 3  # the pseudo-NTK of the readout layer
    got = ntkjax.empirical_ntk_matrix(apply_fn, params, x1, outputs="pseudo", block_size=2,
                                      params_filter={"Dense_0": False, "Dense_1": False,
                                                     "Dense_2": True})
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    with pytest.raises(ValueError, match="does not take outputs='logit'"):
        ntkjax.empirical_ntk_matrix(apply_fn, params, x1, outputs="logit")


@pytest.mark.parametrize("method", ["structured", "jacobian"])
def test_blocks_are_bit_for_bit_their_kernel_calls(method):
    """float32, 7 examples in blocks of 3 (the last one padded): every block of
    empirical_ntk_matrix is, bit for bit, the kernel function on that block's padded rows, and
    the symmetric evaluation (upper triangle, mirrored) is bit for bit the full grid. (Blocks
    of another size can differ in the last bits: see the rounding note of ntkjax.structured.)
    """
    from ntkjax._tiling import pad_rows

    apply_fn, params, x, _ = make_case("embed", n1=7)
    b, n = 3, x.shape[0]
    mirrored = ntkjax.empirical_ntk_matrix(apply_fn, params, x, block_size=b, ntk_method=method,
                                           outputs="full")
    grid = ntkjax.empirical_ntk_matrix(apply_fn, params, x, x, block_size=b, ntk_method=method,
                                       outputs="full")
    ntk = ntkjax.empirical_ntk_fn(apply_fn, ntk_method=method, batch="per_sample",
                                  outputs="full")
    for i in range(0, n, b):
        m1 = min(b, n - i)
        # a diagonal block of the symmetric run is the kernel function's x2=None call
        block = np.asarray(ntk(params, pad_rows(x[i:i + b], b)))
        np.testing.assert_array_equal(block[:m1, :m1], mirrored[i:i + m1, i:i + m1])
        for j in range(0, n, b):
            block = np.asarray(ntk(params, pad_rows(x[i:i + b], b), pad_rows(x[j:j + b], b)))
            m2 = min(b, n - j)
            np.testing.assert_array_equal(block[:m1, :m2], grid[i:i + m1, j:j + m2])
            if j != i:  # the off-diagonal blocks of the symmetric run, mirrored or not
                np.testing.assert_array_equal(mirrored[i:i + m1, j:j + m2],
                                              grid[i:i + m1, j:j + m2])


def test_matrix_calls_after_the_first_neither_trace_nor_compile(monkeypatch):
    """Per-call overhead of empirical_ntk_matrix, counted rather than timed: a second call
    (same apply_fn, same shapes, new parameter values) runs the model's Python code zero times,
    compiles nothing and does not probe for batch coupling again; the symmetric matrix that
    fits one block is the kernel function's x2=None call bit for bit (its per-sample work done
    once, not twice)."""
    from ntkjax import empirical

    probes = []
    probe = empirical.is_batch_coupled
    monkeypatch.setattr(empirical, "is_batch_coupled",
                        lambda *args: probes.append(1) or probe(*args))

    model_apply, variables, tokens, _ = make_case("embed", n1=5)
    moved = jax.tree_util.tree_map(lambda a: 1.5 * a, variables)
    calls = []

    def apply_fn(p, x):
        calls.append(x.shape)
        return model_apply(p, x)

    with _backend_compiles() as compiles:
        first = ntkjax.empirical_ntk_matrix(apply_fn, variables, tokens)
        assert calls and compiles and probes == [1]
        calls.clear()
        compiles.clear()
        probes.clear()
        again = ntkjax.empirical_ntk_matrix(apply_fn, moved, tokens)
        assert (calls, compiles, probes) == ([], [], [])
    ntk = ntkjax.empirical_ntk_fn(apply_fn, batch="per_sample")
    np.testing.assert_array_equal(first, np.asarray(ntk(variables, tokens)))
    np.testing.assert_array_equal(again, np.asarray(ntk(moved, tokens)))


@pytest.mark.parametrize("outputs", ["trace", "full"])
def test_token_blocks_of_the_factored_form_give_the_jacobian_kernel(outputs, monkeypatch, x64):
    """The factored form in blocks of one position (the smallest pair-product budget) against
    the float64 Jacobian method and against the one-block factored form, on a sequence model
    (Embed then Dense on 3 positions): equal to 1e-10."""
    from ntkjax import structured

    apply_fn, params, x1, x2 = make_case("embed", jnp.float64)
    exact = ntkjax.empirical_ntk_fn(apply_fn, ntk_method="jacobian", outputs=outputs)(
        params, x1, x2)

    def factored():  # a new function per call: traced afresh
        return jax.jit(lambda p, a, b: structured.structured_kernel(
            apply_fn, p, a, b, outputs=outputs, form="factored"))

    whole = factored()(params, x1, x2)
    monkeypatch.setattr(structured, "_PAIR_BLOCK_BYTES", 1)  # blocks of one position
    program = factored()
    assert "scan" in str(program.trace(params, x1, x2).jaxpr)  # the blocks are there
    blocked = program(params, x1, x2)
    np.testing.assert_allclose(blocked, exact, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(blocked, whole, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("block_size", [None, 2])
def test_symmetric_matrix_to_a_store_equals_the_one_in_memory(block_size, tmp_path):
    """The zarr-store path of the symmetric matrix (diagonal blocks through the kernel's
    x2=None program, compiled on first use) gives the in-memory result bit for bit, in one
    block and in blocks of 2 (the last one padded)."""
    apply_fn, params, x, _ = make_case("embed", n1=5)
    in_memory = ntkjax.empirical_ntk_matrix(apply_fn, params, x, block_size=block_size)
    stored = ntkjax.empirical_ntk_matrix(apply_fn, params, x, block_size=block_size,
                                         out=tmp_path / "k.zarr")
    np.testing.assert_array_equal(np.asarray(stored[:]), in_memory)
    np.testing.assert_array_equal(in_memory, in_memory.T)


def test_streamed_projected_features_compile_once(tmp_path):
    """projected_ntk_features to a store: a second call (another store, same shapes) compiles
    nothing and writes the same features (counted, not timed)."""
    apply_fn, params, x, _ = make_case("embed", n1=5)
    with _backend_compiles() as compiles:
        stores = []
        for name in ("first.zarr", "second.zarr"):
            compiles.clear()
            stores.append(ntkjax.projected_ntk_features(
                apply_fn, params, x, dim=16, key=jax.random.key(3), out=tmp_path / name))
        assert compiles == []
    np.testing.assert_array_equal(np.asarray(stores[0][:]), np.asarray(stores[1][:]))


def test_in_memory_projected_features_keep_one_program_while_free_memory_drifts():
    """projected_ntk_features in memory sizes its blocks from the free memory. Two budgets
    that allow different row counts within one power of two (free memory drifts between
    calls) give the same blocks: the second call compiles nothing (it used to compile a new
    program for each block size, ~2 s a call on the guide's model), and its features equal
    those of one whole block (the last block is padded, not reshaped)."""
    from ntkjax import empirical

    apply_fn, params, x, _ = make_case("mlp", n1=14)  # blocks of 4, 4, 4 and 2 (padded)
    dim, key = 16, jax.random.key(5)

    def rows_of(budget: int) -> int:
        return empirical._projection_rows(apply_fn, params, x, dim, budget)

    budget = next(b for b in (int(1.05 ** k) for k in range(200, 800))
                  if rows_of(b) == 4 and rows_of(int(1.3 * b)) == 4)
    whole = ntkjax.projected_ntk_features(apply_fn, params, x, dim=dim, key=key, block_size=14)
    first = ntkjax.projected_ntk_features(apply_fn, params, x, dim=dim, key=key,
                                          memory_bytes=budget)
    with _backend_compiles() as compiles:
        again = ntkjax.projected_ntk_features(apply_fn, params, x, dim=dim, key=key,
                                              memory_bytes=int(1.3 * budget))
    assert compiles == []
    np.testing.assert_array_equal(again, first)
    np.testing.assert_allclose(first, whole, rtol=1e-5, atol=1e-6)
