"""Tensor files as numpy: the formats official checkpoints come in (`.pth` / `.pt` / `.bin`
through PyTorch when installed, `.npz`, `.safetensors` with numpy alone), and a file's
SHA-256. `qgnn_jax.official` maps what they hold to this project's variables.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any, Dict, Mapping

import numpy as np

SUFFIXES = (".pth", ".pt", ".bin", ".npz", ".safetensors")
_WRAPPERS = ("state_dict", "model", "state_dict_ema", "model_ema", "module")


class ConversionError(ValueError):
  """A file that is not an official ViG state dict of the model asked for; one line."""


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
