"""Quantize a whole Flax model by ordered path rules (qwix-style).

A :class:`Rule` maps module paths (a regex, searched in the ``/``-joined path such as
``"blocks_3/mlp/fc1"``) to a recipe. For each quantizable layer (Dense, DenseGeneral,
Einsum, Conv in linen; Linear, LinearGeneral, Einsum, Conv in nnx; fp4jax's
mixture-of-experts ``linen.GroupedDense`` / ``nnx.GroupedLinear``) the **first**
matching rule wins; ``recipe=None`` (or ``"bf16"``) keeps it in high precision, and a
layer no rule matches is left alone. A recipe's own ``keep_high_precision`` patterns
(e.g. NVFP4's BF16 output head) apply on top unless the rule sets
``honor_keep_high_precision=False``.

* linen: :func:`quantize_model` returns a wrapper with ``init``/``apply`` that runs the
  model under ``flax.linen.intercept_methods``; matched layers compute with the quantized
  product, their parameters untouched (same tree as the original model).
* nnx: :func:`quantize_model` returns a copy of the model whose matched layers are
  replaced by their :mod:`fp4jax.nnx` counterparts (same ``nnx.Param`` values).

``plan(...)`` / ``QuantizedLinenModel.dry_run(...)`` return a :class:`Plan`: which module
got which recipe and the bits per parameter of the resulting weights.

Examples (see ``RULE_SETS``)::

    # NVIDIA NVFP4: first and last blocks in BF16, everything else NVFP4.
    [Rule(r"^blocks_(0|11)/", None), Rule(r".*", "nvfp4")]
    # gpt-oss: only the MoE experts in MXFP4.
    [Rule(r"experts", "mxfp4")]
    # heterogeneous: attention in MXFP8, MLP up-projection MXFP6, the rest MXFP4.
    [Rule(r"attn", "mxfp8"), Rule(r"mlp/fc1", "mxfp6"), Rule(r".*", "mxfp4")]
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import re
import warnings
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np

from fp4jax import recipes as recipes_lib

# "grouped": fp4jax.linen.GroupedDense / fp4jax.nnx.GroupedLinear, a mixture-of-experts'
# expert GEMM. A
# Rule takes every kind by default, so a catch-all rule quantizes experts too (and raises,
# naming why, for a recipe qragged_dot cannot keep per expert, e.g. "fp8").
LAYER_KINDS = ("dense", "dense_general", "einsum", "conv", "grouped")


@dataclasses.dataclass(frozen=True)
class Rule:
  """``module_path`` regex on the ``/``-joined path -> ``recipe``.

  By default the pattern is searched anywhere in the path (``re.search``: ``"fc"`` matches
  ``block_0/fc1``); ``fullmatch=True`` matches the whole path, as qwix's ``module_path``
  does (``re.fullmatch``), so rule sets ported from qwix keep their meaning.

  Attributes:
    module_path: regular expression; with ``fullmatch=False`` anchor it (``^...$``) for
      exact paths.
    recipe: a recipe name, a :class:`~fp4jax.recipes.Recipe`, or None for high precision.
    layers: which layer kinds the rule applies to (subset of ``LAYER_KINDS``).
    honor_keep_high_precision: apply the recipe's ``keep_high_precision`` patterns.
    fullmatch: the pattern must match the whole path (qwix semantics).
  """

  module_path: str
  recipe: Any = None
  layers: tuple[str, ...] = LAYER_KINDS
  honor_keep_high_precision: bool = True
  fullmatch: bool = False

  def __post_init__(self):
    if not isinstance(self.module_path, str):
      raise TypeError(f"Rule.module_path must be a regular expression string, got "
                      f"{type(self.module_path).__name__} {self.module_path!r}")
    for name in ("fullmatch", "honor_keep_high_precision"):
      if not isinstance(getattr(self, name), bool):   # "no" would be truthy
        raise TypeError(f"Rule.{name} must be True or False, got {getattr(self, name)!r}")
    try:
      re.compile(self.module_path)
    except re.error as e:
      raise ValueError(f"Rule.module_path {self.module_path!r} is not a valid regular "
                       f"expression: {e}") from None
    if self.recipe is not None:
      object.__setattr__(self, "recipe", recipes_lib.get(self.recipe))
    layers = (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
    bad = [k for k in layers if k not in LAYER_KINDS]
    if bad:
      raise ValueError(f"Rule.layers has unknown kinds {bad}; valid: {LAYER_KINDS}")
    object.__setattr__(self, "layers", layers)

  def matches(self, path: str, kind: str) -> bool:
    match = re.fullmatch if self.fullmatch else re.search
    return kind in self.layers and match(self.module_path, path) is not None


def _as_rules(rules) -> tuple[Rule, ...]:
  if isinstance(rules, Rule):
    rules = [rules]
  if isinstance(rules, (str, recipes_lib.Recipe)):
    rules = [Rule(r".*", rules)]  # one recipe for every layer
  out = []
  for r in rules:
    if isinstance(r, Rule):
      out.append(r)
    elif isinstance(r, (tuple, list)) and len(r) == 2:
      out.append(Rule(r[0], r[1]))
    else:
      raise TypeError(f"a rule is a Rule or a (regex, recipe) pair, got {r!r}")
  if not out:
    raise ValueError("rules is empty: give at least one Rule(regex, recipe)")
  return tuple(out)


def resolve(rules: Sequence[Rule], path: str, kind: str):
  """``(recipe or None, index of the rule that matched or None)`` for one layer."""
  for i, rule in enumerate(rules):
    if rule.matches(path, kind):
      r = rule.recipe
      if r is not None and r.is_identity:
        r = None
      if r is not None and rule.honor_keep_high_precision and any(
          re.search(p, path) for p in r.keep_high_precision):
        r = None
      return r, i
  return None, None


@dataclasses.dataclass
class PlanEntry:
  path: str
  kind: str
  recipe: str
  rule: int | None
  weight_params: int
  weight_bits: float


@dataclasses.dataclass
class Plan:
  """What a rule set does to a model: one entry per quantizable layer, plus totals."""

  entries: list[PlanEntry]
  total_params: int
  total_bits: float
  unmatched_rules: list[str]

  @property
  def bits_per_param(self) -> float:
    return self.total_bits / max(self.total_params, 1)

  def __str__(self) -> str:
    w = max([len(e.path) for e in self.entries] + [6])
    lines = [f"{'module':<{w}}  {'layer':<13} {'recipe':<16} {'rule':>4} {'weights':>10} "
             f"{'bits/w':>6}"]
    for e in self.entries:
      lines.append(f"{e.path:<{w}}  {e.kind:<13} {e.recipe:<16} "
                   f"{'-' if e.rule is None else e.rule:>4} {e.weight_params:>10} "
                   f"{e.weight_bits:>6.2f}")
    lines.append(f"total parameters {self.total_params}, {self.bits_per_param:.3f} bits per "
                 f"parameter (quantized weights at their format's bits incl. scales, every "
                 f"other parameter at 16)")
    for r in self.unmatched_rules:
      lines.append(f"warning: rule {r} matched no layer")
    return "\n".join(lines)


def _weight_bits(recipe) -> float:
  if recipe is None or recipe.fwd_rhs is None:
    return 16.0
  bpe = recipe.fwd_rhs.bits_per_element
  return float(bpe) if bpe is not None else float(recipe.fwd_rhs.element.bits)


def _finish_plan(entries, n_total, rules, matched) -> Plan:
  quant = sum(e.weight_params for e in entries if e.recipe != "bf16")
  bits = sum(e.weight_params * e.weight_bits for e in entries if e.recipe != "bf16")
  total_bits = bits + 16.0 * (n_total - quant)
  unmatched = [f"#{i} {r.module_path!r}" for i, r in enumerate(rules) if i not in matched]
  return Plan(entries, n_total, total_bits, unmatched)


def _warn_unmatched(plan: Plan):
  for r in plan.unmatched_rules:
    warnings.warn(f"fp4jax.quantize_model: rule {r} matched no quantizable layer; check the "
                  "regex against the module paths (QuantizedLinenModel.dry_run / fp4jax.rules.plan list them)",
                  stacklevel=3)


# ----------------------------------------------------------------------------- linen


def _kind(module, classes) -> str | None:
  """The layer kind of ``module`` from ``(class, kind)`` pairs, most specific first."""
  for cls, kind in classes:
    if isinstance(module, cls):
      return kind
  return None


def _linen_kind(module) -> str | None:
  import flax.linen as nn

  from fp4jax import linen as qlinen
  return _kind(module, ((nn.DenseGeneral, "dense_general"), (nn.Dense, "dense"),
                        (nn.Einsum, "einsum"), (nn.Conv, "conv"),
                        (qlinen.GroupedDense, "grouped")))


def _explicitly_quantized(module) -> bool:
  """An fp4jax layer given its own recipe: rules leave it alone. (A GroupedDense with
  ``recipe=None`` is a high-precision layer that rules may quantize.)"""
  return hasattr(module, "recipe") and not (getattr(module, "recipe") is None
                                            and _linen_kind(module) == "grouped")


# Set while QuantizedLinenModel.dry_run traces: the interceptor appends a PlanEntry per layer.
_PLAN_RECORD: contextvars.ContextVar = contextvars.ContextVar("fp4jax_plan_record", default=None)


def _linen_interceptor(rules: tuple[Rule, ...]):
  """A ``flax.linen.intercept_methods`` interceptor quantizing the layers ``rules`` pick."""
  from fp4jax import linen as qlinen

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    kind = _linen_kind(module)
    if context.method_name != "__call__" or kind is None or _explicitly_quantized(module):
      return next_fun(*args, **kwargs)  # not a layer, or an explicit fp4jax layer
    path = "/".join(str(p) for p in module.path)
    recipe, rule = resolve(rules, path, kind)
    if recipe is None:
      out = next_fun(*args, **kwargs)
    elif kind == "einsum":
      out = qlinen.einsum_call(module, next_fun, recipe, *args, **kwargs)
    elif kind == "grouped":
      object.__setattr__(module, "recipe", recipe)
      try:
        out = next_fun(*args, **kwargs)
      finally:
        object.__setattr__(module, "recipe", None)
    else:
      attr, cls = (("conv_general_dilated_cls", qlinen.QuantConvGeneralDilated)
                   if kind == "conv" else ("dot_general_cls", qlinen.QuantDotGeneral))
      saved = getattr(module, attr)
      object.__setattr__(module, attr, functools.partial(cls, recipe=recipe))
      try:
        out = next_fun(*args, **kwargs)
      finally:
        object.__setattr__(module, attr, saved)
    record = _PLAN_RECORD.get()
    if record is not None:
      kernel = module.get_variable("params", "kernel")
      n = int(np.prod(kernel.shape)) if kernel is not None else 0
      record.append(PlanEntry(path, kind, "bf16" if recipe is None else recipe.name, rule,
                              n, _weight_bits(recipe)))
    return out

  return intercept


class QuantizedLinenModel(nn.Module):
  """A linen model whose layers chosen by ``rules`` run quantized: a ``flax.linen.Module``
  that shares its model's scope (``nn.share_scope``), so ``init``/``apply`` take the
  same arguments and give the same variable trees as the model's, and it nests inside
  other modules like the model itself (its variables sit where the model's would).

  Attributes:
    model: the ``flax.linen.Module`` to quantize.
    rules: ordered :class:`Rule` objects (first match wins).
  """

  model: Any
  rules: tuple = ()

  def __post_init__(self):
    object.__setattr__(self, "rules", _as_rules(self.rules))   # pairs, one recipe, Rules
    super().__post_init__()

  def setup(self):
    nn.share_scope(self, self.model)

  def __call__(self, *args, **kwargs):
    with nn.intercept_methods(_linen_interceptor(self.rules)):
      return self.model(*args, **kwargs)

  def _method(self, method):
    """``apply``/``init``'s ``method=`` of the wrapped model (a name or an unbound method
    of its class), run under the interception."""
    if method is None or method == "__call__" or getattr(method, "__name__", "") == "__call__":
      return None
    name = method if isinstance(method, str) else method.__name__
    return lambda module, *args, **kwargs: module.call_model_method(name, *args, **kwargs)

  def call_model_method(self, name: str, *args, **kwargs):
    """The wrapped model's method ``name``, quantized (what ``method=name`` runs)."""
    with nn.intercept_methods(_linen_interceptor(self.rules)):
      return getattr(self.model, name)(*args, **kwargs)

  def apply(self, variables, *args, method=None, **kwargs):
    return super().apply(variables, *args, method=self._method(method), **kwargs)

  def init(self, rngs, *args, method=None, **kwargs):
    self._check_rules_once(rngs, *args, method=method, **kwargs)
    return super().init(rngs, *args, method=self._method(method), **kwargs)

  def init_with_output(self, rngs, *args, method=None, **kwargs):
    self._check_rules_once(rngs, *args, method=method, **kwargs)
    return super().init_with_output(rngs, *args, method=self._method(method), **kwargs)

  def _check_rules_once(self, *args, **kwargs):
    if _PLAN_RECORD.get() is None and not getattr(self, "_fp4jax_rules_checked", False):
      object.__setattr__(self, "_fp4jax_rules_checked", True)   # once per model object
      _warn_unmatched(self.dry_run(*args, **kwargs))

  def dry_run(self, rngs, *args, **kwargs) -> Plan:
    """Traces ``init`` abstractly (no FLOPs) and returns the :class:`Plan`."""
    record: list[PlanEntry] = []

    method = self._method(kwargs.pop("method", None))

    def traced(r):
      token = _PLAN_RECORD.set(record)
      try:
        return nn.Module.init(self, r, *args, method=method, **kwargs)
      finally:
        _PLAN_RECORD.reset(token)

    variables = jax.eval_shape(traced, rngs)
    n_total = sum(int(np.prod(v.shape))
                  for v in jax.tree.leaves(variables.get("params", {})))
    # nn.scan (and other lifted transforms) may trace a layer more than once: one entry
    # per module path, with the parameters of the layer's first trace.
    first: dict[str, PlanEntry] = {}
    for e in record:
      first.setdefault(e.path, e)
    record = list(first.values())
    matched = {e.rule for e in record if e.rule is not None}
    return _finish_plan(record, n_total, self.rules, matched)



# ----------------------------------------------------------------------------- nnx


def _nnx_kind(module) -> str | None:
  from flax import nnx

  from fp4jax import nnx as qnnx
  return _kind(module, ((nnx.LinearGeneral, "dense_general"), (nnx.Linear, "dense"),
                        (nnx.Einsum, "einsum"), (nnx.Conv, "conv"),
                        (qnnx.GroupedLinear, "grouped")))


def _nnx_plan(model, rules) -> tuple[Plan, list]:
  from flax import nnx

  from fp4jax import nnx as qnnx
  entries, targets, matched = [], [], set()
  for path, module in qnnx.iter_modules(model):
    kind = _nnx_kind(module)
    if kind is None or isinstance(module, qnnx._Quantized) or (
        kind == "grouped" and module.recipe is not None):   # explicitly quantized layers
      continue
    p = "/".join(str(x) for x in path)
    recipe, rule = resolve(rules, p, kind)
    if rule is not None:
      matched.add(rule)
    n = int(np.prod(module.kernel[...].shape))
    entries.append(PlanEntry(p, kind, "bf16" if recipe is None else recipe.name, rule, n,
                             _weight_bits(recipe)))
    if recipe is not None:
      targets.append((path, module, recipe))
  n_total = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  return _finish_plan(entries, n_total, rules, matched), targets


def plan(model, rules, *args, **kwargs) -> Plan:
  """The :class:`Plan` of ``rules`` on an nnx model, or on a linen model given its init
  arguments (``plan(linen_model, rules, rng, x)``)."""
  from flax import nnx
  rules = _as_rules(rules)
  if isinstance(model, nnx.Module):
    return _nnx_plan(model, rules)[0]
  return QuantizedLinenModel(model, rules).dry_run(*args, **kwargs)


def quantize_model(model, rules, *, rngs=None, dry_run: bool = False):
  """Quantizes the layers of a Flax model chosen by ``rules``.

  Args:
    model: a ``flax.linen.Module`` or a ``flax.nnx.Module``.
    rules: ordered :class:`Rule` objects (or ``(regex, recipe)`` pairs, or one recipe
      for every layer). The first matching rule wins.
    rngs: nnx only: ``nnx.Rngs`` whose ``"quant"`` stream seeds the replaced layers'
      stochastic rounding (needed when a chosen recipe is stochastic).
    dry_run: nnx only: print the plan before replacing.

  Returns:
    linen: a :class:`QuantizedLinenModel`, a ``flax.linen.Module`` (same ``init``/``apply``
      and variable trees as ``model``; it nests inside other modules).
    nnx: a copy of ``model`` with matched layers replaced (parameters shared by value).
  """
  from flax import nnx

  from fp4jax import nnx as qnnx
  rules = _as_rules(rules)
  if not isinstance(model, nnx.Module):
    import flax.linen as nn
    if not isinstance(model, nn.Module):
      raise TypeError(f"quantize_model expects a flax.linen or flax.nnx Module, got "
                      f"{type(model).__name__}")
    return QuantizedLinenModel(model, rules)
  model = nnx.clone(model)
  p, targets = _nnx_plan(model, rules)
  if dry_run:
    print(p)
  _warn_unmatched(p)
  for path, module, recipe in targets:
    if recipe.needs_key and rngs is None:
      raise ValueError(f"recipe {recipe.name!r} for {'/'.join(map(str, path))} rounds "
                       "stochastically: pass rngs=nnx.Rngs(quant=seed) to quantize_model")
    new = qnnx.quantized_copy(module, recipe, rngs)
    parent = model
    for k in path[:-1]:
      parent = parent[k] if isinstance(k, int) else getattr(parent, k)
    if isinstance(path[-1], int):
      parent[path[-1]] = new
    else:
      setattr(parent, path[-1], new)
  return model


def keep_blocks_in_bf16(recipe, n_blocks: int, first: int = 1, last: int = 1,
                        block_pattern: str = "blocks_{}") -> list[Rule]:
  """NVIDIA's NVFP4 recipe shape: the first ``first`` and last ``last`` transformer blocks
  in BF16, every other layer in ``recipe`` (block paths ``block_pattern.format(i)``)."""
  keep = sorted(set(range(first)) | set(range(max(n_blocks - last, 0), n_blocks)))
  alt = "|".join(re.escape(block_pattern.format(i)) for i in keep)
  return ([Rule(rf"(^|/)({alt})(/|$)", None)] if keep else []) + [Rule(r".*", recipe)]


RULE_SETS = {
    "moe_experts_mxfp4": [Rule(r"(^|/)experts?(_\d+)?(/|$)", "mxfp4")],
    "heterogeneous_mx": [Rule(r"(attn|attention)", "mxfp8"), Rule(r"(mlp|ffn)/.*(fc1|up|wi)",
                                                                    "mxfp6"),
                         Rule(r".*", "mxfp4")],
}

__all__ = ["LAYER_KINDS", "Plan", "PlanEntry", "QuantizedLinenModel", "RULE_SETS", "Rule",
           "keep_blocks_in_bf16", "plan", "quantize_model", "resolve"]
