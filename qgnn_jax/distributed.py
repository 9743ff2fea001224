"""Multi-process runs on JAX's distributed runtime (docs/METHOD.md, "Training
infrastructure"): start-up, topology, failure.

A multi-host job (a TPU pod slice, a multi-node GPU job, or several processes on one
machine) is one process per host under JAX's multi-controller runtime. Each process
calls :func:`initialize` before any JAX computation; then ``jax.pmap`` runs over the
process's local devices and its collectives (``pmean`` / ``psum``) span every device
of every process. Data parallelism: the global batch B is split over the P processes
(:mod:`qgnn_jax.data.sharding`), each reads only its shard.

When to initialize (:func:`should_initialize`):

* explicit ``coordinator_address`` + ``num_processes`` + ``process_id`` (launch by hand);
* ``mode="auto"`` (the default) and a multi-process cluster environment: SLURM (``srun``
  with ``SLURM_NTASKS > 1``), Open MPI (``mpirun -np N``, N > 1), or a Cloud TPU pod
  slice whose worker host list (``TPU_WORKER_HOSTNAMES`` / ``TPU_PROCESS_ADDRESSES``)
  names more than one host; JAX then finds the coordinator and the process ids itself;
* ``mode="on"``: always (JAX's own detection, e.g. on a TPU VM that sets no host list);
* ``mode="off"``: never.

Failure: a dead peer makes the next collective fail at once (gloo: "Connection closed
by peer") or, while no collective runs, the coordination service's heartbeat
(``heartbeat_timeout_s``) terminates the survivors; :func:`exit_on_error` turns the
first case into one clear message and exit status 1, without waiting for the
distributed shutdown barrier that can no longer complete.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
import traceback
from typing import Any, Mapping, Optional

import numpy as np

MODES = ("auto", "on", "off")
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
              "SLURM_LOCALID")
_TPU_HOST_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")


@dataclasses.dataclass(frozen=True)
class Topology:
  """Where this process stands: index in ``[0, count)``, its local and the global devices."""
  process_index: int
  process_count: int
  local_devices: int
  global_devices: int

  @property
  def is_main(self) -> bool:
    return self.process_index == 0


def _int(environ: Mapping[str, str], name: str, default: int = 0) -> int:
  try:
    return int(environ.get(name, default))
  except ValueError:
    return default


def detect_cluster(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
  """The multi-process cluster this process runs in, from its environment, or None.

  Returns ``"slurm"`` (all of :data:`SLURM_VARS` set, ``SLURM_NTASKS > 1``: a step
  launched by ``srun``), ``"ompi"`` (``mpirun`` with more than one rank), ``"tpu"`` (a TPU
  host list of more than one host), or None (single process). Reads only the
  environment: no network, no JAX.
  """
  env = os.environ if environ is None else environ
  if all(v in env for v in SLURM_VARS) and _int(env, "SLURM_NTASKS", 1) > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in env and _int(env, "OMPI_COMM_WORLD_SIZE", 1) > 1:
    return "ompi"
  for var in _TPU_HOST_VARS:
    hosts = [h for h in env.get(var, "").split(",") if h.strip()]
    if len(hosts) > 1:
      return "tpu"
  return None


def _check_address(address: str) -> None:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
    raise ValueError(f"coordinator_address={address!r} must be HOST:PORT with a port in "
                     f"[1, 65535] (e.g. 127.0.0.1:12345, or process 0's host name)")


def should_initialize(mode: str = "auto", coordinator_address: Optional[str] = None,
                      num_processes: Optional[int] = None, process_id: Optional[int] = None,
                      environ: Optional[Mapping[str, str]] = None) -> bool:
  """Whether to call ``jax.distributed.initialize`` (pure; validates the arguments).

  Raises:
    ValueError: an unknown mode, explicit arguments with ``mode="off"``, an incomplete
      or malformed explicit set (a bad address, ``num_processes < 1``, ``process_id``
      outside ``[0, num_processes)``).
  """
  if mode not in MODES:
    raise ValueError(f"distributed mode {mode!r}; valid: {', '.join(MODES)}")
  explicit = [a is not None for a in (coordinator_address, num_processes, process_id)]
  if any(explicit):
    if mode == "off":
      raise ValueError("distributed mode 'off' with --coordinator_address / --num_processes / "
                       "--process_id; drop one or the other")
    if not all(explicit):
      raise ValueError(
          f"launching by hand needs all of coordinator_address, num_processes and process_id; "
          f"got coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
          f"process_id={process_id!r}")
    _check_address(coordinator_address)
    if num_processes < 1:
      raise ValueError(f"num_processes={num_processes} must be >= 1")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id={process_id} must be in [0, {num_processes})")
    return True
  if mode == "on":
    return True
  return mode == "auto" and detect_cluster(environ) is not None


def initialize(mode: str = "auto", coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None, process_id: Optional[int] = None, *,
               heartbeat_timeout_s: int = 100, init_timeout_s: int = 300,
               cpu_collectives: str = "gloo",
               environ: Optional[Mapping[str, str]] = None,
               progress_every_s: Optional[float] = None) -> Topology:
  """Joins the distributed runtime when :func:`should_initialize` says so; the topology.

  Call it before any JAX computation. On CPU, cross-process collectives need an
  implementation (``cpu_collectives``: ``"gloo"``, or ``"mpi"``); it is set before JAX's
  backends start and is ignored by GPU / TPU backends.

  Args:
    heartbeat_timeout_s: seconds without a heartbeat after which the coordination
      service declares a process dead and stops the others (``>= 1``).
    init_timeout_s: seconds to wait for every process to join (``>= 1``); a progress line
      every ``progress_every_s`` seconds meanwhile (default: a fifth of the timeout, at most
      30 s), and at the deadline one line naming the processes that did not join and exit
      status 1.
  """
  if heartbeat_timeout_s < 1 or init_timeout_s < 1:
    raise ValueError(f"heartbeat_timeout_s={heartbeat_timeout_s} and "
                     f"init_timeout_s={init_timeout_s} must be >= 1")
  import jax  # pylint: disable=g-import-not-at-top
  if should_initialize(mode, coordinator_address, num_processes, process_id, environ):
    if cpu_collectives:
      jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    joined = threading.Event()
    threading.Thread(target=_join_watchdog, daemon=True, args=(
        joined, coordinator_address, num_processes, process_id, init_timeout_s,
        progress_every_s or min(30.0, init_timeout_s / 5), sys.stderr)).start()
    try:
      # JAX's own deadline later than the watchdog's: JAX ends a failed join with SIGABRT
      # and a C++ stack trace, the watchdog with one line.
      jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                 initialization_timeout=int(init_timeout_s) + _JAX_GRACE_S,
                                 heartbeat_timeout_seconds=int(heartbeat_timeout_s))
    finally:
      joined.set()
  return topology()


_JAX_GRACE_S = 30


def _join_watchdog(joined: threading.Event, address: Optional[str], count: Optional[int],
                   index: Optional[int], timeout_s: float, every_s: float, stream) -> None:
  """While jax.distributed.initialize waits for the other processes (it releases the GIL):
  a progress line every `every_s` seconds; at `timeout_s`, one line saying who is missing and
  exit status 1 (os._exit: the runtime's shutdown would wait for the missing processes)."""
  me = f"process {index} of {count}" if index is not None else "this process"
  where = f"the coordinator {address}" if address else "the cluster's coordinator"
  t0 = time.monotonic()
  while not joined.wait(min(every_s, max(0.0, timeout_s - (time.monotonic() - t0)))):
    waited = time.monotonic() - t0
    if waited >= timeout_s:
      if index == 0 and count:
        missing = (f"process 1 of {count}" if count == 2 else
                   f"one or more of processes 1-{count - 1}")
        why = f"{missing} never joined {where}"
      else:
        why = f"{where} (process 0) never answered, or another process never joined"
      print(f"error: {me}: {why} within --distributed_init_timeout_s={timeout_s:g} s; start "
            f"every process with the same --coordinator_address and --num_processes (and "
            f"its own --process_id)", file=stream, flush=True)
      os._exit(1)  # pylint: disable=protected-access
    print(f"qgnn_jax: {me} waiting for every process to join {where} ({waited:.0f} of "
          f"{timeout_s:g} s)", file=stream, flush=True)


def topology() -> Topology:
  """This process's :class:`Topology` (1 process when the runtime was not initialized)."""
  import jax  # pylint: disable=g-import-not-at-top
  return Topology(jax.process_index(), jax.process_count(), jax.local_device_count(),
                  jax.device_count())


def is_main_process() -> bool:
  """Whether this process writes the run's files (logs, results): process 0."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def allgather(x: Any) -> np.ndarray:
  """Every process's ``x`` ``(K, ...)`` concatenated in process order: ``(P K, ...)``.

  The identity (as numpy) in a single-process run. Every process must call it.
  """
  import jax  # pylint: disable=g-import-not-at-top
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def exit_on_error(exc: BaseException, stream=None, verbose: bool = False) -> None:
  """In a multi-process run: reports ``exc`` on one line per fact and exits with status 1
  (the traceback first when ``verbose``).

  Skips the distributed shutdown (``os._exit``), whose barrier waits for processes
  that may be dead and would end in an abort after ``heartbeat_timeout_s``. Returns
  without doing anything in a single-process run (the caller re-raises).
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return
  stream = stream or sys.stderr
  msg = f"{type(exc).__name__}: {exc}"
  peer = any(s in msg for s in ("Connection closed", "Connection reset", "Gloo", "heartbeat",
                                "UNAVAILABLE", "coordination service"))
  if not verbose:  # gloo's and the coordination service's messages run on for lines
    msg = msg.strip().splitlines()[0]
  if verbose:
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=stream)
  print(f"qgnn_jax: process {jax.process_index()} of {jax.process_count()} stops: {msg}",
        file=stream)
  if peer:
    print("qgnn_jax: a collective with the other processes failed: another process has most "
          "likely died or been killed (see its log); this one exits too. Restart all "
          "processes with the same workdir to resume from the last checkpoint.", file=stream)
  stream.flush()
  sys.stdout.flush()
  os._exit(1)  # pylint: disable=protected-access
