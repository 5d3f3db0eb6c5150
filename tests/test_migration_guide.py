"""The neural-tangents migration guide (docs/guides/coming_from_neural_tangents.md) against nt's
public names (tests/data/nt_public_api.json, read from nt's source at commit c17e770): every
public function and stax layer of nt has a row whose ntkjax side cites names that exist, or
says "not available: <reason>", "not needed: <reason>" or "planned (issue N, ...)". And the
guide's recipe moves parameters in nt's layout (built here by hand as numpy arrays, nt itself
is not installed) into the ntkjax module with the same outputs as nt's formulas."""

from __future__ import annotations

import json
import pkgutil
import re
from pathlib import Path

import jax
import numpy as np
from scipy import special

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guides" / "coming_from_neural_tangents.md"
NT_API = json.loads((ROOT / "tests" / "data" / "nt_public_api.json").read_text())["modules"]
CITED = re.compile(r"\bntkjax(?:\.\w+)+")
STATUS = re.compile(r"not available: \w|not needed: \w|planned \(issue \d+")


def _exists(dotted: str) -> bool:
    try:
        pkgutil.resolve_name(dotted)
    except (ImportError, AttributeError, ValueError):
        return False
    return True


def _rows(text: str) -> list[tuple[str, str, str]]:
    """(section, first cell, second cell) of every table row; the section is the last ``## ``
    heading above it."""
    rows, section = [], ""
    for line in text.splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        cells = [c.strip() for c in line.split("|")]
        if line.startswith("|") and len(cells) > 3 and not set(cells[1]) <= {"-"}:
            rows.append((section, cells[1], cells[2]))
    return rows


def guide_problems(text: str) -> list[str]:
    """Every nt public name without a row, and every row for one whose ntkjax side neither cites
    existing ntkjax names nor states why there is none."""
    rows = _rows(text)
    problems = []
    for module, names in NT_API.items():
        for name in names:
            if module == "nt.stax":
                pattern = re.compile(rf"`{name}\b")
                candidates = [r for r in rows if r[0] == "`stax` layers" and pattern.search(r[1])]
            else:
                pattern = re.compile(rf"`{re.escape(module)}\.{name}\b")
                candidates = [r for r in rows if pattern.search(r[1])]
            if not candidates:
                problems.append(f"{module}.{name} has no row")
            for _, _, ours in candidates:
                cited = CITED.findall(ours)
                missing = [c for c in cited if not _exists(c)]
                if missing:
                    problems.append(f"{module}.{name}: cites {', '.join(missing)}, which do not "
                                    "exist")
                elif not cited and not STATUS.search(ours):
                    problems.append(f"{module}.{name}: its row neither cites an ntkjax name nor "
                                    f"says why: {ours!r}")
    return problems


def test_guide_check_sees_missing_and_stale_rows():
    assert sum(map(len, NT_API.values())) == 76 and "GlobalSelfAttention" in NT_API["nt.stax"]
    stale = ("## `stax` layers\n| nt | ntkjax |\n|---|---|\n"
             "| `Dense(out)` | `ntkjax.nn.Dense` |\n| `Relu()` | `ntkjax.nn.no_such_layer` |\n"
             "| `Erf()` | not yet |\n| `ConvLocal` | planned (issue 24) |\n"
             "| `serial(...)` | not needed: a flax module |\n")
    problems = guide_problems(stale)
    assert "nt.stax.Relu: cites ntkjax.nn.no_such_layer, which do not exist" in problems
    assert any(p.startswith("nt.stax.Erf: its row neither") for p in problems)
    assert "nt.stax.Conv has no row" in problems and "nt.batch has no row" in problems
    assert not any(p.startswith(("nt.stax.Dense", "nt.stax.ConvLocal", "nt.stax.serial"))
                   for p in problems)


def test_every_nt_public_name_has_its_ntkjax_row():
    assert guide_problems(GUIDE.read_text(encoding="utf-8")) == []


def test_convention_rows_are_present():
    text = GUIDE.read_text(encoding="utf-8")
    for needle in ("**keep** probability", "equal in value to `x1`", "eps=1e-12",
                   "`ntkjax.nn.ConvTranspose` pads `\"SAME\"`", "unit-variance inputs",
                   "vmap_axes=None", "3.3x slower", "1.4x faster", "`n_chan_out`, `n_chan_key`",
                   "`n_chan_pos_emb`, `W_pos_emb_std`"):
        assert needle in text, needle


# ------------------------------------------------------------------ the stax-parameter recipe


def _recipe() -> dict:
    block = next(b for b in re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
                 if "def from_stax(" in b)
    namespace: dict = {}
    exec(compile(block, str(GUIDE), "exec"), namespace)
    return namespace


def _nt_params(rng: np.random.Generator, c: int, length: int) -> list:
    """nt's init_fn output for the guide's serial network, in nt's layout (stax/linear.py):
    Dense (W (C, out), b (1, 1, out) or None); GlobalSelfAttention (None, key (H, C, d_k),
    value (H, C, d_v), W_out (d_v H, out), b (1, 1, out), pos_emb (1, L, C))."""
    g = rng.standard_normal
    return [(g((c, 16)), g((1, 1, 16))), (),
            (None, g((2, 16, 8)), g((2, 16, 8)), g((16, 16)), g((1, 1, 16)), g((1, length, 16))),
            (), (g((16, 1)), None)]


def _nt_apply(params: list, x: np.ndarray) -> np.ndarray:
    """nt's apply_fn formulas: Dense W_std/sqrt(C) x W + b_std b; GlobalSelfAttention with
    SUM embeddings (x + W_pos_emb_std pos_emb) in keys and queries only, tied keys, heads
    stacked channel-major (moveaxis(heads, 0, -1).reshape), OV_std / sqrt(d_v H C) on the
    output."""
    (w1, b1), _, (_, key, value, w_out, b_att, pos_emb), _, (w2, b2) = params
    h = np.maximum(1.5 / np.sqrt(x.shape[-1]) * x @ w1 + 0.1 * b1, 0)
    inputs = h + 1.0 * pos_emb
    c = inputs.shape[-1]
    keys = np.einsum("nlc,hcd->hnld", inputs, key)
    values = np.einsum("nlc,hcd->hnld", h, value)  # val_pos_emb=False: values without them
    logits = np.einsum("hnld,hnmd->hnlm", keys, keys) / (c * key.shape[-1])
    heads = np.einsum("hnlm,hnmd->hnld", special.softmax(logits, axis=-1), values)
    heads = np.moveaxis(heads, 0, -1).reshape(*heads.shape[1:3], -1)  # index d * H + h
    out = heads @ w_out / np.sqrt(value.shape[-1] * value.shape[0] * c) + 0.1 * b_att
    assert b2 is None  # Dense(1, W_std=1.0): no bias
    return 1.0 / np.sqrt(16) * out.mean(axis=1) @ w2


def test_recipe_moves_stax_parameters_into_the_module(x64):
    recipe = _recipe()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 4))
    nt_params = _nt_params(rng, 4, 5)
    net = recipe["Net"]()
    ours = recipe["from_stax"](nt_params)
    shapes = jax.tree_util.tree_map(np.shape, net.init(jax.random.key(0), x))
    assert jax.tree_util.tree_map(np.shape, ours) == shapes  # every parameter, same shapes
    np.testing.assert_allclose(net.apply(ours, x), _nt_apply(nt_params, x), rtol=1e-12,
                               atol=1e-12)
    # the head order matters: W_out rows left in nt's order give other outputs
    wrong = jax.tree_util.tree_map(np.asarray, ours)
    wrong["params"]["SelfAttention_0"]["out"]["kernel"] = nt_params[2][3]
    assert np.max(np.abs(net.apply(wrong, x) - _nt_apply(nt_params, x))) > 1e-3



def test_recipe_conv_parameters(x64):
    """nt's Conv (default dimension numbers NHC / HIO, VALID padding): W_std / sqrt(k C) times
    the correlation of x with W (k, C, out), plus b_std b; the guide's
    {"conv": from_stax_dense(W, b)} gives ntkjax.nn.Conv(padding="VALID") the same outputs."""
    from ntkjax import nn

    recipe = _recipe()
    rng = np.random.default_rng(1)
    x, w, b = rng.standard_normal((2, 6, 3)), rng.standard_normal((3, 3, 5)), \
        rng.standard_normal((1, 1, 5))
    windows = np.stack([x[:, i:i + 3] for i in range(4)], axis=1)  # (N, 4, k, C)
    want = 1.3 / np.sqrt(9) * np.einsum("nlkc,kco->nlo", windows, w) + 0.2 * b
    conv = nn.Conv(5, kernel_size=(3,), padding="VALID", w_std=1.3, b_std=0.2)
    got = conv.apply({"params": {"conv": recipe["from_stax_dense"](w, b)}}, x)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)
