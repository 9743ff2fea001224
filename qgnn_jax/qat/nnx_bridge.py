"""An NNX model run as a linen module, so that quantization, training, calibration, export
and integer inference take it as they take linen models (docs/METHOD.md, "NNX models").

`NnxModule(graphdef, initial)` keeps each NNX variable in a linen scope at the NNX
module's path: `nnx.Param` in ``params``, `nnx.BatchStat` in ``batch_stats`` (any other
variable type in its registered collection name), so `init` returns

    {"params": {"conv1": {"kernel": ..., "bias": ...}, ...}, "batch_stats": {...}}

with the NNX model's current values (its own initialisation, or the weights it was
trained to: `init` does not re-draw them), and the sites of quantized ops live next to
them (``params/conv1/quant/...``, ``quant_stats/conv1/quant/...``) as in linen models.
Each call merges the variables into the NNX graph, runs it, and writes back the
collections the call may mutate (batch statistics in training).

`train=`: passed to the NNX model when its `__call__` takes it, else it sets
`deterministic` / `use_running_average` (what `nnx.Module.train()` / `.eval()` set).
Not supported: models that hold rng state (`nnx.Rngs` kept by e.g. `nnx.Dropout(rngs=)`):
the error says so.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Tuple

import flax.linen as nn
from flax import nnx

from qgnn_jax.qat import context


class _Held:
  """The NNX model's initial state, hashed by identity (a static field of the module)."""

  def __init__(self, state: Any, takes_train: bool, name: str):
    self.state, self.takes_train, self.name = state, takes_train, name

  def __hash__(self):
    return id(self)

  def __eq__(self, other):
    return self is other


def _collection(var: Any) -> str:
  return nnx.variable_name_from_type(type(var), allow_register=True)


def _key(path) -> Tuple[str, ...]:
  return tuple(str(p) for p in path)


def split(model: nnx.Module) -> Tuple[Any, _Held]:
  """(graphdef, initial state) of an NNX model. Raises TypeError for rng state."""
  graphdef, state = nnx.split(model)
  for path, var in nnx.to_flat_state(state):
    if isinstance(var, nnx.RngState):
      raise TypeError(
          f"qat.quantize_model: the NNX model {type(model).__name__} holds rng state at "
          f"{'/'.join(_key(path))!r} (e.g. nnx.Dropout(rngs=...)), which a quantized model "
          f"cannot carry; build such layers without rngs and pass them at call time")
  params = inspect.signature(type(model).__call__).parameters
  takes_train = "train" in params or any(
      p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
  return graphdef, _Held(state, takes_train, type(model).__name__)


_TAPPED: Dict[type, type] = {}


def _tapped(cls: type) -> type:
  """A subclass of an NNX module class whose `__call__` output is sown into the linen
  ``intermediates`` collection at the module's path (AQD's feature taps read it)."""
  if cls not in _TAPPED:
    def __call__(self, *args, **kwargs):
      out = cls.__call__(self, *args, **kwargs)
      call = context.current_nnx_call()
      path = call.paths.get(id(self)) if call is not None else None
      if path is not None:
        scope = call.scope_at(path)
        if scope.is_mutable_collection("intermediates"):
          prev = scope.get_variable("intermediates", "__call__", ())
          scope.put_variable("intermediates", "__call__", tuple(prev) + (out,))
      return out
    _TAPPED[cls] = type(cls.__name__, (cls,), {"__call__": __call__})
  return _TAPPED[cls]


class NnxModule(nn.Module):
  """Runs the NNX model `graphdef` with its variables in linen scopes (module docstring)."""
  graphdef: Any
  initial: _Held

  def __call__(self, *args, train=None, **kwargs):
    cache = {(): self.scope}

    def scope_at(path: Tuple[str, ...]):
      if path not in cache:
        cache[path] = scope_at(path[:-1]).push(path[-1], reuse=True)
      return cache[path]

    leaves, values = [], {}
    for path, var in nnx.to_flat_state(self.initial.state):
      key, col, init = _key(path), _collection(var), var.get_value()
      scope = scope_at(key[:-1])
      if col == "params":
        value = scope.param(key[-1], lambda _, v=init: v)
      else:
        value = scope.variable(col, key[-1], lambda v=init: v).value
      values[key] = value
      leaves.append((path, var.replace(value)))
    model = nnx.merge(self.graphdef, nnx.from_flat_state(leaves))
    if train is not None:
      if self.initial.takes_train:
        kwargs["train"] = train
      else:
        model.set_attributes(deterministic=not train, use_running_average=not train,
                             raise_if_not_found=False)
    paths = {}
    for path, m in nnx.iter_modules(model):
      paths[id(m)] = _key(path)
      if path and self.is_mutable_collection("intermediates"):
        object.__setattr__(m, "__class__", _tapped(type(m)))
    with context.nnx_call(context.NnxCall(self, paths, scope_at)):
      out = model(*args, **kwargs)
    for path, var in nnx.to_flat_state(nnx.state(model)):
      key, col = _key(path), _collection(var)
      if col == "params" or not self.is_mutable_collection(col):
        continue
      value = var.get_value()
      if value is not values.get(key):
        scope_at(key[:-1]).put_variable(col, key[-1], value)
    return out


def as_linen(model: nnx.Module) -> NnxModule:
  """The NNX model as a linen module (its current variable values as `init`'s)."""
  graphdef, held = split(model)
  return NnxModule(graphdef, held)
