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
ImageNet's statistics) and :func:`convert_checkpoint` (a workdir that `experiments.evaluate`,
`experiments.export` and `--config.init_from` take). :func:`neighbors_variables` turns
official k-NN indices into the `models.blocks.NEIGHBORS` collection, to compare logits with
the official code's graphs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import struct
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from qgnn_jax import models as models_lib
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
SUFFIXES = (".pth", ".pt", ".bin", ".npz", ".safetensors")
_IGNORED = re.compile(r".*\.num_batches_tracked$")
_RELATIVE_POS = re.compile(r"backbone\.\d+\.0\.relative_pos$")
_WRAPPERS = ("state_dict", "model", "state_dict_ema", "model_ema", "module")
_LISTED = 6  # names quoted in an error message


class ConversionError(ValueError):
  """A file that is not an official ViG state dict of the model asked for; one line."""


# ----------------------------------------------------------------------------- reading


def file_sha256(path: str) -> str:
  """SHA-256 (hex) of a file's bytes, read in 16 MiB chunks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      h.update(chunk)
  return h.hexdigest()


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
                       "U8": np.uint8, "BOOL": np.bool_}


def _safetensors_dtype(name: str):
  if name == "BF16":
    import ml_dtypes  # pylint: disable=g-import-not-at-top  (a jax dependency)
    return ml_dtypes.bfloat16
  if name not in _SAFETENSORS_DTYPES:
    raise ConversionError(f"unsupported safetensors dtype {name!r}; valid: "
                          f"{', '.join(sorted(_SAFETENSORS_DTYPES))}, BF16")
  return _SAFETENSORS_DTYPES[name]


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """A .safetensors file (8-byte little-endian header length, JSON header, raw data) as
  {name: array}, with numpy alone. Raises ConversionError on a truncated or malformed file."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ConversionError(f"{path}: {size} bytes, not a safetensors file (truncated?)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
      raise ConversionError(f"{path}: header of {n} bytes past the end of the {size}-byte "
                            f"file (truncated)")
    try:
      header = json.loads(f.read(n))
    except ValueError as e:
      raise ConversionError(f"{path}: unreadable safetensors header ({e})") from None
    data = f.read()
  out = {}
  for name, spec in header.items():
    if name == "__metadata__":
      continue
    begin, end = spec["data_offsets"]
    if end > len(data):
      raise ConversionError(f"{path}: tensor {name} ends at byte {8 + n + end} of a "
                            f"{size}-byte file (truncated)")
    dtype = np.dtype(_safetensors_dtype(spec["dtype"]))
    out[name] = np.frombuffer(data[begin:end], dtype).reshape(spec["shape"])
  return out


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray]) -> None:
  """{name: array} as a .safetensors file (float64/32/16, bfloat16, ints, bool)."""
  names = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
  header, offset, blobs = {}, 0, []
  for name, a in tensors.items():
    a = np.asarray(a, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
    code = "BF16" if a.dtype.name == "bfloat16" else names.get(a.dtype)
    if code is None:
      raise ValueError(f"{name}: dtype {a.dtype} has no safetensors code")
    blobs.append(a.tobytes())
    header[name] = {"dtype": code, "shape": list(a.shape),
                    "data_offsets": [offset, offset + len(blobs[-1])]}
    offset += len(blobs[-1])
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text)
    for b in blobs:
      f.write(b)


def _read_torch(path: str) -> Dict[str, Any]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConversionError(
        f"{path}: reading a PyTorch file needs torch (pip install -e \".[torch]\"), or "
        f"save it as .npz / .safetensors where torch is installed") from None
  try:
    raw = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  (truncated zip, bad pickle, ...)
    first = (str(e).strip().splitlines() or [""])[0][:200]
    raise ConversionError(f"{path}: not a readable PyTorch checkpoint (truncated or "
                          f"corrupt?): {type(e).__name__}: {first}") from None

  def to_numpy(v):
    if isinstance(v, torch.Tensor):
      v = v.detach().cpu()
      return (v.float() if v.dtype == torch.bfloat16 else v).numpy()
    if isinstance(v, Mapping):
      return {k: to_numpy(x) for k, x in v.items()}
    return v
  return to_numpy(raw)


def _flat_tensors(raw: Any, path: str) -> Dict[str, np.ndarray]:
  """Unwraps {'state_dict': ...}-style containers and DataParallel's 'module.' prefix."""
  while isinstance(raw, Mapping):
    arrays = {k: v for k, v in raw.items() if isinstance(v, np.ndarray)}
    if arrays:
      break
    inner = next((raw[k] for k in _WRAPPERS if isinstance(raw.get(k), Mapping)), None)
    if inner is None:
      break
    raw = inner
  if not isinstance(raw, Mapping) or not any(isinstance(v, np.ndarray) for v in raw.values()):
    raise ConversionError(f"{path}: holds no tensors (expected a state dict, or one under "
                          f"one of the keys {', '.join(_WRAPPERS)})")
  out = {}
  for k, v in raw.items():
    if isinstance(v, np.ndarray):
      out[k[len("module."):] if k.startswith("module.") else k] = v
  return out


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """An official state dict from `path` as {name: numpy array} (the file's dtypes).

  `.pth` / `.pt` / `.bin`: torch.load(weights_only=True) (needs torch: the `torch` extra);
  `.npz`: numpy; `.safetensors`: :func:`read_safetensors`. A state dict nested under
  'state_dict' / 'model' / 'state_dict_ema' is unwrapped, a 'module.' prefix dropped.
  Raises FileNotFoundError, or ConversionError (one line) for another suffix, a truncated
  or corrupt file or one without tensors.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in SUFFIXES:
    raise ConversionError(f"{path}: unknown suffix {suffix!r}; valid: {', '.join(SUFFIXES)}")
  if suffix == ".safetensors":
    raw = read_safetensors(path)
  elif suffix == ".npz":
    try:
      with np.load(path, allow_pickle=False) as z:
        raw = {k: z[k] for k in z.files}
    except Exception as e:  # pylint: disable=broad-except  (BadZipFile, EOFError, ValueError)
      raise ConversionError(f"{path}: not a readable .npz (truncated or corrupt?): "
                            f"{type(e).__name__}: {str(e)[:200]}") from None
  else:
    raw = _read_torch(path)
  return _flat_tensors(raw, path)


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


# ----------------------------------------------------------------------------- workdir


def convert_checkpoint(checkpoint: str, model_name: str, workdir: str, config,
                       fold_normalization: bool = True) -> Dict[str, Any]:
  """Converts an official checkpoint file into a workdir of an FP run of `model_name`.

  The workdir holds config.json (`config` with `model` = model_name, `method` = 'fp' and
  `source` = 'official <file name> sha256:<hex> ...') and checkpoints/0/, a TrainState
  (params, BN statistics, a fresh optimiser state for the config) that
  `experiments.evaluate --workdir`, `experiments.export --workdir` and
  `--config.init_from=WORKDIR` read. The classes come from the file's head and must equal
  those of `config.dataset`.

  Args:
    checkpoint: .pth / .pt / .bin (needs torch), .npz or .safetensors.
    model_name: a registered ViG / PyramidViG (the official ones: OFFICIAL_NAMES).
    workdir: must not hold a checkpoint yet.
    config: a run config (`experiments/configs/common.py`'s fields) giving the dataset,
      data_dir, batch sizes and optimiser of the runs that use the workdir.
    fold_normalization: fold the official input normalisation (mean = std = 0.5) into the
      first conv for the dataset's statistics (`fold_input_normalization`).
  Returns:
    {'workdir', 'model', 'num_classes', 'sha256', 'tensors', 'params', 'seconds'}.
  Raises:
    FileNotFoundError; ConversionError (bad file, wrong model, class count, a workdir that
    holds checkpoints); ValueError (unknown model or dataset); run_config.ConfigError.
  """
  from qgnn_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  from qgnn_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from qgnn_jax import recipe, run_config  # pylint: disable=g-import-not-at-top
  from qgnn_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  if model_name not in models_lib.MODELS:
    raise ValueError(f"unknown model {model_name!r}; valid (official): "
                     f"{', '.join(OFFICIAL_NAMES)}")
  dataset = config.dataset
  info = data_lib.get_info(dataset)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise ConversionError(f"{workdir} already holds checkpoints; use a new --workdir")
  state_dict = read_state_dict(checkpoint)
  num_classes = num_classes_of(state_dict, checkpoint)
  if num_classes != info.num_classes:
    raise ConversionError(f"{checkpoint}: its head has {num_classes} classes, dataset "
                          f"{dataset!r} has {info.num_classes}; pick a dataset with "
                          f"{num_classes} classes")
  image_shape = models_lib.input_shape(model_name)
  model = models_lib.create_model(model_name, num_classes)
  variables = convert(state_dict, model, model_name, image_shape, checkpoint)
  tensors = len(state_dict)
  del state_dict  # the file's arrays (peak memory: ViG-B's 348 MB more)
  if fold_normalization:
    variables = fold_input_normalization(variables, info.mean, info.std)
  sha = file_sha256(checkpoint)

  config = config.copy_and_resolve_references()
  config.model, config.method, config.init_from = model_name, "fp", ""
  config.source = f"official {os.path.basename(checkpoint)} sha256:{sha}" + (
      f" input-normalisation folded to {dataset}'s" if fold_normalization else "")
  run_config.validate(config, check_init_from=False)
  # The state `experiment.setup` builds for this config (same optimiser tree), holding the
  # converted variables; the optimiser's moments are fresh (zero).
  tx = train_lib.make_optimizer(
      config.optimizer, config.lr, 1, 0, config.weight_decay,
      quant_lr=(config.quant_lr if config.quant_lr > 0 else None),
      grad_clip=(config.grad_clip or None))
  qmodel = recipe.build_model(config, num_classes)
  shapes = jax.eval_shape(lambda: train_lib.create_state(
      qmodel, tx, jnp.zeros((1,) + tuple(image_shape), jnp.float32), jax.random.key(0)))
  num_params = models_lib.count_params(variables["params"])
  params = jax.tree.map(jnp.asarray, variables.pop("params"))
  state = train_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=jax.tree.map(jnp.asarray, variables.pop("batch_stats")), quant_stats={},
      opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(config.seed)))
  ckpt.check_compatible(ckpt.flatten_with_paths(shapes), state, "the converted state")
  os.makedirs(workdir, exist_ok=True)
  manager = ckpt.make_manager(ckpt_dir, max_to_keep=1)
  try:
    ckpt.save(manager, 0, state, force=True,  # orbax reads the arrays where they are
              meta={"step": 0, "train_seconds": 0.0, "fp_top1": None,
                    "started_at": None, "source": config.source})
  finally:
    manager.close()
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json(indent=2))
  return {"workdir": workdir, "model": model_name, "num_classes": num_classes, "sha256": sha,
          "tensors": tensors, "params": num_params,
          "seconds": time.perf_counter() - t0}
