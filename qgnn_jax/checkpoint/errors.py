"""What goes wrong with a checkpoint, as exceptions with one-line messages."""
from __future__ import annotations

import re

_ERROR_CHARS = 300  # how much of a library's own error message is quoted


class CheckpointError(ValueError):
  """A checkpoint is missing, corrupt, or does not match the expected state."""


class CorruptCheckpointError(CheckpointError):
  """A checkpoint step exists but cannot be read (truncated, deleted files, bad metadata)."""


class CheckpointWriteError(CheckpointError):
  """A checkpoint could not be written (a full disk, ...); the kept ones are intact."""


class IncompatibleCheckpointError(CheckpointError):
  """A readable checkpoint whose tree differs from the expected state (another model)."""


class NonFiniteStateError(FloatingPointError):
  """The training state holds NaN / Inf; it was not saved."""


def short_error(e: BaseException) -> str:
  """`Type: first line of the message`, at most _ERROR_CHARS characters (no dumps).

  TensorStore's messages chain every layer ("Error opening ...: Error reading ... of local
  file "F": reason [tensorstore_spec='{...}']"); they read as "CODE: F: reason" instead (the
  innermost file and why), without the JSON spec or source locations.
  """
  lines = str(e).strip().splitlines()
  first = lines[0] if lines else ""
  first = re.sub(r"\s*\[(tensorstore_spec|source locations)=.*$", "", first).strip()
  files = re.findall(r'local file "([^"]+)"', first)
  if files:
    code, reason = re.match(r"([A-Z_]+): ", first), first.rsplit('": ', 1)[-1]
    first = f"{code.group(1) + ': ' if code else ''}{files[-1]}: {reason}"
  if len(first) > _ERROR_CHARS:
    first = first[:_ERROR_CHARS] + " ..."
  return f"{type(e).__name__}: {first}"
