"""Which module runs an intercepted op, and which of its operands is a weight.

qwix's public interception (`qwix.quantize_model` with a `qwix.QuantizationProvider`
whose `get_intercept_map` names the ops) calls the provider's handlers with the op's
operands only. The rest comes from here, with public Flax API (docs/METHOD.md,
"Quantization as a model transform"):

  * the current module: linen modules are tracked with `nn.intercept_methods` while a
    `tracked` model runs (a stack of the modules whose methods are executing); inside
    `qgnn_jax.qat.nnx.NnxModule` (an NNX model run as a linen module) it is the NNX
    module whose method is executing (the nearest caller frame whose `self` is one),
    seen through a `Site` that holds its linen scope;
  * `find_param`: which param of that module an operand is (by identity, through unary
    ops on it such as a dtype cast, else by a unique shape), as qwix's own helper does;
  * `next_site_index`: 0, 1, 2, ... for the ops one module scope runs during a call.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import weakref
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import flax.linen as nn
import jax
from flax import nnx

_STACK: contextvars.ContextVar[Tuple[nn.Module, ...]] = contextvars.ContextVar(
    "qgnn_jax_linen_modules", default=())


@dataclasses.dataclass(frozen=True)
class NnxCall:
  """An NNX model running inside an `NnxModule` (set for the duration of its call).

  bridge: the linen `NnxModule`; paths: id(nnx module) -> its path (tuple of str);
  scope_at: path -> the linen scope holding that NNX module's variables.
  """
  bridge: nn.Module
  paths: Mapping[int, Tuple[str, ...]]
  scope_at: Any


_NNX: contextvars.ContextVar[Optional[NnxCall]] = contextvars.ContextVar(
    "qgnn_jax_nnx_call", default=None)


@dataclasses.dataclass(frozen=True, eq=False)
class Site:
  """An NNX module seen as the provider sees a linen one: its linen `scope` (variables,
  rngs, mutability), `path` and `is_initializing()`."""
  scope: Any
  path: Tuple[str, ...]
  bridge: nn.Module
  module: nnx.Module

  def is_initializing(self) -> bool:
    return self.bridge.is_initializing()


def _track(next_fun, args, kwargs, context):
  token = _STACK.set(_STACK.get() + (context.module,))
  try:
    return next_fun(*args, **kwargs)
  finally:
    _STACK.reset(token)


def tracked(model: nn.Module) -> nn.Module:
  """A copy of linen `model` that records the modules running while its `__call__` runs.

  The copy's class is a subclass with the same name and fields (as `qwix.quantize_model`
  makes one), so parameter paths and variables are the original's.
  """
  cls = type(model)
  if getattr(cls, "_qgnn_tracked", None) is not None:
    return model
  raw = cls.__call__
  while hasattr(raw, "method_handler_wrapped"):
    raw = raw.__wrapped__

  @functools.wraps(raw)
  def __call__(self, *args, **kwargs):
    token = _STACK.set(_STACK.get() + (self,))
    try:
      with nn.intercept_methods(_track):
        return raw(self, *args, **kwargs)
    finally:
      _STACK.reset(token)

  new_cls = type(cls.__name__, (cls,), {"__call__": __call__, "_qgnn_tracked": cls})
  new_cls.__qualname__ = cls.__qualname__
  out = model.copy()
  object.__setattr__(out, "__class__", new_cls)
  return out


@contextlib.contextmanager
def nnx_call(call: NnxCall) -> Iterator[NnxCall]:
  """Scopes an NNX model's run inside its `NnxModule` (see `current_module`)."""
  token = _NNX.set(call)
  try:
    yield call
  finally:
    _NNX.reset(token)


def current_nnx_call() -> Optional[NnxCall]:
  return _NNX.get()


def _nnx_frame_module() -> Optional[nnx.Module]:
  frame = inspect.currentframe()
  while frame is not None:
    obj = frame.f_locals.get("self")
    if isinstance(obj, nnx.Module):
      return obj
    frame = frame.f_back
  return None


def current_module() -> Any:
  """The linen module (or NNX `Site`) running the current op; None outside a tracked run.

  Raises TypeError inside `nnx.bridge.ToLinen` (its NNX modules hold their variables in
  one linen scope that the sites cannot address): pass the NNX model itself to
  `qat.quantize_model`.
  """
  stack = _STACK.get()
  if not stack:
    return None
  top = stack[-1]
  call = _NNX.get()
  if call is not None and top is call.bridge:
    module = _nnx_frame_module()
    if module is None or id(module) not in call.paths:
      return top
    path = call.paths[id(module)]
    return Site(call.scope_at(path), path, call.bridge, module)
  if isinstance(top, nnx.bridge.ToLinen):
    raise TypeError(
        f"qgnn_jax.qat: the model runs an NNX module through nnx.bridge.ToLinen at "
        f"{'/'.join(map(str, top.path))!r}; its ops cannot be quantized there: pass the NNX "
        f"model itself to qat.quantize_model (it runs NNX models as linen modules)")
  return top


def module_path(module: Any) -> str:
  return "/".join(map(str, module.path))


def params_of(module: Any) -> Dict[str, Any]:
  """{name: array} of the module's own params (not its children's)."""
  if module.scope is None:
    return {}
  params = module.scope.variables().get("params", {})
  out = {}
  for name, value in params.items():
    value = nn.meta.unbox(value)
    if isinstance(value, jax.Array):
      out[name] = value
  return out


def find_param(module: Any, x: Any) -> Optional[str]:
  """The name of the param of `module` that `x` is, or None.

  Found by identity, then by following a tracer back through unary ops (a dtype cast,
  a reshape), then by shape when exactly one param has x's shape (none if two; more
  than two raises ValueError) - the rules of qwix's own `find_param`, so the same
  operands are weights.
  """
  candidates = params_of(module)
  by_id = {id(v): n for n, v in candidates.items()}
  if id(x) in by_id:
    return by_id[id(x)]
  if isinstance(x, jax.core.Tracer) and hasattr(x, "parent"):
    y = x
    while True:
      if id(y) in by_id:
        return by_id[id(y)]
      parent = getattr(y, "parent", None)
      if parent is not None and len(parent.in_tracers) == 1:
        y = parent.in_tracers[0]
      elif hasattr(y, "get_const") and id(const := y.get_const()) in by_id:
        return by_id[id(const)]
      else:
        break
  same = [n for n, c in candidates.items() if c.shape == x.shape]
  if len(same) > 2:
    raise ValueError(f"qgnn_jax.qat: {module_path(module)!r} has several params of shape "
                     f"{tuple(x.shape)} ({same}): cannot tell which one an op uses")
  return same[0] if len(same) == 1 else None


_COUNTS: Dict[int, Tuple[weakref.ref, int]] = {}


def next_site_index(module: Any) -> int:
  """0, 1, 2, ... for the ops a module's scope runs during one call."""
  scope = module.scope
  key = id(scope)
  entry = _COUNTS.get(key)
  n = 0 if entry is None or entry[0]() is None else entry[1]
  if entry is None or entry[0]() is None:
    ref = weakref.ref(scope, lambda _, k=key: _COUNTS.pop(k, None))
  else:
    ref = entry[0]
  _COUNTS[key] = (ref, n + 1)
  return n
