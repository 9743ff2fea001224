"""PTQ of the Fashion-MNIST FP checkpoint (vig_tiny_28): W8A8 / W6A6 / W4A4, PQ with the
searched lambda vs the fixed one (2.5), min-max plain and with its clip searched (README,
"Post-training quantization of a run"; docs/METHOD.md, "Post-training quantization").

    python tools/ptq_table.py --fp runs/onefooting/fp_s0 --out runs/ptq

Each row is one `--config.ptq=true` run (the same as `python -m experiments.run
--config=experiments/configs/fashion_mnist_qat.py --workdir runs/ptq/<row>
--config.method=<m> --config.w_bits=<b> --config.a_bits=<b> --config.ptq=true
--config.ptq_search=<s> --config.init_from=<fp>`, in one process); writes table.md beside
this file. QAT rows: any finished runs/onefooting/*/results.json at those bit widths.
"""
import argparse
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from experiments.configs import fashion_mnist_qat  # noqa: E402
from qgnn_jax import experiment  # noqa: E402

ROWS = [("pq", "mse"), ("pq", "none"), ("minmax", "none"), ("minmax", "mse")]


def config_for(fp_config, method, bits, search):
  c = fashion_mnist_qat.get_config()
  for k in ("dataset", "model", "batch_size", "eval_batch_size", "val_holdout", "eval_on",
            "graph_impl", "dtype", "drop_path", "augment", "seed", "lam"):
    if k in fp_config:
      setattr(c, k, fp_config[k])
  c.method, c.w_bits, c.a_bits = method, bits, bits
  c.ptq, c.ptq_search, c.progress = True, search, False
  return c


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--fp", required=True)
  p.add_argument("--out", default="runs/ptq")
  p.add_argument("--bits", default="8,4,6")
  args = p.parse_args()
  with open(os.path.join(args.fp, "config.json")) as f:
    fp_config = json.load(f)
  with open(os.path.join(args.fp, "results.json")) as f:
    fp = json.load(f)
  rows = []
  plan = [(b, m, s) for b in [int(b) for b in args.bits.split(",")] for m, s in ROWS[:3]] + \
      [(b, m, s) for b in [int(b) for b in args.bits.split(",")] for m, s in ROWS[3:]]
  for bits, method, search in plan:  # the table's must-have cells first
    wd = os.path.join(args.out, f"{method}_{search}_w{bits}a{bits}")
    c = config_for(fp_config, method, bits, search)
    c.init_from = args.fp
    t0 = time.time()
    res = experiment.train_and_evaluate(c, wd)
    with open(os.path.join(wd, "ptq.json")) as f:
      summ = json.load(f)["summary"]
    rows.append((bits, method, search, res["top1"], summ, time.time() - t0, wd))
    print(rows[-1], flush=True)
    write_table(args, fp, rows)


def write_table(args, fp, rows):
  qat = {}
  for path in glob.glob(os.path.join(os.path.dirname(os.path.abspath(args.fp)), "*",
                                     "results.json")):
    with open(path) as f:
      r = json.load(f)
    if r.get("w_bits"):
      qat.setdefault(r["w_bits"], []).append((r["method"], r["top1"], os.path.dirname(path)))
  here = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "experiments",
                      "results", "ptq")  # the table beside the results it summarises
  with open(os.path.join(here, "table.md"), "w") as f:
    f.write(f"FP checkpoint: {args.fp} (top-1 {100 * fp['top1']:.2f}% on "
            f"{fp.get('eval_split', 'test')})\n\n")
    f.write("| bits | pq, searched λ | pq, λ = 2.5 | min-max | min-max, searched clip | "
            "QAT (finished runs beside) |\n|---|---|---|---|---|---|\n")
    by = {(b, m, s): (t, summ) for b, m, s, t, summ, _, _ in rows}
    for bits in sorted({r[0] for r in rows}, reverse=True):
      cell = lambda m, s: f"{100 * by[(bits, m, s)][0]:.2f}%" if (bits, m, s) in by else "-"
      q = "; ".join(f"{m} {100 * t:.2f}% ({os.path.basename(d)})" for m, t, d in qat.get(bits, []))
      f.write(f"| W{bits}A{bits} | {cell('pq', 'mse')} | {cell('pq', 'none')} | "
              f"{cell('minmax', 'none')} | {cell('minmax', 'mse')} | {q or 'none run'} |\n")
    f.write("\nSearched choices (sites per value):\n\n")
    for b, m, s, t, summ, sec, wd in rows:
      f.write(f"- W{b}A{b} {m} {s}: {json.dumps(summ)} ({sec:.0f} s, {wd})\n")
  print(open(os.path.join(here, "table.md")).read(), flush=True)


if __name__ == "__main__":
  main()
