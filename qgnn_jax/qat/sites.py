"""The sites a rule set makes in a model: `describe` prints them, `trace_sites` lists them
(`qgnn_jax.export` writes one entry per site), `trained_sites` reads them back from
trained variables (README, "Quantize your own model").

    qat.describe(qmodel, sample)     # or qat.describe(model, sample, rules=rules)

    path            op                    weight        activation
    conv1           conv_general_dilated  pq 4-bit      pq 4-bit
    ...
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from qgnn_jax import quant
from qgnn_jax.qat import context
from qgnn_jax.qat import model as qat_model
from qgnn_jax.qat import nnx_bridge
from qgnn_jax.qat import site as site_lib
from qgnn_jax.qat.rules import QuantRule


@dataclasses.dataclass(frozen=True)
class SiteInfo:
  """One intercepted op that a rule quantizes, as found by tracing the model."""
  key: str            # "<module path>/quant<n>"
  module: str         # "<module path>"
  op: str
  param: str          # the kernel's name in its module
  rule: QuantRule
  w_shape: Tuple[int, ...]
  w_axes: Tuple[int, ...]
  x_channels: int

  def row(self) -> Tuple[str, str, str, str]:
    """(path, op, weight quantizer, activation quantizer) as `describe` prints them."""
    r = self.rule
    name = lambda q: q if isinstance(q, str) else getattr(q, "name", str(q))
    w = f"{name(r.w_quantizer)} {r.w_bits}-bit" if r.w_quantizer is not None else "fp"
    a = f"{name(r.a_quantizer)} {r.a_bits}-bit" if r.a_quantizer is not None else "fp"
    return self.key, self.op, w, a


def site_name(index: int) -> str:
  """The scope name of a module's index-th site (as `qat.site.quantize_operands`)."""
  return site_lib.SITE_PREFIX if index == 0 else f"{site_lib.SITE_PREFIX}{index}"


class _Recorder(qat_model._Provider):  # pylint: disable=protected-access
  """Records every site an apply traces (no quantization)."""

  def __init__(self, rules):
    super().__init__(rules)
    self.sites: List[SiteInfo] = []

  def _site(self, module, rule, op_name, op, x, x_axes, w, w_axes, layout):
    del layout
    idx = qat_model._next_site_index(module)  # pylint: disable=protected-access
    path = context.module_path(module)
    name = context.find_param(module, w)
    self.sites.append(SiteInfo(
        f"{path}/{site_name(idx)}", path, op_name, str(name), rule, tuple(w.shape),
        tuple(a % w.ndim for a in w_axes), int(math.prod(x.shape[a] for a in x_axes))))
    return op(x, w)


def as_linen(model: Any) -> nn.Module:
  """The plain linen module of a linen module, an nnx.Module or a QuantizedModel."""
  if isinstance(model, qat_model.QuantizedModel):
    return model.linen
  if isinstance(model, nnx.Module):
    return nnx_bridge.as_linen(model)
  return model


def takes_train(model: nn.Module) -> bool:
  """Whether the model's `__call__` takes `train=` (NNX models run as linen always do)."""
  params = inspect.signature(type(model).__call__).parameters
  return "train" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD
                                  for p in params.values())


def trace_sites(model: Any, rules: Sequence[QuantRule], input_shape: Sequence[int],
                variables: Any = None, dtype=jnp.float32) -> List[SiteInfo]:
  """The sites of `model` under `rules`, in call order (abstract trace: nothing runs).

  input_shape: one example's shape (H, W, C); the trace runs a (1, *input_shape) batch.
  """
  model = as_linen(model)
  recorder = _Recorder(tuple(rules))
  wrapped = qat_model.intercepted(model, recorder)
  x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), dtype)
  if variables is None:
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape,
                                                                                   dtype)))
  variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
  kw = {"train": False} if takes_train(model) else {}
  jax.eval_shape(lambda v, x: wrapped.apply(v, x, **kw), variables, x)
  qat_model.check_rules_used(rules, recorder.seen)
  return recorder.sites


def trained_sites(variables: Mapping[str, Any]) -> Dict[str, Optional[int]]:
  """{site key: weight bits recorded at training (None: activation only)} of trained
  variables: every '<module path>/quant<n>' holding quantizer state."""
  out: Dict[str, Optional[int]] = {}
  for col in ("params", "quant_stats"):
    tree = variables.get(col) or {}
    for path, value in traverse_util.flatten_dict(_plain(tree)).items():
      names = [str(p) for p in path]
      for i in range(len(names) - 1):
        if site_lib.is_site_name(names[i]):
          key = "/".join(names[:i + 1])
          out.setdefault(key, None)
          if col == "quant_stats" and names[i + 1:] == ["site"]:
            bits = int(jax.device_get(value))
            # 0: not recorded (hand-made)
            out[key] = bits if quant.MIN_BITS <= bits <= quant.MAX_BITS else None
          break
  return out


def _plain(tree):
  if isinstance(tree, Mapping):
    return {k: _plain(v) for k, v in tree.items()}
  return tree


def check_trained(sites: Sequence[SiteInfo], variables: Mapping[str, Any],
                  where: str = "export") -> None:
  """Raises ValueError when `sites` (a model under some rules) are not the sites the
  variables were trained with: a site missing on either side, or other weight bits."""
  trained = trained_sites(variables)
  want = {s.key: s.rule.w_bits if s.rule.w_quantizer is not None else None for s in sites}
  missing = sorted(set(want) - set(trained))
  extra = sorted(set(trained) - set(want))
  bits = sorted((k, trained[k], want[k]) for k in set(want) & set(trained)
                if trained[k] is not None and want[k] is not None and trained[k] != want[k])
  problems = []
  if missing:
    problems.append(f"the rules quantize {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
                    f"which the variables hold no trained quantizer state for")
  if extra:
    problems.append(f"the variables hold trained sites {extra[:4]}"
                    f"{' ...' if len(extra) > 4 else ''} that the rules do not quantize")
  if bits:
    k, t, w = bits[0]
    problems.append(f"site {k} was trained with {t}-bit weights, the rules give {w}-bit"
                    f"{f' ({len(bits)} sites differ)' if len(bits) > 1 else ''}")
  if problems:
    raise ValueError(f"{where}: rules/variables mismatch: " + "; ".join(problems) +
                     " (pass the rules the model was trained with)")


def describe(model: Any, sample: Any, rules: Optional[Sequence[QuantRule]] = None,
             print_fn=print) -> List[SiteInfo]:
  """Prints (with print_fn) and returns the sites `rules` make in `model`: path, op,
  weight and activation quantizer with bits.

  model: a QuantizedModel (its rules), or a linen / NNX model with `rules`.
  sample: an input batch (array or ShapeDtypeStruct, (B, ...)); only its shape and dtype
  are used. Raises ValueError for a rule that matches no op (naming the op paths).
  """
  if isinstance(model, qat_model.QuantizedModel):
    rules = model.rules if rules is None else rules
  if rules is None:
    raise ValueError("describe: pass rules= (or a QuantizedModel)")
  sites = trace_sites(model, tuple(rules), tuple(sample.shape[1:]), dtype=sample.dtype)
  rows = [("path", "op", "weight", "activation")] + [s.row() for s in sites]
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  for r in rows:
    print_fn("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
  return sites
