"""The empirical NTK of real models (issue 25): a GPT-2-shaped transformer and a ResNet-18,
ntkjax against ``torch.func`` on an equivalent PyTorch model holding the same weights.

Workloads (float32; ``--quick``: tiny sizes, well under a minute each):

* ``entk_gpt_small``: token ``nn.Embed`` (vocabulary 2,000), learned positions (an ``nn.Embed``
  of the 128 positions, as in GPT-2), 12 pre-LN blocks (``nn.MultiHeadDotProductAttention``, 12
  heads, causal mask; GELU MLP 768 -> 3072 -> 768), final LayerNorm, a 2-class head on the last
  token: 86.7M parameters. Trace eNTK by ntkjax's structured method through
  :func:`ntkjax.empirical_ntk_matrix` (memory-bounded blocks, budget ``memory_gb``), N = 64
  and 256. The line also states the gradient-FLOP floor: ``N x`` the FLOPs of one example's
  gradient (XLA's cost analysis of the compiled ``grad``) over the matmul rate measured in
  the same run (a 2048 x 2048 float32 matmul), and the Jacobian floor ``jacobian_floor_s``
  (the same with the compiled per-example ``jacrev`` of both outputs, which the trace eNTK
  needs: one forward and two backward passes).
* ``entk_resnet18``: a CIFAR-style ResNet-18 (3x3 stem, 4 stages of 2 basic blocks, 64 to 512
  channels, ``BatchNorm`` in inference mode with non-trivial running statistics, global
  average pool) on 32 x 32 x 3, 10 outputs, the full ``(N, N, 10, 10)`` eNTK, N = 64.
* ``entk_projected``: the GPT model's projected eNTK (:func:`ntkjax.projected_ntk_features`:
  every parameter leaf projected into one shared space of D = 4,096 features per output by
  LoGra-style Kronecker blocks of rank ``rank``) for N examples, streamed to a zarr store;
  relative error (Frobenius) of ``Phi Phi^T`` against the exact trace eNTK on the first
  ``subset`` examples. The issue's size is N = 10,000, subset 256.
* ``entk_lora``: the trace eNTK over the last two blocks only (``params_filter``) against the
  full kernel, same model and inputs, same run.
* ``entk_token_blocks``: peak RSS of the structured method's factored form in token blocks
  against the same pair products formed whole (a dense layer on T = 1024 and 2048 positions,
  N = 8), each in a child process.

The PyTorch side runs in a child process (its own peak memory; an address-space limit of
``torch_memory_gb`` turns running out of memory into a measured failure rather than the
machine's OOM killer) with the recipes of PyTorch's NTK tutorial: ``vmap(jacrev)`` Jacobians
contracted with ``einsum`` ("jacobian") and NTK-vector products (``vmap`` of ``vjp`` then
``jvp``, "ntk_vp"). It tries N = 1, 2, 4, ... up to the workload's N, and stops at the first
failure (reported with the allocation that failed) or when the next size would exceed
``torch_time_cap_s`` at the measured growth rate (reported as not tried). Without torch it
prints a ``"skipped"`` line. Each torch line's accuracy compares with ntkjax's float32 kernel
of the same examples; each ntkjax line's with ntkjax's float64 structured kernel of the first
examples.

Sizes: ``python -m benchmarks.bench_entk_real WORKLOAD [--quick] [--n N ...] [--subset S]
[--dim-total D] [--rank R] [--memory-gb G] [--torch-memory-gb G] [--torch-time-cap-s S]
[--schedule {auto,blocks,two_pass}] [--skip-torch] [--save-kernel K.npz] [--store S]
[--skip-exact]``; ``python -m benchmarks.run WORKLOAD [--quick]`` runs the defaults. The
issue's projected run in two steps, so that the exact kernel is computed once: ``entk_gpt_small
--n 256 --skip-torch --save-kernel K.npz``, ``entk_projected --store S --skip-exact`` (N =
10,000; the store is kept and resumed), then ``entk_projected_error --store S --exact-kernel
K.npz`` (the first 256 rows; the tokens are checked to be the same sequences).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

import ntkjax
from benchmarks.harness import emit, log, peak_memory_mb, time_call

# ----------------------------------------------------------------------------- models


class _Block(nn.Module):
    """Pre-LN transformer block: causal multi-head attention, then a GELU MLP, residuals."""

    width: int
    heads: int

    @nn.compact
    def __call__(self, h, mask):
        a = nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(
            nn.LayerNorm(name="ln1")(h), mask=mask)
        h = h + a
        m = nn.Dense(4 * self.width, name="fc")(nn.LayerNorm(name="ln2")(h))
        return h + nn.Dense(self.width, name="proj")(nn.gelu(m))


class GPT(nn.Module):
    """GPT-2-shaped classifier: tokens ``(N, T)`` -> logits ``(N, classes)`` of the last token."""

    vocab: int = 2000
    seq: int = 128
    width: int = 768
    heads: int = 12
    blocks: int = 12
    classes: int = 2

    @nn.compact
    def __call__(self, tokens):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        h = nn.Embed(self.vocab, self.width, name="wte")(tokens)
        h = h + nn.Embed(self.seq, self.width, name="wpe")(positions)
        mask = nn.make_causal_mask(tokens)
        for i in range(self.blocks):
            h = _Block(self.width, self.heads, name=f"block_{i}")(h, mask)
        h = nn.LayerNorm(name="ln_f")(h)
        return nn.Dense(self.classes, name="head")(h[:, -1])


def _bn(name):
    return nn.BatchNorm(use_running_average=True, name=name)


class _BasicBlock(nn.Module):
    features: int
    strides: int

    @nn.compact
    def __call__(self, x):
        pad = ((1, 1), (1, 1))
        h = nn.Conv(self.features, (3, 3), self.strides, pad, use_bias=False, name="conv1")(x)
        h = nn.relu(_bn("bn1")(h))
        h = nn.Conv(self.features, (3, 3), 1, pad, use_bias=False, name="conv2")(h)
        h = _bn("bn2")(h)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), self.strides, "VALID", use_bias=False,
                        name="down_conv")(x)
            x = _bn("down_bn")(x)
        return nn.relu(h + x)


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: images ``(N, H, W, 3)`` -> logits ``(N, classes)``."""

    widths: tuple = (64, 128, 256, 512)
    blocks_per_stage: int = 2
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(self.widths[0], (3, 3), 1, ((1, 1), (1, 1)), use_bias=False, name="stem")(x)
        h = nn.relu(_bn("stem_bn")(h))
        for s, f in enumerate(self.widths):
            for b in range(self.blocks_per_stage):
                h = _BasicBlock(f, 2 if (b == 0 and s > 0) else 1, name=f"stage{s}_{b}")(h)
        return nn.Dense(self.classes, name="head")(h.mean(axis=(1, 2)))


_GPT_REAL = {"vocab": 2000, "seq": 128, "width": 768, "heads": 12, "blocks": 12, "classes": 2}
_GPT_QUICK = {"vocab": 50, "seq": 8, "width": 64, "heads": 4, "blocks": 2, "classes": 2}
_RESNET_REAL = {"widths": [64, 128, 256, 512], "blocks_per_stage": 2, "classes": 10, "size": 32}
_RESNET_QUICK = {"widths": [8, 16], "blocks_per_stage": 1, "classes": 10, "size": 8}


def _gpt(cfg: dict, n: int, seed: int = 0):
    model = GPT(**cfg)
    # example i's tokens depend on i only, so the first rows agree for every N (the projected
    # run's subset and the exact N = 256 run see the same sequences)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))
    tokens = jax.vmap(lambda k: jax.random.randint(k, (cfg["seq"],), 0, cfg["vocab"]))(keys)
    variables = model.init(jax.random.key(1), tokens[:1])
    return model, variables, tokens


def _resnet(cfg: dict, n: int, seed: int = 0):
    model = ResNet18(tuple(cfg["widths"]), cfg["blocks_per_stage"], cfg["classes"])
    s = cfg["size"]
    x = jax.random.normal(jax.random.key(seed), (n, s, s, 3), jnp.float32)
    variables = model.init(jax.random.key(1), x[:1])
    # non-trivial inference statistics and affine parameters, so BatchNorm is not the identity
    keys = iter(jax.random.split(jax.random.key(2), 4 * len(jax.tree.leaves(variables))))

    def perturb(path, v):
        name = path[-1].key
        if name == "mean":
            return 0.1 * jax.random.normal(next(keys), v.shape)
        if name == "var":
            return jax.random.uniform(next(keys), v.shape, minval=0.5, maxval=1.5)
        if name == "scale":
            return 1.0 + 0.1 * jax.random.normal(next(keys), v.shape)
        if name == "bias" and len(path) > 2:  # norm biases (the head's stays)
            return 0.1 * jax.random.normal(next(keys), v.shape)
        return v

    variables = jax.tree_util.tree_map_with_path(perturb, variables)
    return model, variables, x


def _param_count(variables) -> int:
    return int(sum(v.size for v in jax.tree.leaves(variables["params"])))


# ----------------------------------------------------------------------------- measurements


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _rel_fro(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _float64_check(model, variables, x, got, outputs: str, k: int, params_filter=None) -> float:
    """Max relative error of ``got[:k, :k]`` against ntkjax's float64 structured kernel."""
    with jax.enable_x64(True):
        v64 = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
        xk = np.asarray(x[:k])
        if np.issubdtype(xk.dtype, np.floating):
            xk = xk.astype(np.float64)
        ref = ntkjax.empirical_ntk_fn(model.apply, ntk_method="structured", outputs=outputs,
                                      params_filter=params_filter)(v64, xk)
        return _rel(np.asarray(got)[:k, :k], np.asarray(ref))


def _matmul_gflops(size: int = 2048) -> float:
    """This CPU's float32 matmul rate now, GFLOP/s (median of a few jitted calls)."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    timing = time_call(lambda: mm(a), repeats=5)
    return 2 * size**3 / timing["median_s"] / 1e9


def _example_gflops(model, variables, x1, jacobian: bool) -> float:
    """FLOPs of one example's gradient of its summed outputs (``grad``) or, with ``jacobian``,
    of its Jacobian of all its outputs (``jacrev``: one forward pass and a backward pass per
    output): XLA's cost analysis of the compiled program, GFLOP."""
    params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}

    def outputs(p):
        return model.apply({"params": p, **rest}, x1).reshape(-1)

    fn = jax.jacrev(outputs) if jacobian else jax.grad(lambda p: jnp.sum(outputs(p)))
    return _compiled_gflops(jax.jit(fn).lower(params))


def _compiled_gflops(lowered) -> float:
    """XLA's cost analysis of a lowered program, compiled: its FLOPs, GFLOP."""
    cost = lowered.compile().cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost["flops"]) / 1e9


def _projected_example_gflops(model, variables, x1, dim: int, rank: int) -> float:
    """FLOPs of one example's projected eNTK features (one forward pass, a backward pass to
    the activations per output, and the Kronecker projections): XLA's cost analysis of
    ``projected_ntk_features``' compiled block program on one example, GFLOP."""
    from ntkjax.empirical import _jitted_projection, _projections

    projections = _projections(model.apply, variables, x1, jax.random.key(0), dim, rank, None)
    block = _jitted_projection(model.apply, dim, rank, None)
    return _compiled_gflops(block.lower(variables, x1, projections))


def _pair_gflops(cfg: dict, n: int) -> float:
    """FLOPs of the exact trace eNTK's pair stage for the GPT ``cfg`` at N examples (upper
    triangle, N (N + 1) / 2 pairs), GFLOP: per dense layer on T positions (K inputs, F
    outputs, O outputs of the model) the cheaper of the factored ``T^2 (K + F O)`` and the
    materialized ``K F O`` multiply-adds per pair (the materialized form's per-example
    gradients ``O T K F`` are linear in N and counted apart); the token table factored is
    ``T^2 (1 + F O)``. Attention's q, k, v and output projections are ``width x width``."""
    w, t, o = cfg["width"], cfg["seq"], cfg["classes"]
    dense = [(w, w)] * 4 + [(w, 4 * w), (4 * w, w)]
    per_pair = cfg["blocks"] * sum(min(t * t * (k + f * o), k * f * o) for k, f in dense)
    per_pair += min(t * t * (1 + w * o), cfg["vocab"] * w * o) + w * o  # token table, head
    return 2.0 * n * (n + 1) / 2 * per_pair / 1e9


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _emit_ntkjax(workload, params, timing, accuracy, **extra):
    first = timing["median_s"] + timing["compile_s"]
    if "peak_memory_mb" in timing:
        extra = {"peak_memory_mb": timing["peak_memory_mb"], **extra}
    return emit(workload, {**params, "framework": f"ntkjax (jax {jax.__version__})"}, timing,
                accuracy=accuracy, first_call_s=round(first, 3), load_avg_1min=_load(),
                **extra)


def _warm_compilation_cache() -> None:
    """A per-process persistent compilation cache, so that the programs the workloads build
    outside ``empirical_ntk_matrix`` (which reuses its own across calls) compile once."""
    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="entk_jaxcache_"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def _cpu_seconds() -> float:
    """This process's user + system CPU seconds so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _ntkjax_kernel(model, variables, x, outputs, memory_gb, params_filter=None, repeats=1,
                   schedule="auto", one_call=False):
    """Times ``empirical_ntk_matrix`` (structured, memory budget ``memory_gb``, ``schedule``).
    ``one_call``: one call, compilation included (``compile_s`` 0), for runs of minutes. The
    timing also holds ``cpu_s`` (this process's user + system CPU seconds over the calls) and,
    when the two-pass schedule ran, ``two_pass``: its last call's pass-1 and pass-2 seconds,
    factor bytes, whether they were spilled to disk and pass 1's block."""
    record: dict = {}
    real = ntkjax.empirical.two_pass_kernel

    def recording(*args, **kwargs):
        return real(*args, **kwargs, timings=record)

    def run():
        return ntkjax.empirical_ntk_matrix(
            model.apply, variables, x, ntk_method="structured", outputs=outputs,
            memory_bytes=int(memory_gb * 2**30), params_filter=params_filter, schedule=schedule)

    cpu = _cpu_seconds()
    ntkjax.empirical.two_pass_kernel = recording
    try:
        if one_call:
            start = time.perf_counter()
            result = run()
            timing = {"median_s": time.perf_counter() - start, "compile_s": 0.0, "repeats": 1,
                      "result": result}
        else:
            timing = time_call(run, repeats=repeats, wait=lambda r: r)
    finally:
        ntkjax.empirical.two_pass_kernel = real
    timing["cpu_s"] = round(_cpu_seconds() - cpu, 1)
    timing["peak_memory_mb"] = round(peak_memory_mb(), 1)  # before the accuracy checks
    if record:
        timing["two_pass"] = {k: round(v, 2) if isinstance(v, float) else v
                              for k, v in record.items()}
    return timing


# ----------------------------------------------------------------------------- torch side


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


def _torch_side(workload: str, kind: str, cfg: dict, variables, x, ns: list[int],
                methods: list[str], outputs: str, reference: np.ndarray, *,
                memory_gb: float, time_cap_s: float, trainable: list[str] | None = None,
                quick: bool) -> None:
    """Runs the torch.func recipes in a child process and emits one line per (method, N)."""
    if not _torch_available():
        print(json.dumps({"workload": workload, "framework": "torch",
                          "skipped": "torch is not installed (pip install -e '.[torch]')"}),
              flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="entk_torch_") as tmp:
        flat = traverse_util.flatten_dict(jax.device_get(variables), sep="/")
        np.savez(os.path.join(tmp, "weights.npz"), **{k: np.asarray(v) for k, v in flat.items()})
        np.save(os.path.join(tmp, "x.npy"), np.asarray(x))
        spec = {"kind": kind, "cfg": cfg, "ns": ns, "start": min(ns) if quick else 1,
                "methods": methods, "outputs": outputs, "memory_gb": memory_gb,
                "time_cap_s": time_cap_s, "trainable": trainable, "dir": tmp}
        with open(os.path.join(tmp, "spec.json"), "w") as f:
            json.dump(spec, f)
        cmd = [sys.executable, "-m", "benchmarks.bench_entk_real", "--torch-child", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        sys.stderr.write(proc.stderr[-4000:])
        rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 and not rows:
            rows = [{"method": "?", "n": None, "status": f"child exited {proc.returncode}"}]
        for row in rows:
            params = {"method": row["method"], "n": row["n"], "outputs": outputs,
                      "dtype": "float32", "quick": quick,
                      "framework": f"torch {row.get('torch', '?')} (torch.func, eager)",
                      "threads": row.get("threads"),
                      "address_space_limit_gb": memory_gb}
            if row.get("status") != "ok":
                print(json.dumps({"workload": workload, "params": params,
                                  "status": row.get("status"), "error": row.get("error"),
                                  "load_avg_1min": _load()}), flush=True)
                continue
            got = np.load(os.path.join(tmp, row["kernel_file"]))
            n = row["n"]
            accuracy = {"max_rel_err_vs_ntkjax_float32": _rel(got, reference[:n, :n])}
            timing = {"median_s": row["median_s"], "compile_s": 0.0, "repeats": row["repeats"]}
            emit(workload, params, timing, accuracy=accuracy,
                 peak_memory_mb=row["peak_rss_mb"], status="ok", load_avg_1min=_load())


def _torch_child(tmp: str) -> None:
    """Child process: builds the torch model, runs the recipes, prints one JSON row each."""
    import torch

    from benchmarks.bench_torch import ntk_recipes

    with open(os.path.join(tmp, "spec.json")) as f:
        spec = json.load(f)
    limit = int(spec["memory_gb"] * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    weights = dict(np.load(os.path.join(tmp, "weights.npz")))
    x_all = torch.from_numpy(np.load(os.path.join(tmp, "x.npy")))
    module = (_torch_gpt(torch, spec["cfg"], weights) if spec["kind"] == "gpt"
              else _torch_resnet(torch, spec["cfg"], weights))
    module.eval()
    recipes = ntk_recipes(torch, module, spec["outputs"], spec["trainable"])
    target = max(spec["ns"])
    for method in spec["methods"]:
        if spec["start"] > 1:  # eager torch's first call pays one-time set-up: not timed
            recipes[method](x_all[:1])
        last = None  # (n, seconds) of the last success
        for n in _doubling(spec["start"], target):
            row: dict[str, Any] = {"method": method, "n": n, "torch": torch.__version__,
                                   "threads": torch.get_num_threads()}
            growth = 2.0 if method == "jacobian" else 4.0  # vjp+jvp of the batch per column
            if last is not None and last[1] * growth > spec["time_cap_s"]:
                row.update(status="not tried",
                           error=f"N={last[0]} took {last[1]:.1f} s; N={n} would take about "
                                 f"{last[1] * growth:.0f} s > cap {spec['time_cap_s']} s")
                print(json.dumps(row), flush=True)
                break
            try:
                t0 = time.perf_counter()
                k = recipes[method](x_all[:n]).detach()
                dt = time.perf_counter() - t0
            except (RuntimeError, MemoryError) as err:
                msg = str(err).strip().splitlines()[0][:300] if str(err).strip() else repr(err)
                oom = isinstance(err, MemoryError) or "alloc" in msg.lower()
                row.update(status=f"out of memory at N={n}" if oom else "error", error=msg)
                print(json.dumps(row), flush=True)
                break
            name = f"k_{method}_{n}.npy"
            np.save(os.path.join(tmp, name), k.numpy())
            rss = _peak_rss_mb()
            row.update(status="ok", median_s=dt, repeats=1, kernel_file=name, peak_rss_mb=rss)
            print(json.dumps(row), flush=True)
            last = (n, dt)


def _peak_rss_mb() -> float:
    """This process's peak resident set (``VmHWM``): unlike ``ru_maxrss``, which a child
    started by fork + exec inherits from its parent, it counts this program only."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _doubling(start: int, target: int) -> list[int]:
    """``start``, twice that, ... then ``target``: the sizes the torch side tries."""
    sizes = [start]
    while sizes[-1] * 2 < target:
        sizes.append(sizes[-1] * 2)
    return [*sizes, target] if target > start else sizes


def _t(torch, a) -> Any:
    return torch.from_numpy(np.ascontiguousarray(a, np.float32))


def _torch_gpt(torch, cfg: dict, w: dict):
    """The GPT model in torch, holding the flax weights (same math: flax's attention scaling,
    mask value, LayerNorm epsilon 1e-6, tanh GELU)."""
    width, heads = cfg["width"], cfg["heads"]
    head_dim = width // heads

    def linear(prefix, fan_in, fan_out):
        lin = torch.nn.Linear(fan_in, fan_out)
        with torch.no_grad():
            lin.weight.copy_(_t(torch, w[f"{prefix}/kernel"].reshape(fan_in, fan_out).T))
            lin.bias.copy_(_t(torch, w[f"{prefix}/bias"].reshape(fan_out)))
        return lin

    def norm(prefix):
        ln = torch.nn.LayerNorm(width, eps=1e-6)
        with torch.no_grad():
            ln.weight.copy_(_t(torch, w[f"{prefix}/scale"]))
            ln.bias.copy_(_t(torch, w[f"{prefix}/bias"]))
        return ln

    class Block(torch.nn.Module):
        def __init__(self, p):
            super().__init__()
            self.ln1, self.ln2 = norm(f"{p}/ln1"), norm(f"{p}/ln2")
            self.q = linear(f"{p}/attn/query", width, width)
            self.k = linear(f"{p}/attn/key", width, width)
            self.v = linear(f"{p}/attn/value", width, width)
            self.o = linear(f"{p}/attn/out", width, width)
            self.fc = linear(f"{p}/fc", width, 4 * width)
            self.proj = linear(f"{p}/proj", 4 * width, width)

        def forward(self, h, mask):
            b, t, _ = h.shape
            x = self.ln1(h)
            q = self.q(x).view(b, t, heads, head_dim) / math.sqrt(head_dim)
            k = self.k(x).view(b, t, heads, head_dim)
            v = self.v(x).view(b, t, heads, head_dim)
            logits = torch.einsum("bqhd,bkhd->bhqk", q, k)
            logits = torch.where(mask, logits, torch.finfo(logits.dtype).min)
            a = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(logits, -1), v)
            h = h + self.o(a.reshape(b, t, width))
            m = torch.nn.functional.gelu(self.fc(self.ln2(h)), approximate="tanh")
            return h + self.proj(m)

    class TorchGPT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = torch.nn.Embedding(cfg["vocab"], width)
            self.wpe = torch.nn.Embedding(cfg["seq"], width)
            with torch.no_grad():
                self.wte.weight.copy_(_t(torch, w["params/wte/embedding"]))
                self.wpe.weight.copy_(_t(torch, w["params/wpe/embedding"]))
            self.blocks = torch.nn.ModuleList(
                Block(f"params/block_{i}") for i in range(cfg["blocks"]))
            self.ln_f = norm("params/ln_f")
            self.head = linear("params/head", width, cfg["classes"])

        def forward(self, tokens):
            t = tokens.shape[1]
            h = self.wte(tokens) + self.wpe(torch.arange(t))
            mask = torch.tril(torch.ones(t, t, dtype=torch.bool))
            for block in self.blocks:
                h = block(h, mask)
            return self.head(self.ln_f(h)[:, -1])

    return TorchGPT()


def _torch_resnet(torch, cfg: dict, w: dict):
    """The ResNet-18 in torch (NCHW inside, NHWC in), holding the flax weights and running
    statistics; BatchNorm in eval mode."""

    def conv(prefix, stride, padding):
        k = w[f"params/{prefix}/kernel"]  # (kh, kw, cin, cout)
        c = torch.nn.Conv2d(k.shape[2], k.shape[3], k.shape[:2], stride, padding, bias=False)
        with torch.no_grad():
            c.weight.copy_(_t(torch, k.transpose(3, 2, 0, 1)))
        return c

    def bn(prefix):
        scale = w[f"params/{prefix}/scale"]
        b = torch.nn.BatchNorm2d(scale.shape[0], eps=1e-5)
        with torch.no_grad():
            b.weight.copy_(_t(torch, scale))
            b.bias.copy_(_t(torch, w[f"params/{prefix}/bias"]))
            b.running_mean.copy_(_t(torch, w[f"batch_stats/{prefix}/mean"]))
            b.running_var.copy_(_t(torch, w[f"batch_stats/{prefix}/var"]))
        return b

    class Basic(torch.nn.Module):
        def __init__(self, p, stride):
            super().__init__()
            self.conv1, self.bn1 = conv(f"{p}/conv1", stride, 1), bn(f"{p}/bn1")
            self.conv2, self.bn2 = conv(f"{p}/conv2", 1, 1), bn(f"{p}/bn2")
            self.down = None
            if f"params/{p}/down_conv/kernel" in w:
                self.down = torch.nn.Sequential(conv(f"{p}/down_conv", stride, 0),
                                                bn(f"{p}/down_bn"))

        def forward(self, x):
            h = torch.relu(self.bn1(self.conv1(x)))
            h = self.bn2(self.conv2(h))
            return torch.relu(h + (x if self.down is None else self.down(x)))

    class TorchResNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.stem_bn = conv("stem", 1, 1), bn("stem_bn")
            blocks = []
            for s in range(len(cfg["widths"])):
                for b in range(cfg["blocks_per_stage"]):
                    blocks.append(Basic(f"stage{s}_{b}", 2 if (b == 0 and s > 0) else 1))
            self.blocks = torch.nn.Sequential(*blocks)
            kernel = w["params/head/kernel"]
            self.head = torch.nn.Linear(*kernel.shape)
            with torch.no_grad():
                self.head.weight.copy_(_t(torch, kernel.T))
                self.head.bias.copy_(_t(torch, w["params/head/bias"]))

        def forward(self, x):  # (N, H, W, C)
            h = torch.relu(self.stem_bn(self.stem(x.permute(0, 3, 1, 2))))
            return self.head(self.blocks(h).mean(dim=(2, 3)))

    return TorchResNet()


# ----------------------------------------------------------------------------- workloads


_DIRECT_MAX_N = 16  # above this, one unblocked call may not fit the memory target


def _exact_kernels(workload, model, variables, x_all, ns, outputs, memory_gb, params,
                   extra=None, schedule="auto") -> np.ndarray:
    """Emits one ntkjax line per N (timing, float64 check of the first 4 examples, ``extra(n,
    timing)``) and returns the kernel of the largest N. For N up to ``_DIRECT_MAX_N`` a
    second line times one jitted ``empirical_ntk_fn`` built once (no blocks, no per-call
    rebuild), which separates the kernel's own time from ``empirical_ntk_matrix``'s overhead."""
    kernel = np.zeros(0)
    for n in ns:
        x = x_all[:n]
        log(f"{workload} ntkjax N={n}")
        timing = _ntkjax_kernel(model, variables, x, outputs, memory_gb, schedule=schedule,
                                one_call=n > _DIRECT_MAX_N)
        kernel = np.asarray(timing["result"])
        err = _float64_check(model, variables, x, kernel, outputs, min(n, 4))
        _emit_ntkjax(workload,
                     {"n": n, "method": "structured, empirical_ntk_matrix",
                      "memory_budget_gb": memory_gb, "outputs": outputs, "dtype": "float32",
                      "schedule": schedule, **params},
                     timing, {"max_rel_err_first4_vs_float64": err},
                     cpu_s=timing["cpu_s"],
                     **({"two_pass": timing["two_pass"]} if "two_pass" in timing else {}),
                     **({"timing_note": "one call, compilation included"}
                        if n > _DIRECT_MAX_N else {}),
                     **(extra(n, timing) if extra else {}))
        if n <= _DIRECT_MAX_N:  # the jitted kernel alone: one block, built once
            ntk = ntkjax.empirical_ntk_fn(model.apply, ntk_method="structured",
                                          outputs=outputs, batch="per_sample")
            direct = time_call(lambda ntk=ntk, x=x: ntk(variables, x), repeats=1)
            direct["peak_memory_mb"] = round(peak_memory_mb(), 1)
            _emit_ntkjax(workload,
                         {"n": n, "method": "structured, one jitted empirical_ntk_fn call",
                          "outputs": outputs, "dtype": "float32", **params},
                         direct, {"max_rel_err_vs_empirical_ntk_matrix":
                                  _rel(direct["result"], kernel)},
                         **(extra(n, direct) if extra else {}))
    return kernel


def entk_gpt_small(quick: bool = False, ns: list[int] | None = None, memory_gb: float = 4.0,
                   torch_memory_gb: float = 8.0, torch_time_cap_s: float = 300.0,
                   schedule: str = "auto", skip_torch: bool = False,
                   save_kernel: str | None = None) -> None:
    """Trace eNTK of the GPT model, N = 64 and 256 (quick: N = 4), against torch.func.

    ``save_kernel``: an ``.npz`` path; the largest N's kernel is saved there with its tokens
    (``entk_projected_error`` reads it).

    ``schedule`` is ``empirical_ntk_matrix``'s: ``"auto"`` takes the two-pass schedule for
    these sizes (pass 1's footprint for all examples exceeds the budget; the factors, about
    141 MB per example, go to the temporary directory beyond half the budget). Runs with
    N > 16 time one call, compilation included."""
    _warm_compilation_cache()
    cfg = _GPT_QUICK if quick else _GPT_REAL
    ns = ns or ([4] if quick else [64, 256])
    model, variables, tokens = _gpt(cfg, max(ns))
    n_params = _param_count(variables)
    rate = _matmul_gflops(512 if quick else 2048)
    grad_gflop = _example_gflops(model, variables, tokens[:1], jacobian=False)
    jacobian_gflop = _example_gflops(model, variables, tokens[:1], jacobian=True)
    log(f"GPT {n_params / 1e6:.1f}M params; gradient {grad_gflop:.1f} GFLOP/example; "
        f"Jacobian {jacobian_gflop:.1f} GFLOP/example; matmul {rate:.1f} GFLOP/s")

    def floor(n, timing):
        floor_s = n * grad_gflop / rate
        pair_gflop = _pair_gflops(cfg, n)
        exact_s = floor_s + pair_gflop / rate
        return {"grad_gflop_per_example": round(grad_gflop, 3), "matmul_gflops": round(rate, 1),
                "floor_s": round(floor_s, 3),
                "ratio_to_floor": round(timing["median_s"] / floor_s, 2),
                "jacobian_gflop_per_example": round(jacobian_gflop, 3),
                "jacobian_floor_s": round(n * jacobian_gflop / rate, 3),
                "ratio_to_jacobian_floor": round(
                    timing["median_s"] / (n * jacobian_gflop / rate), 2),
                "pair_gflop": round(pair_gflop, 1),
                "gradient_plus_pair_floor_s": round(exact_s, 3),
                "ratio_to_gradient_plus_pair_floor": round(timing["median_s"] / exact_s, 2)}

    kernel = _exact_kernels("entk_gpt_small", model, variables, tokens, ns, "trace", memory_gb,
                            {"model": cfg, "n_params": n_params, "quick": quick}, floor,
                            schedule=schedule)
    if save_kernel:
        np.savez(save_kernel, kernel=kernel, tokens=np.asarray(tokens[:max(ns)]),
                 quick=quick)
    if skip_torch:
        return
    _torch_side("entk_gpt_small", "gpt", cfg, variables, tokens, ns, ["jacobian", "ntk_vp"],
                "trace", kernel, memory_gb=torch_memory_gb, time_cap_s=torch_time_cap_s,
                quick=quick)


def entk_resnet18(quick: bool = False, ns: list[int] | None = None, memory_gb: float = 4.0,
                  torch_memory_gb: float = 8.0, torch_time_cap_s: float = 300.0) -> None:
    """Full 10x10 eNTK of the ResNet-18, N = 64 (quick: N = 4), against torch.func."""
    _warm_compilation_cache()
    cfg = _RESNET_QUICK if quick else _RESNET_REAL
    ns = ns or ([4] if quick else [64])
    model, variables, x_all = _resnet(cfg, max(ns))
    n_params = _param_count(variables)
    kernel = _exact_kernels("entk_resnet18", model, variables, x_all, ns, "full", memory_gb,
                            {"model": cfg, "n_params": n_params, "quick": quick})
    _torch_side("entk_resnet18", "resnet", cfg, variables, x_all, ns, ["jacobian", "ntk_vp"],
                "full", kernel, memory_gb=torch_memory_gb, time_cap_s=torch_time_cap_s,
                quick=quick)


def entk_projected(quick: bool = False, ns: list[int] | None = None, subset: int | None = None,
                   dim_total: int = 4096, rank: int = 16, memory_gb: float = 4.0,
                   store: str | None = None, skip_exact: bool = False) -> None:
    """Projected eNTK features of the GPT model streamed to a store; error on a subset.

    Full size: N = 10,000, subset 256; quick: N = 32, subset 8. ``store``: the zarr store's
    path (kept, and resumed if it exists; default a temporary directory). ``skip_exact``:
    time the features only; ``entk_projected_error`` then compares the store's first rows
    with an exact kernel saved by ``entk_gpt_small --save-kernel``.
    """
    _warm_compilation_cache()
    cfg = _GPT_QUICK if quick else _GPT_REAL
    n = (ns or [32 if quick else 10_000])[0]
    subset = subset or (8 if quick else 256)
    if quick:
        dim_total = min(dim_total, 1024)
    model, variables, tokens = _gpt(cfg, n)
    dim, leaves = dim_total, len(jax.tree.leaves(variables["params"]))
    key = jax.random.key(7)
    rate = _matmul_gflops(512 if quick else 2048)
    example_gflop = _projected_example_gflops(model, variables, tokens[:1], dim, rank)
    log(f"  {example_gflop:.1f} GFLOP per example; matmul {rate:.1f} GFLOP/s")
    with tempfile.TemporaryDirectory(prefix="entk_projected_") as tmp:
        path = store or os.path.join(tmp, "features.zarr")
        resumed = os.path.exists(path)
        log(f"entk_projected N={n} D={dim} (rank {rank}, {leaves} leaves) to {path}"
            + (" (resuming)" if resumed else ""))
        cpu = _cpu_seconds()
        t0 = time.perf_counter()
        feats = ntkjax.projected_ntk_features(
            model.apply, variables, tokens, dim=dim, key=key, rank=rank, out=path,
            memory_bytes=int(memory_gb * 2**30), show_progress=True)
        total = time.perf_counter() - t0
        cpu_s = round(_cpu_seconds() - cpu, 1)
        phi = np.asarray(feats[:subset], np.float64).reshape(subset, -1)
    if store:  # the subset's features and tokens, for entk_projected_error
        np.savez(store + ".subset.npz", phi=phi, tokens=np.asarray(tokens[:subset]))
    timing = {"median_s": total, "compile_s": 0.0, "repeats": 1,
              "peak_memory_mb": round(peak_memory_mb(), 1)}
    params = {"n": n, "dim": dim, "leaves": leaves, "projection": "one shared space",
              "rank": rank, "streamed": "zarr store", "memory_budget_gb": memory_gb,
              "dtype": "float32", "model": cfg, "quick": quick, "resumed_store": resumed,
              "timing_note": "one call, compilation included"}
    floor_s = n * example_gflop / rate
    floor = {"gflop_per_example": round(example_gflop, 3), "matmul_gflops": round(rate, 1),
             "floor_s": round(floor_s, 3),  # a resumed run's time covers only its new rows
             "ratio_to_floor": None if resumed else round(total / floor_s, 2)}
    if skip_exact:
        _emit_ntkjax("entk_projected", params, timing, None, cpu_s=cpu_s, **floor,
                     accuracy_note="entk_projected_error compares with the exact kernel")
        return
    log(f"  exact eNTK of the first {subset}")
    exact_timing = _ntkjax_kernel(model, variables, tokens[:subset], "trace", memory_gb,
                                  one_call=not quick)  # minutes: once, compilation included
    _emit_ntkjax("entk_projected", params, timing,
                 _projection_error(phi, np.asarray(exact_timing["result"]), subset),
                 cpu_s=cpu_s, exact_subset_s=round(exact_timing["median_s"], 3), **floor)


def _projection_error(phi: np.ndarray, exact: np.ndarray, subset: int) -> dict:
    approx = phi @ phi.T
    return {"rel_fro_err_vs_exact_subset": _rel_fro(approx, exact),
            "max_rel_err_vs_exact_subset": _rel(approx, exact), "subset": subset}


def entk_projected_error(quick: bool = False, store: str | None = None,
                         exact_kernel: str | None = None) -> None:
    """The error of the projected features of ``entk_projected --store S`` (its first rows,
    saved beside the store as ``S.subset.npz``) against the exact trace eNTK saved by
    ``entk_gpt_small --save-kernel``; both must hold the same token sequences (checked)."""
    if not store or not exact_kernel:
        raise SystemExit("entk_projected_error needs --store and --exact-kernel")
    saved, projected = np.load(exact_kernel), np.load(store + ".subset.npz")
    exact = saved["kernel"]
    subset = min(exact.shape[0], projected["phi"].shape[0])
    exact, phi = exact[:subset, :subset], projected["phi"][:subset]
    if not np.array_equal(saved["tokens"][:subset], projected["tokens"][:subset]):
        raise SystemExit(f"{exact_kernel} and {store} hold different token sequences")
    emit("entk_projected_error", {"store": store, "exact_kernel": exact_kernel,
                                  "subset": subset, "quick": quick},
         {"median_s": 0.0, "compile_s": 0.0, "repeats": 0},
         accuracy=_projection_error(phi, exact, subset))


def entk_lora(quick: bool = False, ns: list[int] | None = None, memory_gb: float = 4.0,
              torch_memory_gb: float = 8.0, torch_time_cap_s: float = 300.0) -> None:
    """Trace eNTK over the last two blocks only against the full kernel (N = 32; quick 4)."""
    _warm_compilation_cache()
    cfg = _GPT_QUICK if quick else _GPT_REAL
    n = (ns or [4 if quick else 32])[0]
    model, variables, tokens = _gpt(cfg, n)
    last = {f"block_{cfg['blocks'] - 2}", f"block_{cfg['blocks'] - 1}"}

    def in_last_two(path, leaf):
        return path[0] in last

    n_sub = sum(leaf.size for k, v in variables["params"].items() if k in last
                for leaf in jax.tree.leaves(v))
    results = {}
    for name, filt in (("full", None), ("last_two_blocks", in_last_two)):
        log(f"entk_lora {name} N={n}")
        timing = _ntkjax_kernel(model, variables, tokens, "trace", memory_gb, params_filter=filt)
        results[name] = timing
        k = np.asarray(timing["result"])
        _emit_ntkjax("entk_lora",
                     {"n": n, "params": name, "method": "structured, empirical_ntk_matrix",
                      "memory_budget_gb": memory_gb, "outputs": "trace", "dtype": "float32",
                      "model": cfg, "quick": quick,
                      "n_params_differentiated": int(n_sub if filt else _param_count(variables))},
                     timing, {"max_rel_err_first4_vs_float64": _float64_check(
                         model, variables, tokens, k, "trace", min(n, 4), filt)},
                     **({"speedup_vs_full": round(results["full"]["median_s"]
                                                  / timing["median_s"], 2)} if filt else {}))
    _torch_side("entk_lora", "gpt", cfg, variables, tokens, [n], ["jacobian"], "trace",
                np.asarray(results["last_two_blocks"]["result"]), memory_gb=torch_memory_gb,
                time_cap_s=torch_time_cap_s, quick=quick,
                trainable=[f"blocks.{cfg['blocks'] - 2}.", f"blocks.{cfg['blocks'] - 1}."])


# A child process (its own peak RSS) computing the factored trace eNTK of a dense layer on T
# positions (``x (N, T, 4) -> tanh(Dense 16) -> Dense 2 -> mean over T``), in token blocks or
# (argv[1] == "one_block") with the pair products formed whole.
_TOKEN_CHILD = r"""
import json, resource, sys, time
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from ntkjax import structured
mode, t, n, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if mode == "one_block":
    structured._PAIR_BLOCK_BYTES = 2**62

class Seq(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(jnp.tanh(nn.Dense(16)(x))).mean(1)

model = Seq()
x = jax.random.normal(jax.random.key(0), (n, t, 4))
variables = model.init(jax.random.key(1), x)
kernel = jax.jit(lambda v, x: structured.structured_kernel(model.apply, v, x, form="factored"))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
k = np.asarray(kernel(variables, x))
wall = time.perf_counter() - start
np.save(path, k)
print(json.dumps({"wall_s": wall, "rss_before_mb": before,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def entk_token_blocks(quick: bool = False, ns: list[int] | None = None) -> None:
    """Peak RSS of the factored form in token blocks against the pair products formed whole
    (issue 25), N = 8 sequences of T = 1024 and 2048 positions (quick: T = 256), each in its
    own process; the kernels' relative difference."""
    n = 8
    for t in ns or ([256] if quick else [1024, 2048]):
        rows = {}
        with tempfile.TemporaryDirectory(prefix="entk_tokens_") as tmp:
            for mode in ("token_blocks", "one_block"):
                path = os.path.join(tmp, f"{mode}.npy")
                log(f"entk_token_blocks T={t} {mode}")
                done = subprocess.run([sys.executable, "-c", _TOKEN_CHILD, mode, str(t), str(n),
                                       path], capture_output=True, text=True, check=True)
                rows[mode] = {**json.loads(done.stdout.strip().splitlines()[-1]),
                              "kernel": np.load(path)}
        err = _rel(rows["token_blocks"]["kernel"], rows["one_block"]["kernel"])
        for mode, row in rows.items():
            emit("entk_token_blocks",
                 {"n": n, "positions": t, "mode": mode, "form": "factored", "outputs": "trace",
                  "dtype": "float32", "quick": quick},
                 {"median_s": row["wall_s"], "compile_s": 0.0, "repeats": 1},
                 accuracy={"max_rel_diff_token_blocks_vs_one_block": err},
                 peak_memory_mb=round(row["peak_rss_mb"], 1),
                 rss_before_kernel_mb=round(row["rss_before_mb"], 1),
                 timing_note="one call, compilation included", load_avg_1min=_load())


WORKLOADS = {
    "entk_gpt_small": entk_gpt_small,
    "entk_token_blocks": entk_token_blocks,
    "entk_resnet18": entk_resnet18,
    "entk_projected": entk_projected,
    "entk_projected_error": entk_projected_error,
    "entk_lora": entk_lora,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", nargs="?", choices=sorted(WORKLOADS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, nargs="+", dest="ns", help="numbers of examples")
    parser.add_argument("--subset", type=int, help="entk_projected: exact-kernel subset")
    parser.add_argument("--dim-total", type=int, help="entk_projected: D, features per output")
    parser.add_argument("--rank", type=int, help="entk_projected: the Kronecker blocks' rank")
    parser.add_argument("--memory-gb", type=float, help="ntkjax block memory budget")
    parser.add_argument("--torch-memory-gb", type=float, help="torch address-space limit")
    parser.add_argument("--torch-time-cap-s", type=float, help="torch: skip sizes beyond this")
    parser.add_argument("--schedule", choices=["auto", "blocks", "two_pass"],
                        help="entk_gpt_small: empirical_ntk_matrix's schedule")
    parser.add_argument("--skip-torch", action="store_true", default=None,
                        help="entk_gpt_small: ntkjax only")
    parser.add_argument("--store", help="entk_projected(_error): the features' zarr store")
    parser.add_argument("--skip-exact", action="store_true", default=None,
                        help="entk_projected: features only (see entk_projected_error)")
    parser.add_argument("--exact-kernel", help="entk_projected_error: an .npz from "
                        "entk_gpt_small --save-kernel")
    parser.add_argument("--save-kernel", help="entk_gpt_small: save the largest N's kernel")
    parser.add_argument("--torch-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torch_child:
        _torch_child(args.torch_child)
        return 0
    if args.workload is None:
        parser.error("name a workload")
    accepted = inspect.signature(WORKLOADS[args.workload]).parameters
    kwargs = {k: v for k, v in vars(args).items() if v is not None and k in accepted}
    kwargs.pop("quick", None)
    WORKLOADS[args.workload](quick=args.quick, **kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
