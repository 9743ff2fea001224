"""The results schema (docs/METHOD.md, "Results", plus provenance): one home for what a
run reports.

`results.json` (written by `qgnn_jax.experiment` at the end of a run) holds exactly
:data:`RESULT_KEYS`; the ablation's CSV (`experiments.sweep_report`) has the columns
:data:`CSV_FIELDS` (the run's name, then the same keys). Both read these tuples, so a key
added here appears in both.

Provenance (:func:`provenance`): the library versions, the devices, the git commit of
the code (None outside a git checkout) and the SHA-256 of the run-defining config
fields (`qgnn_jax.run_config.config_sha256`), so a number can be traced to what made it.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
from typing import Any, Dict, Optional, Sequence, Tuple

# The keys every run reports, in order (docs/METHOD.md, "Results").
REQUIRED_KEYS: Tuple[str, ...] = (
    "dataset", "model", "method", "w_bits", "a_bits", "seed", "top1", "fp_top1", "train_steps",
    "train_seconds", "params", "model_bytes_fp32", "model_bytes_quantized")
# What top1 was measured on: eval_split is "test" or "validation"; eval_loss the mean CE there.
EVAL_KEYS: Tuple[str, ...] = ("eval_split", "eval_loss")
# Where and when: versions, devices, code and config identity, wall-clock start / end (UTC,
# ISO 8601; started_at is the run's first start, kept across restarts).
# data_source: what the images were read from (the IDX folder, tfds's data dir, sklearn);
# config_changes: what --allow_config_change let through ([{step, field, old, new}], [] none).
PROVENANCE_KEYS: Tuple[str, ...] = (
    "jax_version", "flax_version", "device_kind", "device_count", "process_count", "git_commit",
    "config_sha256", "data_source", "config_changes", "started_at", "finished_at")
RESULT_KEYS: Tuple[str, ...] = REQUIRED_KEYS + EVAL_KEYS + PROVENANCE_KEYS
# The ablation CSV: the run's name (its workdir's basename), then every result key.
CSV_FIELDS: Tuple[str, ...] = ("run",) + RESULT_KEYS

RESULTS_FILE = "results.json"
EVAL_FILE = "eval.json"


def utc_now() -> str:
  """The current time, UTC, ISO 8601 to the second (e.g. '2026-11-27T08:46:00+00:00')."""
  return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def git_commit(path: Optional[str] = None) -> Optional[str]:
  """The HEAD commit (40 hex digits) of the git checkout holding `path` (default: this
  package), with '+dirty' appended when tracked files differ from it; None outside a
  checkout or without git."""
  path = path or os.path.dirname(os.path.abspath(__file__))
  try:
    head = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True,
                          text=True, timeout=10)
    if head.returncode != 0:
      return None
    dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return None
  return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip()
                                else "")


def provenance(config_sha256: str, data_source: Optional[str] = None) -> Dict[str, Any]:
  """The PROVENANCE_KEYS known at the start of a run, except started_at / finished_at."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  return {"jax_version": jax.__version__, "flax_version": flax.__version__,
          "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
          "process_count": jax.process_count(), "git_commit": git_commit(),
          "config_sha256": config_sha256, "data_source": data_source}


def check_results(results: Dict[str, Any]) -> None:
  """ValueError unless `results` has exactly RESULT_KEYS (naming the missing / extra ones)."""
  missing, extra = set(RESULT_KEYS) - set(results), set(results) - set(RESULT_KEYS)
  if missing or extra:
    raise ValueError(f"results keys differ from qgnn_jax.results.RESULT_KEYS: missing "
                     f"{sorted(missing)}, extra {sorted(extra)}")


NON_FINITE_KEY = "non_finite"


def strict(obj: Any) -> Any:
  """`obj` with every NaN / Infinity float replaced by None (JSON's null), and, when there was
  one, a top-level "non_finite" list naming where ("eval_loss", "a/b/0"); Python's json
  would write the bare tokens NaN / Infinity, which strict JSON readers reject."""
  where = []

  def walk(x, path):
    if isinstance(x, float) and not math.isfinite(x):
      where.append("/".join(path))
      return None
    if isinstance(x, dict):
      return {k: walk(v, path + (str(k),)) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [walk(v, path + (str(i),)) for i, v in enumerate(x)]
    return x

  out = walk(obj, ())
  if where and isinstance(out, dict):
    out[NON_FINITE_KEY] = where
  return out


def dumps(obj: Any, **kwargs) -> str:
  """Strict JSON text of `obj` (:func:`strict`; never NaN / Infinity tokens)."""
  return json.dumps(strict(obj), allow_nan=False, **kwargs)


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes `obj` as indented strict JSON (:func:`strict`) to `path` whole or not at all
  (temp file + rename)."""
  tmp = f"{path}.tmp"
  text = dumps(obj, indent=2)
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_results(workdir: str) -> Optional[Dict[str, Any]]:
  """The workdir's results.json as a dict, or None when the run has not finished."""
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def summary_table(rows: Sequence[Tuple[str, Dict[str, Any]]]) -> str:
  """Markdown table of (run name, results dict) rows: method, bits, top-1 and its split,
  size, train time."""
  head = ("| run | method | W/A bits | top-1 | split | params | size fp32 | size quantized "
          "| train s |")
  lines = [head, "|---|---|---|---|---|---|---|---|---|"]
  for name, r in rows:
    bits = "-" if r["w_bits"] is None else f"{r['w_bits']}/{r['a_bits']}"
    lines.append(f"| {name} | {r['method']} | {bits} | {100 * r['top1']:.2f}% | "
                 f"{r.get('eval_split', '-')} | {r['params']:,} | "
                 f"{r['model_bytes_fp32'] / 1024:.0f} KiB | "
                 f"{r['model_bytes_quantized'] / 1024:.0f} KiB | {r['train_seconds']:.0f} |")
  return "\n".join(lines)
