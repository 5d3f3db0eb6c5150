"""PyTorch baselines for the benchmarks page: the same workloads written the way a PyTorch user
would write them, on the same inputs and the same parameters, in the same process.

Needs the ``torch`` extra (``pip install -e ".[torch]"``); without torch each workload prints one
JSON line with ``"skipped"`` and returns. Timed in eager mode (``torch.func`` has no whole-program
compiler on CPU comparable to ``jax.jit``; ``torch.compile`` of ``vmap(jacrev)`` is not
supported for every workload below), with ``torch.set_num_threads`` left at its default (all
cores).

* ``torch_analytic_relu_mlp``: the arc-cosine NTK recursion of a ReLU MLP (Cho & Saul 2009;
  Jacot et al. 2018; Lee et al. 2019, NTK parameterization, w_std = sqrt 2, b_std = 0.1),
  written in torch tensor ops, on the inputs of ``analytic_relu_mlp`` (4000 x 64, depth 3 and
  10). PyTorch has no library of infinite-width kernels, so this is the hand-written formula a
  PyTorch user would reach for. Accuracy: against ntkjax's float64 ``kernel_fn``.
* ``torch_empirical_ntk``: the empirical NTK, trace over outputs, ``x2 = None``, for
  ``mlp_wide``, ``mlp_deep_o10`` and ``cnn`` of ``bench_empirical``, by the two recipes of
  PyTorch's own NTK tutorial: ``vmap(jacrev)`` Jacobians contracted with ``einsum``
  ("jacobian"), and NTK-vector products by ``vmap(vjp)`` then ``vmap(jvp)`` ("ntk_vp"). The flax
  model's parameters are copied into the torch modules, so the accuracy column compares with
  ntkjax's float64 structured kernel of the very same network.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import emit, log, time_call


def _torch() -> Any:
    try:
        import torch
    except ModuleNotFoundError:
        return None
    return torch


def _skip(workload: str) -> None:
    import json

    print(json.dumps({"workload": workload,
                      "skipped": "torch is not installed (pip install -e '.[torch]')"}),
          flush=True)


def _synchronous(result: Any) -> Any:
    """Torch on the CPU computes before it returns: nothing to wait for."""
    return result


def _linear(torch, dense: dict):
    """A ``torch.nn.Linear`` holding a flax ``Dense`` layer's ``kernel`` (in, out) and bias."""
    kernel = np.asarray(dense["kernel"])
    lin = torch.nn.Linear(*kernel.shape)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(kernel.T.copy()))
        lin.bias.copy_(torch.from_numpy(np.array(dense["bias"])))
    return lin


def _relu_mlp_ntk_torch(torch, x, depth: int, w_std: float, b_std: float):
    """NTK of ``depth`` ReLU layers then a linear readout, NTK parameterization.

    K_0 = w^2 x x'^T / d + b^2, Theta_0 = K_0; per layer, with cos t = K / sqrt(K(x,x) K(x',x')),
    K <- w^2 sqrt(K(x,x) K(x',x')) (sin t + (pi - t) cos t) / (2 pi) + b^2 and
    Theta <- K + w^2 Theta (pi - t) / (2 pi).
    """
    w2, b2 = w_std**2, b_std**2
    k = w2 * (x @ x.T) / x.shape[1] + b2
    q = w2 * (x * x).sum(1) / x.shape[1] + b2
    theta = k
    for _ in range(depth):
        norm = torch.sqrt(q[:, None] * q[None, :])
        cos = torch.clamp(k / norm, -1.0, 1.0)
        t = torch.arccos(cos)
        k_new = w2 * norm * (torch.sqrt(1 - cos * cos) + (math.pi - t) * cos) / (2 * math.pi) + b2
        theta = k_new + w2 * theta * (math.pi - t) / (2 * math.pi)
        k = k_new
        q = w2 * q / 2 + b2
    return theta


def torch_analytic_relu_mlp(quick: bool = False) -> None:
    torch = _torch()
    if torch is None:
        return _skip("torch_analytic_relu_mlp")
    import ntkjax
    from ntkjax import models

    n, d = (500, 64) if quick else (4000, 64)
    x = jax.random.normal(jax.random.PRNGKey(0), (n, d), jnp.float32)
    xt = torch.from_numpy(np.array(x))
    for depth in (3, 10):
        with torch.no_grad():
            timing = time_call(
                lambda depth=depth: _relu_mlp_ntk_torch(torch, xt, depth, math.sqrt(2), 0.1),
                repeats=5, wait=_synchronous)
        mlp = models.MLP((512,) * depth + (1,), "relu", w_std=float(np.sqrt(2)), b_std=0.1)
        with jax.enable_x64(True):
            ref = np.asarray(jax.jit(lambda a, m=mlp: ntkjax.kernel_fn(m)(a).ntk)(
                jnp.asarray(np.asarray(x), jnp.float64)))
        got = timing["result"].numpy().astype(np.float64)
        err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
        log(f"torch analytic depth {depth}: {timing['median_s']:.3f} s, err {err:.1e}")
        emit("torch_analytic_relu_mlp",
             {"n": n, "d": d, "depth": depth, "dtype": "float32", "get": "ntk", "quick": quick,
              "framework": f"torch {torch.__version__}", "threads": torch.get_num_threads()},
             timing, accuracy={"max_rel_err_vs_ntkjax_float64": err})


def _torch_mlp(torch, params: dict, names: list[str]):
    """A torch MLP (ReLU between Linear layers) holding the flax ``Dense`` parameters."""
    layers = []
    for i, name in enumerate(names):
        layers.append(_linear(torch, params[name]))
        if i < len(names) - 1:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def _torch_cnn(torch, params: dict):
    """Three 3x3 SAME ReLU convolutions then a flatten readout; channels-last flatten as flax."""

    class CNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = torch.nn.ModuleList()
            for i in range(3):
                kernel = np.asarray(params[f"Conv_{i}"]["kernel"])  # (kh, kw, cin, cout)
                conv = torch.nn.Conv2d(kernel.shape[2], kernel.shape[3], 3, padding=1)
                with torch.no_grad():
                    conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
                    conv.bias.copy_(torch.from_numpy(np.array(params[f"Conv_{i}"]["bias"])))
                self.convs.append(conv)
            self.readout = _linear(torch, params["Dense_0"])

        def forward(self, x):  # x: (N, H, W, C)
            h = x.permute(0, 3, 1, 2)
            for conv in self.convs:
                h = torch.relu(conv(h))
            return self.readout(h.permute(0, 2, 3, 1).reshape(h.shape[0], -1))

    return CNN()


def ntk_recipes(torch, module, outputs: str = "trace", trainable: list[str] | None = None):
    """The tutorial's two recipes: Jacobian contraction and NTK-vector products.

    ``outputs``: ``"trace"`` (N, M) or ``"full"`` (N, M, O, O). ``trainable``: None (every
    parameter) or the name prefixes of the parameters to differentiate; the others are held.
    """
    from torch.func import functional_call, jacrev, jvp, vjp, vmap

    named = {k: v.detach() for k, v in module.named_parameters()}
    params = {k: v for k, v in named.items()
              if trainable is None or any(k.startswith(t) for t in trainable)}
    fixed = {k: v for k, v in named.items() if k not in params}
    pattern = "Naf,Maf->NM" if outputs == "trace" else "Naf,Mbf->NMab"

    def f_single(p, x):
        return functional_call(module, {**fixed, **p}, (x[None],))[0]

    def jacobian(x):
        jac = vmap(jacrev(f_single), (None, 0))(params, x)
        return sum(torch.einsum(pattern, j.flatten(2), j.flatten(2)) for j in jac.values())

    def ntk_vp(x):
        def f(p):
            return functional_call(module, {**fixed, **p}, (x,))

        def per_output(v):  # v: (N, O) cotangent of the batch's outputs
            _, vjp_fn = vjp(f, params)
            (cotangents,) = vjp_fn(v)
            return jvp(f, (params,), (cotangents,))[1]

        n, o = f(params).shape
        basis = torch.eye(n * o, dtype=x.dtype if x.is_floating_point() else torch.float32)
        out = vmap(per_output)(basis.view(n * o, n, o)).view(n, o, n, o)
        if outputs == "trace":
            return torch.einsum("NaMa->NM", out)
        return out.permute(0, 2, 1, 3)

    return {"jacobian": jacobian, "ntk_vp": ntk_vp}


def torch_empirical_ntk(quick: bool = False, models: tuple[str, ...] | None = None) -> None:
    torch = _torch()
    if torch is None:
        return _skip("torch_empirical_ntk")
    import ntkjax
    from benchmarks.bench_empirical import _SPECS

    for name, (make, shape, n, *_rest) in _SPECS.items():
        if models is not None and name not in models:
            continue
        if quick:
            n = max(4, n // 8)
        model = make()
        x = jax.random.normal(jax.random.PRNGKey(0), (n, *shape), jnp.float32)
        params = model.init(jax.random.PRNGKey(1), x)["params"]
        with jax.enable_x64(True):
            p64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), {"params": params})
            ref = np.asarray(ntkjax.empirical_ntk_fn(model.apply, ntk_method="structured")(
                p64, np.asarray(x, np.float64)))
        if name == "cnn":
            module = _torch_cnn(torch, params)
        else:
            module = _torch_mlp(torch, params, sorted(params, key=lambda k: int(k.split("_")[1])))
        xt = torch.from_numpy(np.array(x))
        for method, fn in ntk_recipes(torch, module).items():
            log(f"torch {name}: {method}")
            timing = time_call(lambda fn=fn, xt=xt: fn(xt).detach(), repeats=3 if quick else 5,
                               wait=_synchronous)
            got = timing["result"].numpy().astype(np.float64)
            err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
            log(f"  {timing['median_s']:.3f} s, err {err:.1e}")
            emit("torch_empirical_ntk",
                 {"model": name, "method": method, "n": n, "input_shape": list(shape),
                  "outputs": "trace", "dtype": "float32", "x2": None, "quick": quick,
                  "framework": f"torch {torch.__version__}", "threads": torch.get_num_threads()},
                 timing, accuracy={"max_rel_err_vs_ntkjax_structured_float64": err})


WORKLOADS = {
    "torch_analytic_relu_mlp": torch_analytic_relu_mlp,
    "torch_empirical_ntk": torch_empirical_ntk,
}
