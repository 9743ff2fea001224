"""The export file's container: its bytes, written atomically, read back and verified.

The file is one msgpack map (written with `flax.serialization`: msgpack is a dependency of
flax; no new package):

    {"format": "qgnn-jax-export", "version": 1, "sha256": hex digest of payload,
     "payload": bytes}

`payload` is itself a `flax.serialization.msgpack_serialize`d tree (arrays keep dtype and
shape; what it holds: `qgnn_jax.export.payload`). `from_bytes` checks the header, the
version and the digest before it reads the payload, and names the file and the fault.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Mapping

from flax import serialization

FORMAT = "qgnn-jax-export"
VERSION = 1


class ExportError(ValueError):
  """An export that cannot be written or read; the message names the file and the fault."""


def to_bytes(payload: Mapping[str, Any]) -> bytes:
  """The file's bytes: the msgpack container around the msgpack payload."""
  body = serialization.msgpack_serialize(dict(payload))
  return serialization.msgpack_serialize({
      "format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(body).hexdigest(),
      "payload": body})


def nbytes(payload: Mapping[str, Any]) -> int:
  """The size in bytes of the file `save(path, payload)` writes."""
  return len(to_bytes(payload))


def save(path: str, payload: Mapping[str, Any]) -> int:
  """Writes the export atomically (temp file in the same folder, fsync, rename); returns
  its size in bytes."""
  data = to_bytes(payload)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return len(data)


def from_bytes(data: bytes, where: str = "<bytes>") -> Dict[str, Any]:
  """The payload of an export's bytes, checked; ExportError naming `where` otherwise."""
  try:
    outer = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises ValueError / ExtraData / TypeError / ...
    raise ExportError(f"{where}: not a readable qgnn-jax export (truncated or corrupt: "
                      f"{type(e).__name__}: {e})") from None
  if not isinstance(outer, dict) or outer.get("format") != FORMAT:
    raise ExportError(f"{where}: not a qgnn-jax export (no format={FORMAT!r} header)")
  if outer.get("version") != VERSION:
    raise ExportError(f"{where}: export format version {outer.get('version')!r}; this "
                      f"qgnn-jax reads version {VERSION} (re-export it with "
                      f"`python -m experiments.export`)")
  body = outer.get("payload")
  if not isinstance(body, bytes) or hashlib.sha256(body).hexdigest() != outer.get("sha256"):
    raise ExportError(f"{where}: corrupt export (the payload's sha256 does not match its "
                      f"header)")
  try:
    payload = serialization.msgpack_restore(body)
    payload["meta"] = json.loads(payload["meta"])
  except Exception as e:
    raise ExportError(f"{where}: corrupt export payload ({type(e).__name__}: {e})") from None
  for k in ("params", "batch_stats", "sites"):
    payload.setdefault(k, {})
  return payload


