"""A/B of the train step's backward changes (issue 16), one process, interleaved rounds.

    python tools/bench/ab_train_step.py --model vig_ti_32 --batch 128 \
        --methods fp --rounds 10 --json experiments/results/bench/ab_train_step_cpu.json

Variants (each the real `train.make_train_step` of `experiments.bench`, traced with the
switches below; same weights, same batch):
  before:      reduce_max's autodiff in the max-relative aggregation, flax-style BatchNorm
               (unfused BN and GELU, one-pass variance): the code before these changes;
  gather_max:  + the max-relative backward that scatters to the arg-max sender;
  fused_bn:    + BN(train) + GELU fused by a hand-written VJP (one-pass variance);
  two_pass:    + the two-pass variance;
  erf_gelu:    + GELU (forward and the fused backward's slope) in torch's erf form instead
               of jax.nn.gelu's erfc form;
  conv_grad:   + the 3x3 convs' weight gradient as one matmul per kernel tap
               (`qgnn_jax.conv`, the default now).
Every round times one step of each variant in turn (so a burst of load hits them alike);
medians over the rounds after one warm-up step. Reports ms/step and the ratio to `before`,
plus the 1-minute load average before and after.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

_OLD = dict(erf_gelu=False, conv_grad=False)
VARIANTS = {
    "before": dict(gather_max=False, fused=False, fast_variance=True, **_OLD),
    "gather_max": dict(gather_max=True, fused=False, fast_variance=True, **_OLD),
    "fused_bn": dict(gather_max=True, fused=True, fast_variance=True, **_OLD),
    "two_pass": dict(gather_max=True, fused=True, fast_variance=False, **_OLD),
    "erf_gelu": dict(gather_max=True, fused=True, fast_variance=False, conv_grad=False),
    "conv_grad": dict(gather_max=True, fused=True, fast_variance=False),
}


@contextlib.contextmanager
def switches(gather_max: bool, fused: bool, fast_variance: bool, erf_gelu: bool = True,
             conv_grad: bool = True):
  """Traces the model with the old or new max backward, BatchNorm, GELU and conv weight
  gradient (module globals, read while the step is traced)."""
  import jax
  import jax.numpy as jnp
  from jax import lax
  from qgnn_jax import graph
  from qgnn_jax.models import batchnorm, blocks
  from qgnn_jax.models.batchnorm import BatchNorm
  orig_gm, orig_bn = graph.gather_max, blocks.batch_norm
  orig_gelu, orig_slope = batchnorm.gelu, batchnorm.gelu_slope
  orig_conv = blocks._conv_op  # pylint: disable=protected-access
  if not conv_grad:
    from qgnn_jax import conv
    blocks._conv_op = lambda *a, **k: conv.conv_general_dilated(*a, weight_grad="xla", **k)  # pylint: disable=protected-access
  if not erf_gelu:  # the erfc form of jax.nn.gelu, forward and slope (the code before)
    batchnorm.gelu = lambda x: jax.nn.gelu(x, approximate=False)
    batchnorm.gelu_slope = lambda z: (0.5 * lax.erfc(-z * batchnorm._SQRT_HALF)  # pylint: disable=protected-access
                                      + z * (batchnorm._INV_SQRT_2PI * jnp.exp(-0.5 * z * z)))  # pylint: disable=protected-access
  if not gather_max:
    graph.gather_max = lambda src, nbrs: jnp.max(graph._gather(src, nbrs), axis=2)  # pylint: disable=protected-access
  def batch_norm(train, axis_name, dtype, name=None, act=None):
    return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                     axis_name=axis_name, dtype=dtype, act=act, name=name,
                     fused_backward=fused, fast_variance=fast_variance)
  blocks.batch_norm = batch_norm
  try:
    yield
  finally:
    graph.gather_max, blocks.batch_norm = orig_gm, orig_bn
    batchnorm.gelu, batchnorm.gelu_slope = orig_gelu, orig_slope
    blocks._conv_op = orig_conv  # pylint: disable=protected-access


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="vig_ti_32")
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--methods", default="fp")
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--rounds", type=int, default=10)
  ap.add_argument("--json", default=None)
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  from experiments import bench
  from qgnn_jax import train as train_lib
  from qgnn_jax.models import input_shape

  n_dev = jax.local_device_count()
  shape = input_shape(args.model)
  rng = np.random.default_rng(0)
  host = {"image": rng.standard_normal((args.batch,) + shape, np.float32),
          "label": rng.integers(0, 10, (args.batch,), np.int32)}
  data = jax.pmap(lambda x: x)(train_lib.shard_batch(host, n_dev))
  tx = train_lib.make_optimizer("adamw", 1e-3, 1000, 10)
  runs = []
  for method in args.methods.split(","):
    model, init_model = bench.build_models(args.model, method, 10)
    state = train_lib.create_state(init_model, tx, jnp.asarray(host["image"][:2]),
                                   jax.random.key(0))
    if method != "fp":
      state = train_lib.calibrate(init_model, state, jnp.asarray(host["image"][:8]))
    for name in args.variants.split(","):
      with switches(**VARIANTS[name]):
        step = train_lib.make_train_step(model, tx, bench.loss_config(method), 10)
        rstate = train_lib.replicate(state, n_dev)
        t0 = time.perf_counter()
        rstate, _ = step(rstate, data)  # traces under the switches
        jax.block_until_ready(rstate)
        compile_s = time.perf_counter() - t0
      rstate, _ = step(rstate, data)  # warm-up
      jax.block_until_ready(rstate)
      runs.append(dict(method=method, variant=name, step=step, state=rstate,
                       compile_s=compile_s, t=[]))
      print(f"{method} {name}: compiled in {compile_s:.1f} s", flush=True)
  load_before = os.getloadavg()[0]
  for r_i in range(args.rounds):
    for r in runs:
      t0 = time.perf_counter()
      r["state"], _ = r["step"](r["state"], data)
      jax.block_until_ready(r["state"])
      r["t"].append(time.perf_counter() - t0)
    print(f"round {r_i + 1}/{args.rounds}", flush=True)
  load_after = os.getloadavg()[0]
  out = {"model": args.model, "batch": args.batch, "device": bench.device_name(),
         "rounds": args.rounds, "load_before": round(load_before, 2),
         "load_after": round(load_after, 2), "results": []}
  base = {}
  for r in runs:
    ms = 1e3 * statistics.median(r["t"])
    base.setdefault(r["method"], ms)
    out["results"].append(dict(method=r["method"], variant=r["variant"],
                               compile_s=round(r["compile_s"], 1),
                               step_ms_median=round(ms, 1),
                               step_ms_min=round(1e3 * min(r["t"]), 1),
                               vs_before=round(base[r["method"]] / ms, 3)))
  print(f"| method | variant | compile s | step ms (median) | min | speed vs before |")
  print("|---|---|---|---|---|---|")
  for r in out["results"]:
    print(f"| {r['method']} | {r['variant']} | {r['compile_s']} | {r['step_ms_median']} | "
          f"{r['step_ms_min']} | {r['vs_before']:.3f}x |")
  print(f"{out['device']}; load average {out['load_before']} / {out['load_after']}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
