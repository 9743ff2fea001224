"""The ablation sweep's plan: which runs, with which config overrides (pure functions).

From an ablation config (experiments/configs/fashion_mnist_ablation*.py) to `Run`s: the FP
pretraining runs, the one-factor validation sweep points, and the main table's runs with
the sweep winners. Nothing here reads or writes files except `run_defaults` (imports the
base config module). Execution: `experiments.sweep_exec`; reports: `experiments.sweep_report`.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Dict, List, Sequence, Tuple

from qgnn_jax import quant


@dataclasses.dataclass(frozen=True)
class Run:
  """One experiments.run invocation: name (= workdir basename) and config overrides."""
  name: str
  overrides: Tuple[Tuple[str, str], ...]


def format_value(v) -> str:
  """A config value as a --config.field= override's text (floats round-trip exactly)."""
  return repr(v) if isinstance(v, float) else str(v)


def num_fp_seeds(cfg) -> int:
  """FP checkpoints to train: cfg.fp_seeds if > 0, else one per QAT seed.

  With fewer FP checkpoints than QAT seeds, QAT seed s starts from fp_s{s % fp_seeds}
  (the CPU protocol shares one FP model; seeds then vary the QAT data order and init).
  """
  fp_seeds = int(cfg.get("fp_seeds", 0))
  if fp_seeds < 0:
    raise ValueError(f"fp_seeds={fp_seeds}; valid: 0 (one per QAT seed) or a positive count")
  return fp_seeds if fp_seeds > 0 else max(parse_seeds(cfg.seeds).values())


def fp_runs(cfg) -> List[Run]:
  """The FP pretraining runs fp_s0, fp_s1, ... (evaluated on the test set)."""
  seeds = num_fp_seeds(cfg)
  return [Run(f"fp_s{s}", (("method", "fp"), ("seed", str(s)), ("num_epochs", format_value(cfg.fp_epochs)),
                          ("lr", format_value(cfg.fp_lr)), ("drop_path", format_value(cfg.fp_drop_path)),
                          ("eval_on", "test")))
          for s in range(seeds)]


def parse_seeds(spec: str) -> Dict[int, int]:
  """'4:2,2:3' -> {4: 2, 2: 3}."""
  return {int(b): int(n) for b, n in (item.split(":") for item in spec.split(","))}


def parse_sweeps(spec: str) -> List[Tuple[str, str, int, List[str]]]:
  """'lam:pq:4:2,3;...' -> [(field, method, bits, [values])]."""
  out = []
  for item in filter(None, spec.split(";")):
    field, method, bits, values = item.split(":")
    out.append((field, method, int(bits), values.split(",")))
  return out


def parse_fixed(spec: str) -> List[Tuple[str, str, str]]:
  """'lam:pq:2.5;quant_lr:n2uq:5e-5' -> [(field, method, value)]: settings chosen earlier.

  A config's `fixed` settings stand in for sweep winners that an earlier sweep or screen
  chose (e.g. on an earlier FP checkpoint): they apply to methods as winners do
  (`winner_applies`), per (field, method), so one field may take different values for
  different methods (LSQ's and N2UQ's step learning rates).
  """
  out = []
  for item in filter(None, spec.split(";")):
    parts = item.split(":")
    if len(parts) != 3 or not all(parts):
      raise ValueError(f"fixed setting {item!r}: expected 'field:method:value'")
    out.append(tuple(parts))
  return out


def qat_run(cfg, workdir: str, method: str, bits: int, seed: int, eval_on: str,
            extra: Sequence[Tuple[str, str]] = (), tag: str = "") -> Run:
  name = f"{method.replace('+', '_')}_w{bits}a{bits}_s{seed}{tag}"
  ov = [("method", method), ("w_bits", str(bits)), ("a_bits", str(bits)), ("seed", str(seed)),
        ("num_epochs", format_value(cfg.qat_epochs)), ("lr", format_value(cfg.qat_lr)),
        ("warmup_epochs", format_value(cfg.qat_warmup_epochs)), ("eval_on", eval_on),
        ("init_from", os.path.join(workdir, f"fp_s{seed % num_fp_seeds(cfg)}"))]
  return Run(name, tuple(ov) + tuple(extra))


def run_defaults(cfg) -> Dict[str, object]:
  """The run config every sweep point starts from: cfg.base_config's get_config() + cfg.run."""
  module = importlib.import_module(cfg.base_config.replace(os.sep, ".").removesuffix(".py"))
  base = module.get_config()
  base.update(cfg.run)
  return dict(base.items())


def _canonical(v: object) -> object:
  """A config value or its command-line text, in a form where equal settings compare equal."""
  if isinstance(v, bool) or str(v).strip().lower() in ("true", "false"):
    return str(v).strip().lower() == "true"
  try:
    return float(v)  # "5e-4" == "0.0005" == 5e-4
  except (TypeError, ValueError):
    return str(v)


def same_value(text: object, default: object) -> bool:
  """Whether a sweep value (as written in the config string) is the run's default."""
  return _canonical(text) == _canonical(default)


def sweep_runs(cfg, workdir: str) -> List[Tuple[str, str, Run]]:
  """(field, value, run) for every sweep point; seed 0, evaluated on validation.

  A point at the run's default value is one shared run per (method, bits), named
  `..._default`, whatever field it belongs to: it is trained once.
  """
  base = run_defaults(cfg)
  centre = {k: format_value(v) for k, v in cfg.get("sweep_centre", {}).items()}
  out = []
  for field, method, bits, values in parse_sweeps(cfg.sweeps):
    if field not in base:
      raise ValueError(f"sweep field {field!r} is not a run config field; valid: "
                       f"{sorted(base)}")
    # What the point trains with anyway: run config, the sweeps' centre, qat_run's settings.
    defaults = {**base, **centre,
                **dict(qat_run(cfg, workdir, method, bits, 0, "validation").overrides)}
    for v in values:
      if same_value(v, defaults[field]):
        run = qat_run(cfg, workdir, method, bits, 0, "validation", tuple(centre.items()),
                      tag="_default")
      else:
        extra = tuple(item for item in centre.items() if item[0] != field) + ((field, v),)
        run = qat_run(cfg, workdir, method, bits, 0, "validation", extra, tag=f"_{field}{v}")
      out.append((field, v, run))
  return out


def main_cells(cfg) -> List[Tuple[int, int]]:
  """(bits, seed) blocks of the main table in run order.

  cfg.main_order ('2:0,2:1,4:0,...') if set, and it must list every cell once; otherwise
  seed-major over cfg.bits (every method at every bit-width gets seed 0 before any gets
  seed 1), then W3A3 seed-major last. Either way a sweep cut short by its deadline still
  has whole rows.
  """
  seeds = parse_seeds(cfg.seeds)
  bits = [int(b) for b in cfg.bits.split(",")]
  if 3 in bits:
    raise ValueError(f"bits={cfg.bits!r}: W3A3 is set by seeds '3:n' and w3_methods, not bits")
  if missing := [b for b in bits if b not in seeds]:
    raise ValueError(f"bits {missing} have no seed count in seeds={cfg.seeds!r}")
  cells = [(b, s) for s in range(max(seeds[b] for b in bits)) for b in bits if s < seeds[b]]
  if 3 in seeds:
    cells += [(3, s) for s in range(seeds[3])]
  if cfg.get("main_order"):
    try:
      order = [tuple(int(v) for v in item.split(":")) for item in cfg.main_order.split(",")]
    except ValueError:
      order = None
    if order is None or sorted(order) != sorted(cells):
      raise ValueError(f"main_order={cfg.main_order!r} must list each (bits:seed) cell once: "
                       f"{sorted(cells)}")
    cells = order
  return cells


# Grid fields are read by both range quantizers: a winner found with pq also sets min-max's
# grid, so that claim (1) compares range estimators on one grid. LSQ has its own signed grid.
GRID_FIELDS = frozenset({"w_symmetric", "a_symmetric", "w_granularity", "a_granularity"})
# The registry entries whose grid comes from a data range (the grid fields apply to them).
RANGE_QUANTIZERS = frozenset(n for n in quant.QUANTIZERS.names()
                             if quant.QUANTIZERS.get(n).tracks_range)


def winner_applies(swept: Sequence[Tuple[str, str]], field: str, method: str) -> bool:
  """Whether a sweep winner for `field` is a setting of `method`; swept: (field, method) pairs.

  A field swept with method M (e.g. aqd_alpha with pq+aqd) belongs to every method that has
  all of M's parts (pq+aqd, pq+aqd+sqd), not to the others: a minmax run is not redone
  because AQD's alpha changed. Grid fields (GRID_FIELDS) count the range quantizers (min-max, pq) as one part.
  """
  parts = set(method.split("+"))
  if field in GRID_FIELDS and parts & RANGE_QUANTIZERS:
    parts |= RANGE_QUANTIZERS
  return any(f == field and set(m.split("+")) <= parts for f, m in swept)


def main_runs(cfg, workdir: str, winners: Dict[str, str]) -> List[Run]:
  """The main table's runs, in main_cells order, each with the sweep winners it uses.

  cfg.fixed settings (parse_fixed) apply like winners and take precedence over them.
  """
  swept = [(f, m) for f, m, _, _ in parse_sweeps(cfg.sweeps)]
  fixed = parse_fixed(cfg.get("fixed", ""))
  runs = []
  for bits, s in main_cells(cfg):
    methods = cfg.w3_methods.split(",") if bits == 3 else cfg.methods.split(",")
    for method in methods:
      chosen = {k: v for k, v in winners.items() if winner_applies(swept, k, method)}
      chosen.update({k: v for k, m, v in fixed if winner_applies([(k, m)], k, method)})
      extra = tuple(chosen.items())
      runs.append(qat_run(cfg, workdir, method, bits, s, "test", extra))
  return runs


def run_settings(cfg, run: Run) -> Dict[str, object]:
  """Every config override a run is started with: cfg.run, then the run's own overrides."""
  return {**dict(cfg.run.items()), **dict(run.overrides)}


