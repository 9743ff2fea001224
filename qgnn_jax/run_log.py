"""What a run logs: `metrics.jsonl`, TensorBoard event files, and the training-curve plot.

Every logged record (one step's training metrics, or one evaluation) goes to both
`<workdir>/metrics.jsonl` (one JSON object per line) and TensorBoard scalars under
`<workdir>/tensorboard` (tag `<split>/<metric>`, e.g. `train/loss`, `test/top1`), written
with tensorboardX (no TensorFlow import). On resume from step K, :func:`truncate_metrics`
drops the lines past K (and any final evaluation) so each step appears once, and the
TensorBoard writer purges the events past K. :func:`plot_curves` draws loss and top-1 by
step from metrics.jsonl.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List

import numpy as np

from qgnn_jax import results as results_lib

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CURVES_FILE = "curves.png"


def _plain(v: Any) -> Any:
  """numpy / jax scalars -> Python floats (JSON-able); other values unchanged."""
  if isinstance(v, (np.floating, np.integer)) or type(v).__module__.startswith("jax"):
    return float(v)
  return v


def _parse(lines: List[str]) -> List[Dict[str, Any]]:
  records = []
  for line in lines:
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:  # a write cut off by a kill: it and anything after go
      break
  return records


def _lines(path: str) -> List[str]:
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return f.readlines()


def read_metrics(path: str) -> List[Dict[str, Any]]:
  """The records of a metrics.jsonl, in order; a cut-off last line (a killed write) is
  left out."""
  return _parse(_lines(path))


def truncate_metrics(path: str, step: int) -> int:
  """Keeps the records of steps <= `step` that are not a final evaluation (atomically);
  returns how many lines were dropped."""
  lines = _lines(path)
  keep = [r for r in _parse(lines) if r.get("step", 0) <= step and not r.get("final")]
  if len(keep) < len(lines):
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(results_lib.dumps(r) + "\n" for r in keep)
    os.replace(tmp, path)
  return len(lines) - len(keep)


class MetricsWriter:
  """Appends records to workdir/metrics.jsonl (flushed each write) and TensorBoard.

  Args:
    workdir: the run's workdir.
    enabled: False (processes other than 0 of a multi-process run) writes nothing.
    resume_step: the step the run resumes from (0 for a fresh run): TensorBoard events
      past it, from a run that was killed, are purged.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
    self._f, self._tb = None, None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._f = open(os.path.join(workdir, METRICS_FILE), "a", encoding="utf-8")
      self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR),
                               purge_step=(resume_step + 1) if resume_step else None)

  def write(self, record: Dict[str, Any]) -> None:
    """record: {"step": int, "split": "train" | "test" | "validation", metric: number, ...}."""
    if self._f is None:
      return
    record = {k: _plain(v) for k, v in record.items()}
    self._f.write(results_lib.dumps(record) + "\n")  # strict: NaN -> null + "non_finite"
    self._f.flush()
    for k, v in record.items():
      if k not in ("step", "epoch", "split", "final") and isinstance(v, (int, float)):
        self._tb.add_scalar(f"{record['split']}/{k}", v, record["step"])
    self._tb.flush()

  def close(self) -> None:
    if self._f is not None:
      self._f.close()
      self._tb.close()
      self._f = self._tb = None


def plot_curves(metrics_path: str, out_path: str, title: str = "") -> bool:
  """Loss and top-1 by step (train, and each evaluated split) from metrics.jsonl, as a PNG.

  Returns False (and writes nothing) when there is nothing to plot.
  """
  records = read_metrics(metrics_path)
  if not records:
    return False
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, metric in zip(axes, ("loss", "top1")):
    for split in dict.fromkeys(r["split"] for r in records):
      pts = [(r["step"], r[metric]) for r in records
             if r["split"] == split and r.get(metric) is not None]
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="" if split == "train" else "o", label=split)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
  return True
