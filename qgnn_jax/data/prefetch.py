"""A generic background-thread prefetcher for plain Python iterators (the tf.data streams).

The in-memory pipeline prefetches with grain (:func:`qgnn_jax.data.pipeline.iterate`);
this one serves iterators grain does not build.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Dict, Iterator

from qgnn_jax.data import sharding

_END = object()


class _Raised:
  def __init__(self, exc: BaseException):
    self.exc = exc


def prefetch(iterator: Iterator[Any], size: int = 2, device_put: bool = True,
             axis_name: str = "batch") -> Iterator[Any]:
  """Runs ``iterator`` in a background thread, keeping ``size`` batches ready.

  With ``device_put`` every leaf (leading axis D = device count of the batch) is
  placed on the first D local devices, sharded along that axis (the layout
  ``jax.pmap`` uses; :func:`qgnn_jax.data.sharding.put_local`), so the step does not
  wait for host-to-device copies. An exception in the worker is re-raised by the
  consumer's ``next``; closing or dropping the returned generator stops the worker.
  """
  if size < 1:
    raise ValueError(f"prefetch size={size} must be >= 1")
  q: "queue.Queue[Any]" = queue.Queue(maxsize=size)
  stop = threading.Event()

  def offer(item) -> bool:
    while not stop.is_set():
      try:
        q.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def work():
    shardings: Dict[int, Any] = {}
    try:
      for item in iterator:
        if device_put:
          item = sharding.put_local(item, axis_name, shardings)
        if not offer(item):
          return
      offer(_END)
    except BaseException as e:  # pylint: disable=broad-except
      offer(_Raised(e))

  thread = threading.Thread(target=work, name="qgnn-prefetch", daemon=True)
  thread.start()

  def gen() -> Iterator[Any]:
    try:
      while True:
        item = q.get()
        if item is _END:
          return
        if isinstance(item, _Raised):
          raise item.exc
        yield item
    finally:
      stop.set()

  return gen()
