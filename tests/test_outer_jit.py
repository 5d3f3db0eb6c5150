"""``empirical_ntk_fn(batch="auto")`` under an outer ``jax.jit`` with no earlier concrete call
(issue 25): the batch coupling is decided while tracing, on stand-in values, so the program holds
one kernel -- not a ``lax.cond`` over the per-example and the whole-batch kernels, whose
``(N O, P)`` Jacobian alone can exceed the memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkjax
from ntkjax import empirical
from tests.models_for_ntk import make_case


def _independent(params, x):
    return jnp.tanh(x @ params["w"])


def _centered(params, x):  # couples the examples through the batch mean
    return jnp.tanh((x - x.mean(0)) @ params["w"])


def _counting(monkeypatch) -> dict:
    """How often each Jacobian kernel is traced from now on."""
    traced = {"whole": 0, "per_sample": 0}
    for name, attr in (("whole", "_whole_batch_jacobians"),
                       ("per_sample", "_per_sample_jacobians")):
        fn = getattr(empirical, attr)

        def wrapped(*args, fn=fn, name=name):
            traced[name] += 1
            return fn(*args)

        monkeypatch.setattr(empirical, attr, wrapped)
    return traced


@pytest.mark.parametrize("model,coupled", [(_independent, False), (_centered, True)])
def test_outer_jit_traces_only_the_kernel_the_probe_decides(model, coupled, monkeypatch):
    traced = _counting(monkeypatch)
    x = jax.random.normal(jax.random.key(0), (4, 3))
    params = {"w": jax.random.normal(jax.random.key(1), (3, 2))}
    ntk = ntkjax.empirical_ntk_fn(model, ntk_method="jacobian")
    jaxpr = jax.make_jaxpr(lambda p, x: ntk(p, x))(params, x)
    assert "cond" not in str(jaxpr)
    assert traced == ({"whole": 1, "per_sample": 0} if coupled else
                      {"whole": 0, "per_sample": 1})
    got = jax.jit(lambda p, x: ntk(p, x))(params, x)
    # the kernel by hand: Jacobians of the batched or the per-example function
    flat = jax.jacrev(lambda w: model({"w": w}, x))(params["w"])  # (N, O, 3, 2)
    if not coupled:
        flat = jnp.stack([jax.jacrev(lambda w, a=a: model({"w": w}, x[a:a + 1])[0])(params["w"])
                          for a in range(4)])
    want = np.einsum("aikl,bikl->ab", flat, flat)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_outer_jit_probes_integer_inputs_on_valid_token_ids(monkeypatch):
    """Token ids stand in as 0 or 1: the embedding model is found independent, and only the
    per-example kernel is traced."""
    apply_fn, params, tokens, _ = make_case("embed")
    traced = _counting(monkeypatch)
    ntk = ntkjax.empirical_ntk_fn(apply_fn, ntk_method="jacobian")
    jaxpr = jax.make_jaxpr(lambda p, x: ntk(p, x))(params, tokens)
    assert "cond" not in str(jaxpr)
    assert traced == {"whole": 0, "per_sample": 1}


def _log_centered(params, x):  # coupled; NaN on the stand-ins' negative entries
    logs = jnp.log(x)
    return (logs - logs.mean(0)) @ params["w"]


def test_a_probe_that_gives_nan_counts_as_coupled(monkeypatch):
    """Stand-in inputs in [-1, 1) make this model's probe NaN. Undecided must mean the
    whole-batch kernel (exact for either kind of function), not the per-example one (wrong
    here: the rows are centred by the batch mean)."""
    traced = _counting(monkeypatch)
    x = 0.5 + jax.random.uniform(jax.random.key(2), (4, 3))
    params = {"w": jax.random.normal(jax.random.key(3), (3, 1))}
    got = jax.jit(ntkjax.empirical_ntk_fn(_log_centered, ntk_method="jacobian"))(params, x)
    assert traced == {"whole": 1, "per_sample": 0}
    logs = np.log(np.asarray(x, np.float64))
    jac = logs - logs.mean(0)  # d f_a / d w for one output
    np.testing.assert_allclose(got, jac @ jac.T, rtol=1e-5, atol=1e-6)


def test_a_model_that_closes_over_traced_values_is_probed_in_the_program():
    """A model built inside the outer trace (scaled by a traced number, as a model linearized
    around traced parameters is) has no concrete stand-in: the program probes it, and the
    coupled model still gets its whole-batch kernel."""
    x = jax.random.normal(jax.random.key(4), (4, 3))
    params = {"w": jax.random.normal(jax.random.key(5), (3, 2))}

    def kernel_of_scaled_model(scale, params, x):
        ntk = ntkjax.empirical_ntk_fn(lambda p, x: scale * _centered(p, x),
                                      ntk_method="jacobian")
        return ntk(params, x)

    got = jax.jit(kernel_of_scaled_model)(2.0, params, x)
    flat = jax.jacrev(lambda w: 2.0 * _centered({"w": w}, x))(params["w"])
    np.testing.assert_allclose(got, np.einsum("aikl,bikl->ab", flat, flat), rtol=1e-5,
                               atol=1e-6)
