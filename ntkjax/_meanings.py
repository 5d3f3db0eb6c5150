"""The layer protocol: one declaration per layer of every meaning it has.

A layer of :mod:`ntkjax.nn` has several meanings, chosen by the type of what it is applied to:

* an array -- the finite network (``module.apply``); every layer has it;
* a :class:`~ntkjax.Kernel` -- its infinite-width rule (``"kernel"``: :func:`ntkjax.kernel_fn`,
  :func:`ntkjax.kernel_matrix`);
* a :class:`FeatureStandIn` -- its random-feature rule (``"features"``:
  :func:`ntkjax.feature_map`);
* and, read off the declaration without applying the layer, its structured-NTK form
  (``"structured"``: the kind :mod:`ntkjax.structured` contracts it as) and static facts: whether
  its kernel needs every pair of positions, depends on the batch, or reads each input's
  variances.

Each layer states these in one :class:`Declaration` beside its finite code
(``_MEANINGS = declare(layer, kernel=..., features=..., ...)``); every registry of the package
(:data:`ntkjax.models.ACTIVATIONS`, :data:`ntkjax.features.FEATURE_RULES`, the JAX-name hints of
:class:`ntkjax.kernels.ForeignFunctionError`, :mod:`ntkjax.structured`'s recognizer, the
table of :func:`meaning_table`) is derived from the declarations. A meaning without a rule raises
:class:`UnsupportedMeaning` -- never a silent pass-through.

This module imports nothing of ntkjax: it is the lowest floor of the package.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "MEANINGS",
    "Declaration",
    "FeatureStandIn",
    "UnsupportedMeaning",
    "declaration_of",
    "declarations",
    "declare",
    "feature_rules",
    "jax_equivalents",
    "meaning_rows",
    "meaning_table",
    "register",
]

#: The meanings a declaration states (besides the finite network, which every layer has).
MEANINGS: tuple[str, ...] = ("kernel", "features", "structured")

_RULES = {"finite": "finite network", "kernel": "infinite-width kernel rule",
          "features": "random-feature rule", "structured": "structured-NTK form"}


class UnsupportedMeaning(ValueError):
    """The one error a layer raises for a meaning it has no rule for.

    Its message names the layer, the meaning (``"kernel"``, ``"features"``, ``"structured"``,
    ...) and what to use instead; the three are also attributes.

    Args:
      layer: the layer's public name, e.g. ``"ntkjax.nn.SelfAttention"``.
      meaning: the meaning asked for.
      instead: what to use instead (one sentence).

    >>> err = UnsupportedMeaning("ntkjax.nn.SelfAttention", "features", "use kernel_fn.")
    >>> isinstance(err, ValueError), err.meaning
    (True, 'features')
    >>> print(err)
    ntkjax.nn.SelfAttention has no random-feature rule (meaning 'features'); use kernel_fn.
    """

    def __init__(self, layer: str, meaning: str = "", instead: str = "") -> None:
        self.layer, self.meaning, self.instead = layer, meaning, instead
        if meaning:
            rule = _RULES.get(meaning, "rule")
            message = f"{layer} has no {rule} (meaning {meaning!r})"
            message += f"; {instead}" if instead else "."
        else:  # a ready message (e.g. when unpickled)
            message = layer
        super().__init__(message)

    def __reduce__(self) -> tuple:
        return (type(self), (self.layer, self.meaning, self.instead))


class FeatureStandIn:
    """The type :func:`ntkjax.feature_map` applies a module to (its own type: not a Kernel).

    A layer that receives one applies its feature rule through its declaration
    (:meth:`Declaration.on_features`), or raises :class:`UnsupportedMeaning`. The stand-in holds
    ``exact``, the exact :class:`~ntkjax.Kernel` of each input with itself (its variances),
    ``phi`` (N, *S, D_nngp) and ``psi`` (N, *S, D_ntk), the features of the NNGP and the NTK
    (``phi(x) . phi(x') ~ Sigma(x, x')`` per position), and the random-feature primitives that
    rules compose (:meth:`tensor_sketch`, :meth:`arc_cosine`, :meth:`hermite`,
    :meth:`local_projection`). ntkjax.features
    implements it; a layer's rule only reads these.

    >>> isinstance(object(), FeatureStandIn)
    False
    """

    exact: Any
    phi: Any
    psi: Any

    def after(self, layer: str, exact: Any, phi: Any, psi: Any) -> FeatureStandIn:
        """The stand-in after ``layer``: its exact kernel and new features."""
        raise NotImplementedError

    def tensor_sketch(self, a: Any, b: Any) -> Any:
        """Unbiased features of the product kernel ``(a . a') (b . b')`` (last axis)."""
        raise NotImplementedError

    def arc_cosine(self, a: float, b: float) -> tuple[Any, Any]:
        """``(phi, psi)`` after ``a min(u, 0) + b max(u, 0)`` (arc-cosine random features)."""
        raise NotImplementedError

    def hermite(self, fn: Callable[[Any], Any]) -> tuple[Any, Any]:
        """``(phi, psi)`` after an elementwise ``fn`` (truncated Hermite expansion)."""
        raise NotImplementedError

    def local_projection(self, a: Any) -> Any:
        """Unbiased features of ``delta_{pp'} a[p] . a'[p']`` (``a`` (N, *S, d)): an
        independent random projection per position, for layers whose weights are not shared
        between positions (the kernel keeps only same-position terms)."""
        raise NotImplementedError


def _what(x: Any) -> str:
    return type(x).__name__


@dataclasses.dataclass(frozen=True, eq=False)
class Declaration:
    """Every meaning of one layer, stated once beside its finite code.

    Attributes:
      layer: the layer (a class, a function, or an :class:`~ntkjax.nn.Activation`).
      name: its public name, e.g. ``"ntkjax.nn.Dense"``.
      kernel: its infinite-width rule (the function its call applies to a Kernel), or None.
      features: its random-feature rule ``features(x, exact, *args, **kwargs) -> (phi, psi)``
        with ``x`` the incoming :class:`FeatureStandIn` (or a list of them, for layers joining
        branches) and ``exact`` the layer's exact kernel of each input with itself; or None.
      structured: its structured-NTK kind (``"dense"``, ``"conv"``, ...; see
        :mod:`ntkjax.structured`), ``"parameter-free"`` for a layer without parameters, or None
        (its parameters fall back to Jacobian contractions).
      probe_scales: for the structured NTK, whether its weight scale is read off the layer.
      all_pairs: its kernel needs every pair of positions (pooling, attention).
      batch_dependent: its meaning depends on the whole batch (e.g. a batch statistic).
      per_input_variances: its kernel reads each input's variances (non-linear layers).
      scale_aware: its kernel rule maps a kernel's scaled form (``Kernel.scaled``: the kernels
        divided by per-input powers of two, for inputs whose kernels would overflow the dtype)
        alongside the true kernels. Every other rule reads only the true kernels, and the
        kernel it returns has no scaled form (``Kernel.replace`` drops it), so a rule that
        ignores the scale is impossible by construction.
      finite: whether it has a finite network (False for a kernel-only construction).
      instead: what to use instead, by unsupported meaning.
      replaces: names of JAX functions this layer stands in for, each with a note
        (``{"relu": ""}``; read by :func:`jax_equivalents`).

    >>> decl = Declaration(layer=len, name="demo.len", kernel=None, features=None)
    >>> decl.supports("kernel"), decl.supports("finite")
    (False, True)
    """

    layer: Any
    name: str
    kernel: Callable[..., Any] | None
    features: Callable[..., Any] | None
    structured: str | None = None
    probe_scales: bool = False
    all_pairs: bool = False
    batch_dependent: bool = False
    per_input_variances: bool = False
    scale_aware: bool = False
    finite: bool = True
    instead: Mapping[str, str] = dataclasses.field(default_factory=dict)
    replaces: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def supports(self, meaning: str) -> bool:
        """Whether the layer has ``meaning`` (``"finite"`` or one of :data:`MEANINGS`).

        Args:
          meaning: ``"finite"``, ``"kernel"``, ``"features"`` or ``"structured"``.

        Returns:
          True when the declaration states a rule for it.

        >>> Declaration(layer=len, name="demo.len", kernel=len, features=None).supports("kernel")
        True
        """
        if meaning == "finite":
            return self.finite
        if meaning == "kernel":
            return self.kernel is not None
        if meaning == "features":
            return self.features is not None
        if meaning == "structured":
            return self.structured is not None
        raise ValueError(f"meaning must be 'finite' or one of {MEANINGS}, got {meaning!r}.")

    def unsupported(self, meaning: str) -> UnsupportedMeaning:
        """The error for ``meaning`` (to raise), naming this layer and what to use instead.

        Args:
          meaning: the meaning the layer has no rule for.

        Returns:
          An :class:`UnsupportedMeaning`.

        >>> decl = Declaration(layer=len, name="demo.len", kernel=None, features=None,
        ...                    instead={"kernel": "use abs."})
        >>> print(decl.unsupported("kernel"))
        demo.len has no infinite-width kernel rule (meaning 'kernel'); use abs.
        """
        instead = self.instead.get(meaning, "")
        if not instead and meaning == "features":
            instead = ("use ntkjax.kernel_fn for its exact kernel, or the empirical NTK of a "
                       "finite network.")
        return UnsupportedMeaning(self.name, meaning, instead)

    def on_features(self, x: Any, kernel: Callable[[Any], Any], *args: Any,
                    **kwargs: Any) -> FeatureStandIn:
        """The layer applied to feature_map's stand-in ``x`` (or a list of stand-ins, for a
        layer joining branches): ``kernel`` (the layer's own call, on Kernels) maps the exact
        part, then the declared feature rule maps the features. Raises
        :class:`UnsupportedMeaning` without a rule.

        Args:
          x: a :class:`FeatureStandIn`, or a sequence of them.
          kernel: maps the exact kernel (or kernels) of ``x`` through the layer.
          *args: passed to the feature rule (e.g. the module, the activation's parameters).
          **kwargs: passed to the feature rule.

        Returns:
          The stand-in after the layer.

        >>> decl = Declaration(layer=len, name="demo.len", kernel=len, features=None)
        >>> try:
        ...     decl.on_features(FeatureStandIn(), len)
        ... except UnsupportedMeaning as err:
        ...     print(err.layer, err.meaning)
        demo.len features
        """
        if self.features is None:
            raise self.unsupported("features")
        many = not isinstance(x, FeatureStandIn)
        parts = list(x) if many else [x]
        if not parts or not all(isinstance(p, FeatureStandIn) for p in parts):
            raise UnsupportedMeaning(
                self.name, "features",
                f"every input must be feature_map's stand-in, got {[_what(p) for p in parts]} "
                "(a branch mixes arrays and the stand-in).")
        exact = kernel([p.exact for p in parts] if many else parts[0].exact)
        phi, psi = self.features(parts if many else parts[0], exact, *args, **kwargs)
        return parts[0].after(self.name, exact, phi, psi)


_REGISTRY: dict[str, Declaration] = {}
_EQUIVALENTS: dict[str, str] = {}  # read off each declaration's ``replaces`` on registration
_FEATURE_RULES: dict[str, Callable[..., Any]] = {}  # and its feature rule


def declare(layer: Any, *, name: str | None = None, **meanings: Any) -> Declaration:
    """Declares (and registers) every meaning of ``layer``; see :class:`Declaration`.

    Args:
      layer: the layer (class, function or activation).
      name: its public name (default: ``ntkjax.nn.<its __name__>`` for a layer of
        :mod:`ntkjax.nn`, else ``<its module>.<its qualified name>``).
      **meanings: the fields of :class:`Declaration` (``kernel`` and ``features`` default to
        None: unsupported).

    Returns:
      The registered :class:`Declaration`.

    >>> decl = declare(len, name="demo.length", kernel=None)
    >>> declaration_of(len) is decl
    True
    """
    if name is None:
        module = getattr(layer, "__module__", "") or ""
        name = (f"ntkjax.nn.{layer.__name__}" if module.startswith("ntkjax.nn") else
                f"{module}.{getattr(layer, '__qualname__', layer.__name__)}")
    meanings.setdefault("kernel", None)
    meanings.setdefault("features", None)
    return register(Declaration(layer=layer, name=name, **meanings))


def register(decl: Declaration) -> Declaration:
    """Registers a ready :class:`Declaration` (e.g. an activation's ``meanings``).

    Args:
      decl: the declaration.

    Returns:
      ``decl``.

    >>> decl = Declaration(layer=abs, name="demo.abs", kernel=None, features=None)
    >>> register(decl) is declaration_of(abs)
    True
    """
    old = _REGISTRY.get(decl.name)
    if old is not None and old.layer is not decl.layer:
        raise ValueError(f"a different layer is already declared as {decl.name!r}.")
    _REGISTRY[decl.name] = decl
    for api, note in decl.replaces.items():
        _EQUIVALENTS[api] = decl.name + (f" {note}" if note else "")
    _FEATURE_RULES.pop(decl.name, None)
    if decl.features is not None:
        _FEATURE_RULES[decl.name] = decl.features
    return decl


def declarations() -> tuple[Declaration, ...]:
    """Every registered declaration, by name.

    Returns:
      The declarations, sorted by their names.

    >>> import ntkjax
    >>> "ntkjax.nn.Dense" in [d.name for d in declarations()]
    True
    """
    return tuple(_REGISTRY[k] for k in sorted(_REGISTRY))


def declaration_of(layer: Any) -> Declaration | None:
    """The declaration of ``layer`` (by identity; a class's nearest declared base), or None.

    Args:
      layer: a layer class, function or activation (or a module instance).

    Returns:
      Its :class:`Declaration`, or None.

    >>> import ntkjax
    >>> declaration_of(ntkjax.nn.relu).features is not None
    True
    """
    by_layer = {id(d.layer): d for d in _REGISTRY.values()}
    found = by_layer.get(id(layer))
    if found is not None:
        return found
    meanings = getattr(layer, "meanings", None)
    if isinstance(meanings, Declaration):
        return meanings
    cls = layer if isinstance(layer, type) else type(layer)
    for base in cls.__mro__:
        if id(base) in by_layer:
            return by_layer[id(base)]
    return None


def feature_rules() -> dict[str, Callable[..., Any]]:
    """The random-feature rule of every declared layer that has one, by the layer's name
    (:data:`ntkjax.features.FEATURE_RULES`), derived from the declarations.

    Returns:
      The live table ``{layer name: feature rule}``, filled as layers are declared.

    >>> import ntkjax
    >>> "ntkjax.nn.avg_pool" in feature_rules()
    True
    """
    return _FEATURE_RULES


def jax_equivalents() -> dict[str, str]:
    """The ntkjax layer to use instead of each JAX function a declaration replaces (read by
    :class:`ntkjax.kernels.ForeignFunctionError`'s message), derived from the declarations.

    Returns:
      The live table ``{jax function name: "ntkjax.nn.<layer> (note)"}``, filled as layers
      are declared.

    >>> import ntkjax
    >>> jax_equivalents()["relu"]
    'ntkjax.nn.relu'
    """
    return _EQUIVALENTS


def _cell(decl: Declaration, meaning: str) -> str:
    if meaning == "structured":
        return decl.structured or "Jacobian fallback"
    return "supported" if decl.supports(meaning) else "UnsupportedMeaning"


def meaning_rows(names: Sequence[str] | None = None) -> list[tuple[str, ...]]:
    """The layer x meaning table: one row ``(layer, finite, kernel, features, structured,
    facts)`` per declaration -- "supported" or "UnsupportedMeaning", the structured-NTK kind,
    and the static facts.

    Args:
      names: the declarations to list (default: all, by name).

    Returns:
      The rows, as tuples of strings.

    >>> import ntkjax
    >>> meaning_rows(["ntkjax.nn.Dense"])[0][:4]
    ('ntkjax.nn.Dense', 'supported', 'supported', 'supported')
    """
    decls = declarations() if names is None else tuple(_REGISTRY[n] for n in names)
    rows = []
    for d in decls:
        facts = [fact for fact, on in (("all pairs", d.all_pairs),
                                       ("batch-dependent", d.batch_dependent),
                                       ("per-input variances", d.per_input_variances),
                                       ("scale-aware", d.scale_aware)) if on]
        rows.append((d.name, _cell(d, "finite"), _cell(d, "kernel"), _cell(d, "features"),
                     _cell(d, "structured"), ", ".join(facts) or "-"))
    return rows


def meaning_table() -> str:
    """The layer x meaning table of the package's declared layers (ntkjax's and the flax layers
    it knows), as markdown: the table in ``docs/development.md``, checked against this by the
    tests.

    Returns:
      A markdown table.

    >>> import ntkjax
    >>> meaning_table().splitlines()[0]
    '| layer | finite | kernel | features | structured NTK | static facts |'
    """
    lines = ["| layer | finite | kernel | features | structured NTK | static facts |",
             "|---|---|---|---|---|---|"]
    names = [d.name for d in declarations() if d.name.startswith(("ntkjax.", "flax."))]
    lines += ["| " + " | ".join(f"`{c}`" if i == 0 else c for i, c in enumerate(row)) + " |"
              for row in meaning_rows(names)]
    return "\n".join(lines)
