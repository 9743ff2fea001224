"""How many of its 2^b codes each activation quantizer uses (issue 15: LSQ's grids).

Two measurements, both printed as Markdown and written as CSV:

* synthetic: 10^6 samples of GELU(N(0, 1)) (what Grapher / FFN fc2 read), quantized at
  A2 / A4 with LSQ's signed, unsigned and LSQ+ offset grids at their initialisations
  (LSQ: s0 = 2 mean|x| / sqrt(Q_P); LSQ+: beta0 = min x, s0 by MSE), and PQ (lam 2.5);
* model: `vig_tiny_28` on Fashion-MNIST test images, every quantized activation site,
  either from the FP checkpoint with LSQ initialised from one training batch as QAT
  starts (``--fp``), or from a trained QAT run's checkpoint (``--workdir``).

A code counts as used when at least 1 % of a site's inputs fall on it; the entropy of the
code histogram (bits) is reported too.

    python -m experiments.code_usage --fp runs/ablation_cpu/fp_s0 --bits 2,4 \
        --grids signed,offset,unsigned --out experiments/results/fashion_mnist/code_usage.csv
    python -m experiments.code_usage --workdir runs/lsq15/lsq_w2a2_s0 --out ...
"""
from __future__ import annotations

import csv
import dataclasses
import os
from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from qgnn_jax import quant, recipe
from qgnn_jax import checkpoint as ckpt
from qgnn_jax import data as data_lib
from qgnn_jax.qat import model as qat_model
from qgnn_jax.quant.lsq import LSQ

flags.DEFINE_string("fp", "", "FP run workdir: LSQ initialised from one train batch.")
flags.DEFINE_string("workdir", "", "A trained QAT run's workdir (its config and checkpoint).")
flags.DEFINE_string("bits", "2,4", "Activation bit-widths (with --fp).")
flags.DEFINE_string("grids", "signed,offset,unsigned", "lsq_gelu_grid values (with --fp).")
flags.DEFINE_integer("images", 500, "Test images the codes are counted on.")
flags.DEFINE_string("out", "", "CSV to write (appended rows); '' = print only.")
flags.DEFINE_boolean("synthetic", True, "Also the GELU(N(0,1)) table.")
FLAGS = flags.FLAGS

USED_SHARE = 0.01
FIELDS = ("source", "grid", "a_bits", "site", "input", "codes_used", "codes_hit", "levels",
          "entropy_bits", "min_input", "frac_below_zero")


def histogram_stats(codes: np.ndarray, levels: int) -> Dict[str, float]:
  counts = np.bincount(codes.reshape(-1), minlength=levels)[:levels].astype(np.float64)
  p = counts / max(counts.sum(), 1.0)
  nz = p[p > 0]
  return {"codes_used": int(np.sum(p >= USED_SHARE)), "codes_hit": int(np.sum(p > 0)),
          "levels": levels, "entropy_bits": float(-(nz * np.log2(nz)).sum())}


def synthetic_rows(bits_list: List[int]) -> List[Dict]:
  x = jax.nn.gelu(jnp.asarray(np.random.default_rng(0).standard_normal(1_000_000),
                              jnp.float32), approximate=False)
  rows = []
  for bits in bits_list:
    cases = {"signed": quant.lsq_range(quant.lsq_init_step(x, bits, True), bits, True),
             "unsigned": quant.lsq_range(quant.lsq_init_step(x, bits, False), bits, False)}
    s, beta = quant.lsq_plus_init(x, bits)
    cases["offset"] = quant.lsq_range(s, bits, False, offset=beta)
    cases["pq"] = quant.pauta_range(x, lam=2.5)
    for grid, (lo, hi) in cases.items():
      codes, _, _ = quant.quantize_int(x, bits, lo, hi)
      rows.append({"source": "GELU(N(0,1))", "grid": grid, "a_bits": bits, "site": "-",
                   "input": "gelu", **histogram_stats(np.asarray(codes), 2 ** bits),
                   "min_input": float(x.min()), "frac_below_zero": float(np.mean(x < 0))})
  return rows


class _Recorder(LSQ):
  """LSQ that also records each activation site's integer codes (eager apply only)."""

  def __init__(self, sink):
    self.sink = sink

  def quantize(self, x, spec, state):
    if spec.role == "act":
      path = "/".join(map(str, qat_model._current_module().path))  # pylint: disable=protected-access
      codes, _, _ = self.integer(x, spec, state)
      self.sink.setdefault(path, []).append((np.asarray(codes), float(jnp.min(x)),
                                             float(jnp.mean(x < 0)), spec.grid))
    return super().quantize(x, spec, state)


def _images(config, split: str, n: int) -> np.ndarray:
  splits = data_lib.load_splits(config.dataset, config.data_dir or None, 0)
  x = splits["train" if split == "train" else "eval"][0][:n]
  return np.asarray(data_lib.normalize(x, splits["info"]), np.float32)


def model_rows(config, variables, source: str, calibrate: bool) -> List[Dict]:
  sink: Dict[str, list] = {}
  rec = _Recorder(sink)
  rules = tuple(dataclasses.replace(r, a_quantizer=rec) for r in recipe.quant_rules(config))
  from qgnn_jax import qat  # pylint: disable=g-import-not-at-top
  from qgnn_jax.models import create_model  # pylint: disable=g-import-not-at-top
  model = qat.quantize_model(create_model(config.model, 10), rules)
  if calibrate:
    _, new = model.apply(variables, _images(config, "train", 128), train=False, mode="quant",
                         calibrate=True, mutable=["params", "quant_stats"])
    variables = {**variables, **new}
    sink.clear()
  model.apply(variables, _images(config, "test", FLAGS.images), train=False, mode="quant")
  rows = []
  gelu = recipe.GELU_INPUTS["body"]
  import re  # pylint: disable=g-import-not-at-top
  for path, recs in sink.items():
    codes, mn, neg, grid = recs[0]
    rows.append({"source": source, "grid": grid, "a_bits": int(config.a_bits), "site": path,
                 "input": "gelu" if re.fullmatch(gelu, path) else "signed",
                 **histogram_stats(codes, 2 ** int(config.a_bits)), "min_input": mn,
                 "frac_below_zero": neg})
  return rows


def markdown(rows: List[Dict]) -> str:
  out = ["| source | grid | A | site | input | codes used (>=1%) / hit / levels | entropy "
         "(bits) | min input | below 0 |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    out.append(f"| {r['source']} | {r['grid']} | {r['a_bits']} | {r['site']} | {r['input']} | "
               f"{r['codes_used']} / {r['codes_hit']} / {r['levels']} | "
               f"{r['entropy_bits']:.2f} | {r['min_input']:.3f} | "
               f"{100 * r['frac_below_zero']:.1f}% |")
  return "\n".join(out)


def main(argv):
  del argv
  from qgnn_jax.experiment import load_run_config  # pylint: disable=g-import-not-at-top
  rows = []
  bits_list = [int(b) for b in FLAGS.bits.split(",")]
  if FLAGS.synthetic:
    rows += synthetic_rows(bits_list)
  if FLAGS.fp:
    base = load_run_config(FLAGS.fp)
    raw = ckpt.restore_from(FLAGS.fp)
    for bits in bits_list:
      for grid in FLAGS.grids.split(","):
        config = load_run_config(FLAGS.fp)
        with config.unlocked():
          config.method, config.w_bits, config.a_bits = "lsq", bits, bits
          config.lsq_gelu_grid = grid
        from qgnn_jax import qat  # pylint: disable=g-import-not-at-top
        from qgnn_jax.models import create_model  # pylint: disable=g-import-not-at-top
        m = qat.quantize_model(create_model(config.model, 10), recipe.quant_rules(config))
        v = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((2, 28, 28, 1)))
        v = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), v)
        params, _, _ = ckpt.merge_matching(v["params"], raw["params"])
        bstats, _, _ = ckpt.merge_matching(v["batch_stats"], raw["batch_stats"])
        variables = {**v, "params": params, "batch_stats": bstats}
        rows += model_rows(config, variables, f"{base.model} FP + LSQ init", calibrate=True)
  if FLAGS.workdir:
    config = load_run_config(FLAGS.workdir)
    raw = ckpt.restore_from(FLAGS.workdir)
    variables = {k: raw[k] for k in ("params", "batch_stats", "quant_stats") if k in raw}
    rows += model_rows(config, variables, f"trained {os.path.basename(FLAGS.workdir)}",
                       calibrate=False)
  print(markdown(rows))
  if FLAGS.out:
    new = not os.path.exists(FLAGS.out)
    with open(FLAGS.out, "a", newline="") as f:
      w = csv.DictWriter(f, fieldnames=FIELDS)
      if new:
        w.writeheader()
      for r in rows:
        w.writerow({k: r[k] for k in FIELDS})


if __name__ == "__main__":
  app.run(main)
