"""The official PyTorch ViG / Pyramid ViG weights as this project's variables (docs/METHOD.md,
"Official pretrained weights").

The official release (github.com/huawei-noah/Efficient-AI-Backbones, `vig_pytorch/`) ships
state dicts of `vig_{ti,s,b}_224_gelu` and `pvig_{ti,s,m,b}_224_gelu`. Every tensor of them
maps by name to one variable of the registered model of the same name here
(:data:`OFFICIAL_NAMES`):

  | official (NCHW, PyTorch)                           | ours (NHWC, flax)                  |
  |----------------------------------------------------|------------------------------------|
  | stem.convs.{3i}.weight (O, I, 3, 3) / .bias        | stem/conv{i}/kernel (3, 3, I, O)   |
  | stem.convs.{3i+1} (BatchNorm2d)                    | stem/bn{i}                         |
  | pos_embed (1, C, H, W)                             | pos_embed (1, H, W, C)             |
  | backbone.{j}.0.fc1.0 / .fc1.1 (1x1 conv / BN)      | grapher{i}/fc1 (I, O) / fc1_bn     |
  | backbone.{j}.0.graph_conv.gconv.nn.0 (groups 4)    | grapher{i}/gconv (4, I/4, O/4)     |
  | backbone.{j}.0.graph_conv.gconv.nn.1 / fc2.0 / fc2.1 | grapher{i}/gconv_bn / fc2 / fc2_bn |
  | backbone.{j}.1.fc1.{0,1} / fc2.{0,1}               | ffn{i}/fc1, fc1_bn / fc2, fc2_bn   |
  | backbone.{j}.conv.0 / .conv.1 (pyramid)            | downsample{s}/conv / bn            |
  | prediction.0 / .1 / .4                             | head/fc / bn / classifier          |

with BatchNorm2d's weight, bias, running_mean, running_var -> scale, bias (params) and mean,
var (batch_stats); j = i for the isotropic ViG, i + s in stage s of the pyramid (whose
Downsample modules sit between the blocks). Not mapped: BN's `num_batches_tracked`
counters, and the pyramid's `backbone.{j}.0.relative_pos` tables, frozen constants that
the model here computes from the grid (`models.pvig.relative_pos_bias`): when a file holds
them they are compared by value (:data:`RELATIVE_POS_ATOL`), not loaded.

Entry points: :func:`read_state_dict` (`.pth` / `.pt` through PyTorch when installed,
`pip install -e ".[torch]"`; `.npz` and `.safetensors` with numpy alone),
:func:`convert` (state dict -> variables, every name and shape checked, refusing with the
missing / unexpected / mismatched names listed), :func:`fold_input_normalization` (the
official inputs are normalised with mean = std = 0.5, this project's ImageNet pipeline with
ImageNet's statistics); `qgnn_jax.workdir.convert_checkpoint` makes a workdir of them that
`experiments.evaluate`, `experiments.export` and `--config.init_from` take. The files are
read by `qgnn_jax.official_files`. :func:`neighbors_variables` turns official k-NN indices
into the `models.blocks.NEIGHBORS` collection, to compare logits with the official code's
graphs.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from qgnn_jax import models as models_lib
from qgnn_jax.official_files import (SUFFIXES, ConversionError, file_sha256,  # noqa: F401
                                     read_safetensors, read_state_dict, write_safetensors)
from qgnn_jax.models.blocks import NEIGHBORS
from qgnn_jax.models.pvig import PyramidViG, relative_pos_bias
from qgnn_jax.models.vig import ViG

# Our registry name -> the official constructor (vig_pytorch/vig.py, pyramid_vig.py).
OFFICIAL_NAMES: Mapping[str, str] = {
    "vig_ti_224": "vig_ti_224_gelu", "vig_s_224": "vig_s_224_gelu",
    "vig_b_224": "vig_b_224_gelu", "pvig_ti_224": "pvig_ti_224_gelu",
    "pvig_s_224": "pvig_s_224_gelu", "pvig_m_224": "pvig_m_224_gelu",
    "pvig_b_224": "pvig_b_224_gelu"}
# The official training / evaluation input normalisation (timm default_cfg of every
# variant: mean = std = 0.5 per channel, on pixels scaled to [0, 1]).
OFFICIAL_MEAN = (0.5, 0.5, 0.5)
OFFICIAL_STD = (0.5, 0.5, 0.5)
# A file's relative_pos table against ours (values in [-1, 0.3]): PyTorch's float32 bicubic
# against ours in float64 differ by up to ~2e-6 (tests/test_models.py).
RELATIVE_POS_ATOL = 1e-4
_IGNORED = re.compile(r".*\.num_batches_tracked$")
_RELATIVE_POS = re.compile(r"backbone\.\d+\.0\.relative_pos$")
_LISTED = 6  # names quoted in an error message


# ----------------------------------------------------------------------------- reading
# (qgnn_jax/official_files.py: the tensor files; their names are handed on from here.)


# ----------------------------------------------------------------------------- mapping


@dataclasses.dataclass(frozen=True)
class Entry:
  """One variable of ours: its collection and path, the official name and layout.

  layout: 'conv' (O, I, kh, kw) -> (kh, kw, I, O); 'dense' (O, I, 1, 1) -> (I, O);
  'grouped' (O, I/G, 1, 1) -> (G, I/G, O/G); 'nchw' (1, C, H, W) -> (1, H, W, C);
  'vector' as is. shape: ours; official_shape: what the file must hold.
  """
  collection: str
  path: Tuple[str, ...]
  official: str
  layout: str
  shape: Tuple[int, ...]
  official_shape: Tuple[int, ...]


_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _official_shape(layout: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
  if layout == "conv":
    kh, kw, i, o = shape
    return (o, i, kh, kw)
  if layout == "dense":
    i, o = shape
    return (o, i, 1, 1)
  if layout == "grouped":
    g, i, o = shape
    return (g * o, i, 1, 1)
  if layout == "nchw":
    n, h, w, c = shape
    return (n, c, h, w)
  return tuple(shape)


def to_ours(layout: str, x: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
  """An official tensor in our layout (float32, C-contiguous: no view of the file's array,
  which can then be freed). x: official_shape -> `shape`."""
  return np.array(_to_ours(layout, np.asarray(x), shape), np.float32, order="C", copy=True)


def _to_ours(layout: str, x: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
  if layout == "conv":
    return x.transpose(2, 3, 1, 0)
  if layout == "dense":
    return x[:, :, 0, 0].T
  if layout == "grouped":
    g, i, o = shape  # output channel g * o + k reads input group g
    return x[:, :, 0, 0].reshape(g, o, i).transpose(0, 2, 1)
  if layout == "nchw":
    return x.transpose(0, 2, 3, 1)
  return x


def to_official(layout: str, x: np.ndarray) -> np.ndarray:
  """Inverse of :func:`to_ours`: our variable in the official layout."""
  x = np.asarray(x)
  if layout == "conv":
    return x.transpose(3, 2, 0, 1)
  if layout == "dense":
    return x.T[:, :, None, None]
  if layout == "grouped":
    g, i, o = x.shape
    return x.transpose(0, 2, 1).reshape(g * o, i)[:, :, None, None]
  if layout == "nchw":
    return x.transpose(0, 3, 1, 2)
  return x


def _block_prefixes(model) -> Tuple[List[str], Dict[int, str]]:
  """Official module names of our grapher/ffn block i ('backbone.{j}') and downsample s."""
  if isinstance(model, PyramidViG):
    blocks, downs, j = [], {}, 0
    for s, nb in enumerate(model.blocks):
      if s > 0:
        downs[s] = f"backbone.{j}"
        j += 1
      for _ in range(nb):
        blocks.append(f"backbone.{j}")
        j += 1
    return blocks, downs
  if isinstance(model, ViG):
    return [f"backbone.{i}" for i in range(model.depth)], {}
  raise ConversionError(f"{type(model).__name__} has no official counterpart; valid: ViG, "
                        f"PyramidViG (models {', '.join(OFFICIAL_NAMES)})")


def _official_name(path: Tuple[str, ...], collection: str, blocks: List[str],
                   downs: Dict[int, str]) -> Tuple[str, str]:
  """(official name, layout) of one of our variables."""
  *mods, leaf = path
  top = mods[0] if mods else ""
  if not mods and leaf == "pos_embed":
    return "pos_embed", "nchw"

  def layer(prefix, name, kind):
    if kind == "bn":
      return f"{prefix}.{_BN[name]}", "vector"
    return f"{prefix}.{'weight' if name == 'kernel' else 'bias'}", (
        kind if name == "kernel" else "vector")

  if top == "stem":
    m = re.fullmatch(r"(conv|bn)(\d+)", mods[1])
    i = int(m.group(2))
    if m.group(1) == "conv":
      return layer(f"stem.convs.{3 * i}", leaf, "conv")
    return layer(f"stem.convs.{3 * i + 1}", leaf, "bn")
  if top == "head":
    sub = {"fc": ("prediction.0", "dense"), "bn": ("prediction.1", "bn"),
           "classifier": ("prediction.4", "dense")}[mods[1]]
    return layer(sub[0], leaf, sub[1])
  m = re.fullmatch(r"(grapher|ffn|downsample)(\d+)", top)
  if m is None:
    raise KeyError(path)
  kind, i = m.group(1), int(m.group(2))
  if kind == "downsample":
    sub = {"conv": ("conv.0", "conv"), "bn": ("conv.1", "bn")}[mods[1]]
    return layer(f"{downs[i]}.{sub[0]}", leaf, sub[1])
  prefix = f"{blocks[i]}.{0 if kind == 'grapher' else 1}"
  sub = {"fc1": ("fc1.0", "dense"), "fc1_bn": ("fc1.1", "bn"),
         "fc2": ("fc2.0", "dense"), "fc2_bn": ("fc2.1", "bn"),
         "gconv": ("graph_conv.gconv.nn.0", "grouped"),
         "gconv_bn": ("graph_conv.gconv.nn.1", "bn")}[mods[1]]
  return layer(f"{prefix}.{sub[0]}", leaf, sub[1])


def variable_shapes(model, image_shape: Sequence[int]) -> Dict[str, Any]:
  """{'params': ..., 'batch_stats': ...} of ShapeDtypeStructs (no compile, no memory)."""
  x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)


def plan(model, image_shape: Sequence[int] = (224, 224, 3)) -> List[Entry]:
  """Every variable of `model` (a ViG or PyramidViG) with its official name and layout.

  Raises ConversionError for a module without an official counterpart.
  """
  blocks, downs = _block_prefixes(model)
  shapes = variable_shapes(model, image_shape)
  out = []
  for collection in ("params", "batch_stats"):
    leaves = jax.tree_util.tree_flatten_with_path(shapes.get(collection, {}))[0]
    for kp, leaf in leaves:
      path = tuple(str(getattr(k, "key", k)) for k in kp)
      name, layout = _official_name(path, collection, blocks, downs)
      out.append(Entry(collection, path, name, layout, tuple(leaf.shape),
                       _official_shape(layout, tuple(leaf.shape))))
  return out


def relative_pos_specs(model, image_shape: Sequence[int] = (224, 224, 3)
                       ) -> Dict[str, Tuple[int, int, int, int]]:
  """{official name: (C, H, W, r)} of the pyramid's relative_pos tables ({} for ViG): table
  `relative_pos_bias(C, H, W, r)[None]`, shape (1, H*W, (H/r)*(W/r))."""
  if not isinstance(model, PyramidViG) or not model.relative_pos:
    return {}
  blocks, _ = _block_prefixes(model)
  h, w = -(-image_shape[0] // 4), -(-image_shape[1] // 4)
  out, idx = {}, 0
  for s, (c, nb, r) in enumerate(zip(model.channels, model.blocks, model.reduce_ratios)):
    if s > 0:
      h, w = (h + 1) // 2, (w + 1) // 2
    for _ in range(nb):
      out[f"{blocks[idx]}.0.relative_pos"] = (c, h, w, r)
      idx += 1
  return out


def _listed(names: Sequence[str]) -> str:
  names = sorted(names, key=_natural)
  more = f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
  return ", ".join(names[:_LISTED]) + more


def _natural(name: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def guess_model(state_dict: Mapping[str, Any]) -> Optional[str]:
  """The official variant whose layout `state_dict` has (by its position embedding's
  channels and its number of Graphers), or None."""
  if "pos_embed" not in state_dict:
    return None
  c = int(np.shape(state_dict["pos_embed"])[1])
  depth = sum(1 for k in state_dict if re.fullmatch(r"backbone\.\d+\.0\.fc1\.0\.weight", k))
  pyramid = any(re.fullmatch(r"backbone\.\d+\.conv\.0\.weight", k) for k in state_dict)
  for name in OFFICIAL_NAMES:
    kw = models_lib.MODELS[name].keywords
    if pyramid and "channels" in kw and (kw["channels"][0], sum(kw["blocks"])) == (c, depth):
      return name
    if not pyramid and "dim" in kw and (kw["dim"], kw["depth"]) == (c, depth):
      return name
  return None


def num_classes_of(state_dict: Mapping[str, Any], path: str = "the state dict") -> int:
  """The classes of an official state dict: the rows of its classifier prediction.4."""
  w = state_dict.get("prediction.4.weight")
  if w is None or len(np.shape(w)) != 4:
    raise ConversionError(f"{path}: no classifier 'prediction.4.weight' (O, I, 1, 1): not an "
                          f"official ViG state dict")
  return int(np.shape(w)[0])


def check(state_dict: Mapping[str, Any], entries: Sequence[Entry], model_name: str,
          path: str = "the state dict",
          relative_pos: Optional[Mapping[str, Tuple[int, int, int, int]]] = None) -> None:
  """Raises ConversionError (one line) unless `state_dict` holds exactly the entries' names
  with their official shapes, plus ignored BN counters and any of the `relative_pos` tables
  (:func:`relative_pos_specs`; those given as numpy arrays must equal the model's to
  RELATIVE_POS_ATOL). Values may be arrays or anything with a shape (e.g. ShapeDtypeStruct)."""
  relative_pos = relative_pos or {}
  want = {e.official: e for e in entries}
  extra = [k for k in state_dict if k not in want and not _IGNORED.match(k)
           and not (k in relative_pos)]
  missing = [k for k in want if k not in state_dict]
  wrong = [k for k in want if k in state_dict
           and tuple(np.shape(state_dict[k])) != want[k].official_shape]
  guess = guess_model(state_dict)
  hint = (f"; the file looks like {guess} (--model {guess})" if guess and guess != model_name
          else "")
  if wrong or missing or extra:
    parts = []
    if wrong:
      k = sorted(wrong, key=_natural)[0]
      parts.append(f"{len(wrong)} tensors differ in shape (first: {k} is "
                   f"{tuple(np.shape(state_dict[k]))} in the file, {model_name} needs "
                   f"{want[k].official_shape})")
    if missing:
      parts.append(f"missing {len(missing)}: {_listed(missing)}")
    if extra:
      parts.append(f"unexpected {len(extra)}: {_listed(extra)}")
    raise ConversionError(f"{path} does not fit {model_name}: {'; '.join(parts)}{hint}")
  for k, spec in relative_pos.items():
    if k in state_dict:
      c, h, w, r = spec
      shape = (1, h * w, (h // r) * (w // r))
      if tuple(np.shape(state_dict[k])) != shape:
        raise ConversionError(f"{path}: {k} is {tuple(np.shape(state_dict[k]))}, {model_name} "
                              f"at this input size computes {shape}{hint}")
      if not isinstance(state_dict[k], np.ndarray):
        continue
      got = np.asarray(state_dict[k], np.float32)
      table = relative_pos_bias(c, h, w, r)[None]
      if got.shape != table.shape:
        raise ConversionError(f"{path}: {k} is {got.shape}, {model_name} at this input size "
                              f"computes {table.shape}{hint}")
      err = float(np.max(np.abs(got - table)))
      if not err <= RELATIVE_POS_ATOL:
        raise ConversionError(f"{path}: {k} differs from the table {model_name} computes by "
                              f"{err:.2e} (> {RELATIVE_POS_ATOL:g})")


def convert(state_dict: Mapping[str, Any], model, model_name: str = "the model",
            image_shape: Sequence[int] = (224, 224, 3), path: str = "the state dict"
            ) -> Dict[str, Any]:
  """An official state dict as `model`'s variables.

  Args:
    state_dict: {official name: array (any float dtype)}, e.g. from :func:`read_state_dict`.
    model: a ViG or PyramidViG module (e.g. `models.create_model(name, num_classes)`).
    image_shape: (H, W, C) of the input it was built for.
  Returns:
    {'params': ..., 'batch_stats': ...}: nested dicts of float32 numpy arrays.
  Raises:
    ConversionError: a missing, unexpected or mis-shaped tensor, or a relative_pos table
      that differs from the model's (one line listing the names).
  """
  entries = plan(model, image_shape)
  check(state_dict, entries, model_name, path, relative_pos_specs(model, image_shape))
  out: Dict[str, Any] = {}
  for e in entries:
    node = out.setdefault(e.collection, {})
    for p in e.path[:-1]:
      node = node.setdefault(p, {})
    node[e.path[-1]] = to_ours(e.layout, state_dict[e.official], e.shape)
  return out


def export_state_dict(variables: Mapping[str, Any], model,
                      image_shape: Sequence[int] = (224, 224, 3)) -> Dict[str, np.ndarray]:
  """Inverse of :func:`convert`: our variables as an official state dict (float32; BN
  counters zero, no relative_pos tables). For tests and for going back to PyTorch."""
  out = {}
  for e in plan(model, image_shape):
    node = variables[e.collection]
    for p in e.path:
      node = node[p]
    out[e.official] = np.ascontiguousarray(to_official(e.layout, np.asarray(node, np.float32)))
    if e.official.endswith(".running_var"):
      out[e.official[:-len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
  return out


def neighbors_variables(model, official_knn: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  """The `models.blocks.NEIGHBORS` collection from official k-NN indices.

  official_knn: {official Grapher name 'backbone.{j}.0': (B, N, k) ints} (edge_index[0] of
  its DenseDilatedKnnGraph). Returns {'grapher{i}': {'indices': int32 (B, N, k)}}; pass it
  as `model.apply({..., NEIGHBORS: it}, x)`.
  """
  blocks, _ = _block_prefixes(model)
  out = {}
  for i, b in enumerate(blocks):
    key = f"{b}.0"
    if key not in official_knn:
      raise KeyError(f"no k-NN indices for {key} (grapher{i}); given: {_listed(official_knn)}")
    out[f"grapher{i}"] = {"indices": np.asarray(official_knn[key], np.int32)}
  return out


def fold_input_normalization(variables: Dict[str, Any], mean: Sequence[float],
                             std: Sequence[float], source_mean: Sequence[float] = OFFICIAL_MEAN,
                             source_std: Sequence[float] = OFFICIAL_STD) -> Dict[str, Any]:
  """Variables that take inputs normalised with (mean, std) where these took (source_mean,
  source_std): the first stem conv W, b become W * s/s0 (per input channel) and
  b + sum W (m - m0)/s0, since x0 = (p - m0)/s0 = (s/s0) x + (m - m0)/s0.

  Exact wherever the 3x3 window lies inside the image; on the padded border (the top row and
  left column of the stride-2 output at 224 px: 223 of 12,544 positions) a padded zero
  stands for p = m here and p = m0 there, a difference of W (m - m0)/s0 per padded tap
  (docs/METHOD.md, "Official pretrained weights", measures its effect). Returns a new tree
  (the input is not modified).
  """
  conv = variables["params"]["stem"]["conv0"]
  w = np.asarray(conv["kernel"], np.float64)  # (3, 3, C, O)
  c = w.shape[2]
  m, s, m0, s0 = (np.asarray(v, np.float64) for v in (mean, std, source_mean, source_std))
  if not m.shape == s.shape == m0.shape == s0.shape == (c,):
    raise ValueError(f"normalisation statistics must have {c} channels (the stem's input), "
                     f"got mean {tuple(mean)}, std {tuple(std)}, source {tuple(source_mean)}, "
                     f"{tuple(source_std)}")
  kernel = w * (s / s0)[None, None, :, None]
  bias = np.asarray(conv["bias"], np.float64) + np.einsum("hwco,c->o", w, (m - m0) / s0)
  out = jax.tree.map(lambda x: x, variables)  # new containers, same leaves
  out["params"]["stem"]["conv0"] = {"kernel": kernel.astype(np.float32),
                                    "bias": bias.astype(np.float32)}
  return out
