"""Each checkpoint step's files with their sizes and SHA-256s (`checksums.json`), written once
the step is final and verified before it is read."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, List, Optional

from qgnn_jax.checkpoint.errors import CorruptCheckpointError, short_error

CHECKSUMS = "checksums.json"  # in each step folder: {relative path: [bytes, sha256 hex]}


def _file_digests(step_dir: str) -> Dict[str, List[Any]]:
  """{path relative to step_dir: [bytes, sha256 hex]} of every file but the checksums."""
  out: Dict[str, List[Any]] = {}
  for root, _, names in os.walk(step_dir):
    for name in names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, step_dir)
      if rel == CHECKSUMS or rel.startswith(CHECKSUMS + "."):
        continue
      digest = hashlib.sha256()
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          digest.update(chunk)
      out[rel] = [os.path.getsize(path), digest.hexdigest()]
  return dict(sorted(out.items()))


def write_checksums(step_dir: str) -> None:
  """Writes step_dir/checksums.json (size and SHA-256 of each file) whole or not at all."""
  tmp = os.path.join(step_dir, f"{CHECKSUMS}.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(_file_digests(step_dir), f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, CHECKSUMS))


def verify_checksums(step_dir: str) -> Optional[bool]:
  """Checks the files of a step against its checksums.json.

  Returns True when they match, None when the step has no checksums (saved by older code,
  or killed before they were written: read unverified).
  Raises:
    CorruptCheckpointError: naming the first file that is missing, has another size or
      another SHA-256 than at save, or the checksums file itself when unreadable.
  """
  path = os.path.join(step_dir, CHECKSUMS)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      want = json.load(f)
  except (OSError, ValueError) as e:
    raise CorruptCheckpointError(f"{path} is unreadable ({short_error(e)})") from e
  have = _file_digests(step_dir)
  for rel, (size, sha) in want.items():
    if rel not in have:
      raise CorruptCheckpointError(f"{step_dir}: {rel} is missing (it was written at save)")
    got_size, got_sha = have[rel]
    if got_size != size:
      raise CorruptCheckpointError(f"{step_dir}: {rel} has {got_size} bytes, {size} at save "
                                   f"(truncated or overwritten)")
    if got_sha != sha:
      raise CorruptCheckpointError(f"{step_dir}: {rel} fails its SHA-256 checksum (its "
                                   f"bytes changed after the save)")
  return True
