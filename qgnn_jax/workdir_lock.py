"""One run per workdir: an exclusive lock on `<workdir>/run.lock` while a run writes there.

Two `experiments.run` on one workdir would interleave metrics.jsonl and race on the
checkpoints. The lock is an `flock` on the file (the kernel drops it when its process dies,
kill -9 included, so a dead run's lock is taken over by the next one, with a note); the file
holds the holder's pid, host and start time, which a refused run names. The lock is
advisory: only qgnn_jax's own runs respect it. On a file system without `flock` (ENOLCK),
the recorded pid decides: a lock whose pid no longer runs on this host is taken over.

No jax import: the lock is taken before the heavy set-up, and a test can hold it from a
bare subprocess.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from typing import Any, Dict, Iterator, Optional

LOCK_FILE = "run.lock"


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir's lock; the message names its pid and host."""


def _holder(fd: int) -> Dict[str, Any]:
  """The JSON a lock file holds ({} when empty or unreadable: a holder mid-write)."""
  os.lseek(fd, 0, os.SEEK_SET)
  raw = os.read(fd, 4096)
  try:
    out = json.loads(raw.decode("utf-8")) if raw.strip() else {}
  except (ValueError, UnicodeDecodeError):
    return {}
  return out if isinstance(out, dict) else {}


def _describe(holder: Dict[str, Any]) -> str:
  if not holder:
    return "a run that has not yet written its pid"
  return (f"pid {holder.get('pid')} on host {holder.get('host')} (since "
          f"{holder.get('started_at', '?')})")


def pid_alive(pid: int) -> bool:
  """Whether a process `pid` exists on this host (one of another user's counts)."""
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _locked_error(workdir: str, holder: Dict[str, Any]) -> WorkdirLockedError:
  return WorkdirLockedError(
      f"{workdir} is in use by another run: {_describe(holder)} holds "
      f"{os.path.join(workdir, LOCK_FILE)}; wait for it to end or stop it, or use another "
      f"--workdir")


def acquire(workdir: str) -> tuple:
  """Takes the lock of `workdir` (which must exist).

  Returns:
    (fd, previous): the open lock file to pass to :func:`release`, and the record of a
    dead holder whose lock was taken over (None when the lock was free).
  Raises:
    WorkdirLockedError: a live run holds it.
  """
  path = os.path.join(workdir, LOCK_FILE)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _holder(fd)
      os.close(fd)
      raise _locked_error(workdir, holder) from None
    except OSError as e:
      if e.errno != errno.ENOLCK:
        os.close(fd)
        raise
      holder = _holder(fd)  # no flock here: the recorded pid decides
      if (holder.get("host") == socket.gethostname() and holder.get("pid") != os.getpid()
          and pid_alive(holder.get("pid", 0))) or (
              holder and holder.get("host") != socket.gethostname()):
        os.close(fd)
        raise _locked_error(workdir, holder) from None
    # A holder that released (and unlinked the file) between our open and flock leaves us
    # a lock on a file no longer at `path`: open again.
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if not same:
      os.close(fd)
      continue
    previous = _holder(fd) or None  # a record left behind: its run died holding the lock
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started_at": datetime.datetime.now(datetime.timezone.utc).replace(
                  microsecond=0).isoformat()}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(record).encode("utf-8"))
    os.fsync(fd)
    return fd, previous


def release(fd: int, workdir: str) -> None:
  """Removes the lock file, then drops the lock (in that order: a waiting run then opens a
  new file rather than locking the removed one)."""
  with contextlib.suppress(FileNotFoundError):
    os.remove(os.path.join(workdir, LOCK_FILE))
  os.close(fd)


@contextlib.contextmanager
def hold(workdir: str, enabled: bool = True, notify=None) -> Iterator[Optional[int]]:
  """The lock of `workdir` while the block runs (nothing when not enabled: processes other
  than 0 of a multi-process run, whose process 0 holds it). `notify(line)` is told of a
  dead run's lock taken over."""
  if not enabled:
    yield None
    return
  fd, previous = acquire(workdir)
  if previous and notify is not None:
    notify(f"{workdir}: took over the lock of {_describe(previous)}, which no longer runs")
  try:
    yield fd
  finally:
    release(fd, workdir)
