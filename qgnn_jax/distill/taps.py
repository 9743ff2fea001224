"""Which block outputs AQD distils: a module-path pattern, for any linen model."""
from __future__ import annotations

import dataclasses
import re
from typing import Any, List

import jax
from flax import traverse_util


@dataclasses.dataclass(frozen=True)
class FeatureTaps:
  """The block outputs AQD distils: the outputs of the modules whose '/'-joined path
  fully matches `pattern` (e.g. ViG's r"(grapher|ffn)\\d+"), for any linen model.

  Pass `capture` as `capture_intermediates=` to `apply` (with "intermediates" mutable)
  and `collect` the returned collection.
  """
  pattern: str

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"feature taps pattern {self.pattern!r} is not a regex: {e}") from None

  def capture(self, module: Any, method_name: str) -> bool:
    return method_name == "__call__" and \
        re.fullmatch(self.pattern, "/".join(map(str, module.path))) is not None

  def collect(self, intermediates: Any) -> List[jax.Array]:
    """The captured outputs, each reshaped (B, N, C) (all axes between the first and the
    last are nodes), in module-path order. Raises if nothing matched."""
    flat = traverse_util.flatten_dict(dict(intermediates), sep="/")
    feats = []
    for path in sorted(flat):
      module_path, _, method = path.rpartition("/")
      if method == "__call__" and re.fullmatch(self.pattern, module_path):
        for out in flat[path]:
          feats.append(out.reshape(out.shape[0], -1, out.shape[-1]))
    if not feats:
      raise ValueError(f"no module output matched the feature taps {self.pattern!r}; "
                       f"captured: {sorted(flat)[:8]}")
    return feats
