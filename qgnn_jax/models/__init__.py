"""Model registry: `MODELS[name](num_classes, **kw)` -> plain linen module taking NHWC images.

| name | input | nodes | blocks x dim |
|---|---|---|---|
| vig_ti_224 / vig_s_224 / vig_b_224 | 224x224x3 | 14x14 | 12x192 / 16x320 / 16x640 |
| pvig_ti_224 / pvig_s_224 / pvig_m_224 / pvig_b_224 | 224x224x3 | pyramid | see pvig.py |
| vig_ti_32 | 32x32x3 (stride-4 stem) | 8x8 | 12x192 |
| vig_tiny_28 | 28x28x1 (stride-4 stem) | 7x7 | 4x96 |
| vig_small_28 | 28x28x1 (stride-4 stem) | 7x7 | 6x128 |
| vig_digits | 8x8x1 (stride-2 stem) | 4x4 | 4x64, k=4 |
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from qgnn_jax.models.pvig import PYRAMID_MODELS
from qgnn_jax.models.vig import ViG

_SMALL = (2, 2, 1, 1, 1)  # stride-4 stem for 28/32-px inputs

MODELS: Dict[str, Callable[..., nn.Module]] = {
    "vig_ti_224": functools.partial(ViG, dim=192, depth=12),
    "vig_s_224": functools.partial(ViG, dim=320, depth=16),
    "vig_b_224": functools.partial(ViG, dim=640, depth=16),
    "vig_ti_32": functools.partial(ViG, dim=192, depth=12, stem_strides=_SMALL),
    "vig_tiny_28": functools.partial(ViG, dim=96, depth=4, stem_strides=_SMALL, head_hidden=256),
    "vig_small_28": functools.partial(ViG, dim=128, depth=6, stem_strides=_SMALL, head_hidden=512),
    "vig_digits": functools.partial(ViG, dim=64, depth=4, k=4, stem_strides=(2, 1, 1, 1, 1),
                                    head_hidden=128),
}

MODELS.update(PYRAMID_MODELS)

# Module paths of every registered model's layer groups (regexes, fully matched against
# '/'-joined module paths), from which quantization rules are built (`qgnn_jax.recipe`):
#   body: every Dense / 1x1 conv of Grapher, graph conv and FFN, and the pyramid's
#         Downsample convs (quantized: docs/METHOD.md, "Quantized layers");
#   stem_rest: the stem convs after the first (full precision by default; the first
#         stays full precision always); head: hidden layer and classifier.
LAYER_GROUPS: Dict[str, str] = {
    "body": r"(grapher|ffn)\d+/.*|downsample\d+/.*",
    "stem_rest": r"stem/conv[1-9]\d*",
    "head": r"head/(fc|classifier)",
}
# The block outputs AQD distils: every Grapher and every FFN (module-path regex).
FEATURE_TAPS = r"(grapher|ffn)\d+"

# (H, W, C) of one input image per variant: what the stem's strides were sized for.
INPUT_SHAPES: Dict[str, Tuple[int, int, int]] = {
    **{name: (224, 224, 3) for name in MODELS if name.endswith("_224")},
    "vig_ti_32": (32, 32, 3),
    "vig_tiny_28": (28, 28, 1),
    "vig_small_28": (28, 28, 1),
    "vig_digits": (8, 8, 1),
}


def input_shape(name: str) -> Tuple[int, int, int]:
  """(H, W, C) of one input image of a registered model (NHWC batches add B in front)."""
  if name not in INPUT_SHAPES:
    what = "has no input size" if name in MODELS else "unknown model"
    raise ValueError(f"{what}: {name!r}; valid: {sorted(INPUT_SHAPES)}")
  return INPUT_SHAPES[name]


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Builds a registered model. kwargs override the variant's fields (e.g. axis_name, dtype)."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; valid: {sorted(MODELS)}")
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
  return MODELS[name](num_classes=num_classes, **kwargs)


def count_params(params: Any) -> int:
  """Number of scalars in a params pytree (arrays or ShapeDtypeStructs)."""
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def forward_flops(model: Any, image_shape: Tuple[int, int, int], batch: int = 1,
                  **apply_kwargs) -> float:
  """XLA's flop count of one evaluation forward pass over `batch` images of `image_shape`.

  From the lowered HLO's cost analysis (no compile, no parameters allocated): a multiply-add
  counts 2, elementwise ops count too, so it is about twice the "FLOPs" (multiply-adds) that
  vision papers quote. `model` is a linen module or a `qgnn_jax.qat.QuantizedModel`
  (apply_kwargs, e.g. mode="quant", add the fake quantizers' elementwise work).
  """
  x = jax.ShapeDtypeStruct((batch,) + tuple(image_shape), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  lowered = jax.jit(lambda v, x: model.apply(v, x, **apply_kwargs)).lower(variables, x)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if not cost or "flops" not in cost:
    raise RuntimeError(f"XLA gave no flop count for {model.__class__.__name__}: {cost!r}")
  return float(cost["flops"])
