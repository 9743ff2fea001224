"""Throughput benchmark of the real train / eval steps (docs/METHOD.md, "Results"; issue 6).

    python -m experiments.bench --model vig_ti_32 --batch 128 --methods fp,pq,pq+aqd+sqd
    python -m experiments.bench --model vig_ti_224 --batch 32 --methods fp --json ours.json

A method is what a run config's `method` takes (`qgnn_jax.recipe.parse_method`): "fp",
any registered quantizer (`qgnn_jax.quant.QUANTIZERS`), optionally with "+aqd" and/or
"+sqd". `METHODS` (computed from the registry) lists fp, every registered quantizer,
and pq+aqd, pq+sqd, pq+aqd+sqd. For every method the model is the registered variant
(`create_model`) quantized by the run recipe's rules at W4A4 (`recipe.quant_rules` of
`bench_config(method)`: the defaults of experiments/configs/common.py) and trained by the
real `qgnn_jax.train.make_train_step` (pmap over all local devices, donated state, AdamW)
with `recipe.loss_config`: student mode "fp" or "quant", alpha = 1 with aqd, beta = 1
with sqd (AQD taps `qgnn_jax.models.FEATURE_TAPS`), on synthetic data of the model's input
shape that is put on the devices once (no host transfer inside the loop).

What is measured (wall clock, `jax.block_until_ready` after every step):

* ``compile_s``: the first call of the train step (trace + XLA compile + one
  execution) = ``lower_s`` (trace and lower to StableHLO: Python) + ``xla_compile_s``
  (XLA's compile, or loading it from the cache) + ``first_step_s`` (the first execution).
  The persistent compilation cache is on as in `experiments.run`: with a warm cache
  ``xla_compile_s`` is the time to load the program; `--compilation_cache=off` measures
  compiling.
* ``train_step_ms_median`` and spread (``train_step_ms_iqr``, min, max) over
  ``--steps`` timed steps after ``--warmup`` untimed ones; ``train_img_s`` =
  batch / median.
* ``eval_img_s``: the same for `make_eval_step` (eval mode; quantized methods
  evaluate in mode "quant").
* ``graph_share``: the share of the forward (eval) time spent building the
  k-NN graphs, measured as ``1 - t(forward with knn_graph replaced by a fixed
  neighbour list) / t(forward)``. The replacement returns an index array of
  the same shape, made data-dependent at negligible cost so that XLA cannot
  constant-fold the gathers; everything else (the gathers, max aggregation)
  is unchanged. This counts the graph construction in its real fusion
  context rather than in isolation.

The machine is usually shared: timings of the methods (and of the two
forwards behind ``graph_share``) are interleaved round-robin, one step of
each per round, so that a burst of load hits all of them alike and the ratios
stay meaningful; medians are reported. The 1-minute load average before and
after the timed rounds is recorded in every result entry.

``--json FILE`` writes {"device", "model", "batch", "params", "flops_per_image" (XLA's
count for the FP forward), "results": [...]}, one
entry per method with the keys above (and the spread, dtype, graph_impl,
load). A table is printed with each method's step time relative to fp and pq.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import statistics
import time
from typing import Any, Dict, Optional, Sequence, Tuple

from absl import app, flags

from experiments import cli

# Distillation variants benchmarked for PQ (parsed by recipe.parse_method, so always valid).
PQ_VARIANTS = ("pq+aqd", "pq+sqd", "pq+aqd+sqd")


def available_methods() -> Tuple[str, ...]:
  """fp, every quantizer registered now (`qgnn_jax.quant.QUANTIZERS`), then pq+aqd,
  pq+sqd and pq+aqd+sqd. Imports jax (lazily: `main` sets the log level first)."""
  from qgnn_jax import quant, recipe
  names = ("fp",) + quant.QUANTIZERS.names() + PQ_VARIANTS
  return tuple(str(recipe.parse_method(m)) for m in names)


def __getattr__(name: str):
  """`METHODS`: `available_methods()`, read from the registry when asked for."""
  if name == "METHODS":
    return available_methods()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


flags.DEFINE_string("model", "vig_ti_32", "Model name (qgnn_jax.models.MODELS).")
flags.DEFINE_integer("batch", 128, "Global batch size (split over the local devices).")
flags.DEFINE_string("methods", "fp,pq,pq+aqd+sqd",
                    "Comma-separated methods: 'fp', or a registered quantizer "
                    "(qgnn_jax.quant.QUANTIZERS: pq, minmax, lsq, ...) optionally +aqd / +sqd; "
                    "'all' = METHODS (fp, every registered quantizer, pq+aqd, pq+sqd, "
                    "pq+aqd+sqd).")
flags.DEFINE_integer("steps", 10, "Timed steps per method (train and eval each).")
flags.DEFINE_integer("warmup", 2, "Untimed steps after the compiling call.")
flags.DEFINE_string("json", None, "Write the results as JSON to this file.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (params stay float32).")
flags.DEFINE_enum("graph_impl", None, ["dense", "segment"],
                  "Max-relative aggregation path (default: the model's default).")
flags.DEFINE_integer("num_classes", 10, "Classifier outputs.")
flags.DEFINE_bool("graph_share", True, "Measure the k-NN graph share of the forward.")
flags.DEFINE_bool("progress", True, "tqdm progress bars.")
flags.DEFINE_string("inference_workdir", None,
                    "Inference instead of training: a trained QAT run's workdir; times the "
                    "forward of its checkpoint at fp (same weights, no quantizer), fake quant "
                    "(mode quant, as the run evaluates), and its export (qgnn_jax.export) on "
                    "dequantized weights and on integer codes, interleaved, --batch images.")


def device_name() -> str:
  import jax
  d = jax.local_devices()
  kind = d[0].device_kind
  if d[0].platform == "cpu":
    model = platform.processor() or "cpu"
    try:
      with open("/proc/cpuinfo") as f:
        model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
      pass
    kind = f"cpu: {model}, {os.cpu_count()} cores"
  return f"{kind} x{len(d)}" if len(d) > 1 else kind


def load_avg() -> Optional[float]:
  try:
    return round(os.getloadavg()[0], 2)
  except OSError:
    return None


def bench_config(method: str, model_name: str = "vig_ti_32", dtype: str = "float32",
                 graph_impl: Optional[str] = None):
  """The run config a method is benchmarked with: experiments/configs/common.py's defaults
  at W4A4, AQD / SQD weights 1 (validates the method)."""
  from experiments.configs import common
  from qgnn_jax import recipe
  c = common.base_config()
  c.model, c.method, c.dtype = model_name, str(recipe.parse_method(method)), dtype
  if graph_impl is not None:
    c.graph_impl = graph_impl
  c.w_bits, c.a_bits = 4, 4
  c.aqd_alpha, c.sqd_beta = 1.0, 1.0
  return c


def loss_config(method: str):
  """`recipe.loss_config` of `bench_config(method)` (AQD taps: models.FEATURE_TAPS)."""
  from qgnn_jax import recipe
  return recipe.loss_config(bench_config(method))


def build_models(model_name: str, method: str, num_classes: int, dtype: str = "float32",
                 **model_kwargs):
  """(model with BN's pmap axis for the steps, the same without it for init / calibrate):
  the registered variant (model_kwargs override its fields) quantized by the recipe's rules."""
  import jax.numpy as jnp
  from qgnn_jax import qat, recipe, run_config
  from qgnn_jax import train as train_lib
  from qgnn_jax.models import create_model
  rules = recipe.quant_rules(bench_config(method, model_name, dtype))
  jdtype = run_config.compute_dtype(dtype)
  make = lambda **kw: qat.quantize_model(
      create_model(model_name, num_classes, dtype=jdtype, **model_kwargs, **kw), rules)
  return make(axis_name=train_lib.AXIS), make()


@contextlib.contextmanager
def fixed_neighbours():
  """Replaces `graph.knn_graph` by a fixed (data-dependent-looking) neighbour list."""
  import jax
  import jax.numpy as jnp
  from qgnn_jax import graph
  orig = graph.knn_graph

  def fake(features, k, dilation=1, keys=None, relative_pos=None):
    b, n = features.shape[:2]
    m = n if keys is None else keys.shape[1]
    base = (jnp.arange(n, dtype=jnp.int32)[:, None] + jnp.arange(k, dtype=jnp.int32) * dilation) % m
    # A runtime-dependent zero keeps XLA from treating the indices as constants.
    zero = (jax.lax.stop_gradient(features[0, 0, 0]) > 3e38).astype(jnp.int32)
    return jnp.broadcast_to(base + zero, (b, n, k))

  graph.knn_graph = fake
  try:
    yield
  finally:
    graph.knn_graph = orig


def _stats_ms(ts: Sequence[float]) -> Dict[str, float]:
  ms = sorted(1e3 * t for t in ts)
  q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
  return {"median": statistics.median(ms), "iqr": q[2] - q[0], "min": ms[0], "max": ms[-1]}



def _timed(fn):
  import jax
  t0 = time.perf_counter()
  out = fn()
  jax.block_until_ready(out)
  return out, time.perf_counter() - t0


def run_bench(model_name: str, batch: int, methods: Sequence[str], steps: int = 10,
              warmup: int = 2, dtype: str = "float32", graph_impl: Optional[str] = None,
              num_classes: int = 10, measure_graph_share: bool = True,
              json_path: Optional[str] = None, progress: bool = True,
              verbose: bool = True, model_kwargs: Optional[Dict[str, Any]] = None
              ) -> Dict[str, Any]:
  """Runs the benchmark; returns (and optionally writes) the JSON-able result dict.

  model_kwargs override fields of the registered variant (e.g. depth=1 for a
  quick smoke run).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from tqdm.auto import tqdm
  from qgnn_jax import recipe, run_config
  from qgnn_jax import train as train_lib
  from qgnn_jax.models import count_params, create_model, forward_flops, input_shape

  methods = list(methods)
  if not methods:
    raise ValueError(f"methods={methods}; valid: a non-empty list of {available_methods()} "
                     f"or other parseable methods")
  parsed = {m: recipe.parse_method(m) for m in methods}  # raises on a bad one, naming it
  if steps < 1 or warmup < 0:
    raise ValueError(f"steps={steps} (>= 1), warmup={warmup} (>= 0)")
  jdtype = run_config.compute_dtype(dtype)
  n_dev = jax.local_device_count()
  if batch % n_dev:
    raise ValueError(f"batch={batch} is not divisible by the {n_dev} local devices")
  shape = input_shape(model_name)
  rng = np.random.default_rng(0)
  host = {"image": rng.standard_normal((batch,) + shape, np.float32),
          "label": rng.integers(0, num_classes, (batch,), np.int32)}
  sharded = train_lib.shard_batch(host, n_dev)
  data = jax.pmap(lambda x: x)(sharded)  # on the devices once, in pmap's own sharding
  extra = dict(model_kwargs or {})
  if graph_impl is not None:
    extra["graph_impl"] = graph_impl

  runs = []
  bar = tqdm(methods, desc=f"compile {model_name}", disable=not progress, dynamic_ncols=True)
  for method in bar:
    bar.set_postfix(method=method)
    model, init_model = build_models(model_name, method, num_classes, dtype, **extra)
    tx = train_lib.make_optimizer("adamw", 1e-3, 1000, 10)
    # Set-up code runs once: compiled without LLVM optimisation (train.run_once).
    state = train_lib.create_state(init_model, tx, jnp.asarray(host["image"][:2]),
                                   jax.random.key(0))
    if parsed[method].quantized:
      state = train_lib.calibrate(init_model, state, jnp.asarray(host["image"][:min(batch, 8)]))
    rstate = train_lib.replicate(state, n_dev)
    # Ahead of time, so that tracing + lowering (Python: the model, qwix's interception, the
    # three passes of AQD/SQD) and XLA's compile are timed apart; the compiled step is the
    # one timed below (same program as the jitted call's).
    t0 = time.perf_counter()
    step = train_lib.make_train_step(model, tx, loss_config(method), num_classes,
                                     teacher_variables=state.variables(), num_devices=n_dev)
    # +kd: the frozen teacher's variables (here the initial ones: the same cost) are
    # bound as the pmap-ed function's first argument.
    bound = getattr(step, "args", ())
    lowered = getattr(step, "func", step).lower(*bound, rstate, data)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    train_step = functools.partial(compiled, *bound)
    t2 = time.perf_counter()
    memory = compiled.memory_analysis()
    (rstate, _), first_step_s = _timed(lambda: train_step(rstate, data))
    lower_s, xla_compile_s = t1 - t0, t2 - t1
    compile_s = lower_s + xla_compile_s + first_step_s
    for _ in range(warmup):
      rstate, _ = train_step(rstate, data)
    jax.block_until_ready(rstate)
    eval_step = train_lib.make_eval_step(model, parsed[method].mode)
    _, eval_compile_s = _timed(lambda: eval_step(rstate, data))
    fixed_step = None
    if measure_graph_share:
      with fixed_neighbours():
        fixed_step = train_lib.make_eval_step(model, parsed[method].mode)
        _timed(lambda: fixed_step(rstate, data))  # traces under the replacement
    for _ in range(warmup):
      jax.block_until_ready(eval_step(rstate, data))
      if fixed_step is not None:
        jax.block_until_ready(fixed_step(rstate, data))
    runs.append(dict(method=method, train_step=train_step, eval_step=eval_step,
                     fixed_step=fixed_step, state=rstate, compile_s=compile_s,
                     temp_bytes=getattr(memory, "temp_size_in_bytes", None),
                     arg_bytes=getattr(memory, "argument_size_in_bytes", None),
                     lower_s=lower_s, xla_compile_s=xla_compile_s, first_step_s=first_step_s,
                     eval_compile_s=eval_compile_s, t_train=[], t_eval=[], t_fixed=[]))

  load_before = load_avg()
  for _ in tqdm(range(steps), desc="timed rounds", disable=not progress, dynamic_ncols=True):
    for r in runs:
      (r["state"], _), dt = _timed(lambda: r["train_step"](r["state"], data))
      r["t_train"].append(dt)
    for r in runs:
      _, dt = _timed(lambda: r["eval_step"](r["state"], data))
      r["t_eval"].append(dt)
      if r["fixed_step"] is not None:
        _, dt = _timed(lambda: r["fixed_step"](r["state"], data))
        r["t_fixed"].append(dt)
  load_after = load_avg()

  results = []
  for r in runs:
    tr, ev = _stats_ms(r["t_train"]), _stats_ms(r["t_eval"])
    share = None
    if r["t_fixed"]:
      share = 1.0 - statistics.median(r["t_fixed"]) / statistics.median(r["t_eval"])
    results.append({
        "method": r["method"],
        "compile_s": round(r["compile_s"], 3),
        "lower_s": round(r["lower_s"], 3),
        "xla_compile_s": round(r["xla_compile_s"], 3),
        "first_step_s": round(r["first_step_s"], 3),
        "train_step_ms_median": round(tr["median"], 3),
        "train_img_s": round(batch / tr["median"] * 1e3, 3),
        "eval_img_s": round(batch / ev["median"] * 1e3, 3),
        "graph_share": None if share is None else round(share, 4),
        "train_step_ms_iqr": round(tr["iqr"], 3),
        "train_step_ms_min": round(tr["min"], 3),
        "train_step_ms_max": round(tr["max"], 3),
        "eval_step_ms_median": round(ev["median"], 3),
        "eval_step_ms_iqr": round(ev["iqr"], 3),
        "eval_compile_s": round(r["eval_compile_s"], 3),
        # XLA's memory analysis of the compiled train step (per device): its scratch
        # (activations kept for the backward, teacher passes) and its arguments.
        "train_temp_mib": None if r["temp_bytes"] is None else round(r["temp_bytes"] / 2**20, 2),
        "train_arg_mib": None if r["arg_bytes"] is None else round(r["arg_bytes"] / 2**20, 2),
        "steps": steps, "dtype": dtype, "graph_impl": graph_impl or "default",
        "load_before": load_before, "load_after": load_after,
    })
  fp_model = create_model(model_name, num_classes, dtype=jdtype, **extra)
  one = jax.ShapeDtypeStruct((1,) + shape, jnp.float32)
  out = {"device": device_name(), "model": model_name, "batch": batch,
         "params": count_params(jax.eval_shape(fp_model.init, jax.random.PRNGKey(0), one)["params"]),
         "flops_per_image": forward_flops(fp_model, shape), "results": results}
  if verbose:
    print(format_table(out))
  if json_path:
    d = os.path.dirname(json_path)
    if d:
      os.makedirs(d, exist_ok=True)
    with open(json_path, "w") as f:
      json.dump(out, f, indent=1)
  return out


def format_table(out: Dict[str, Any]) -> str:
  """Markdown table of a run_bench result, with step-time ratios to fp and pq."""
  res = out["results"]
  ref = {r["method"]: r["train_step_ms_median"] for r in res}
  size = (f"  params: {out['params']:,}  forward: {out['flops_per_image'] / 1e6:.1f} MFLOP/image "
          f"(XLA count)" if "params" in out else "")
  lines = [f"device: {out['device']}  model: {out['model']}{size}  batch: {out['batch']}",
           "| method | compile s | train step ms (median, IQR) | train img/s | eval img/s "
           "| graph share | / fp | / pq |", "|---|---|---|---|---|---|---|---|"]
  for r in res:
    t = r["train_step_ms_median"]
    rat = lambda m: f"{t / ref[m]:.2f}" if m in ref else "-"
    gs = "-" if r["graph_share"] is None else f"{100 * r['graph_share']:.1f}%"
    lines.append(f"| {r['method']} | {r['compile_s']:.1f} | {t:.1f} ({r['train_step_ms_iqr']:.1f}) "
                 f"| {r['train_img_s']:.1f} | {r['eval_img_s']:.1f} | {gs} | {rat('fp')} | {rat('pq')} |")
  lines.append(f"load average (1 min) before/after timing: {res[0]['load_before']} / "
               f"{res[0]['load_after']}")
  return "\n".join(lines)


def run_inference_bench(workdir: str, batch: int, steps: int = 10, warmup: int = 2,
                        json_path: Optional[str] = None) -> Dict[str, Any]:
  """Inference img/s of a QAT run: fp / fake quant / export dequantized / export integer.

  The forwards run on one device (jit, no pmap) on synthetic images of the model's input
  shape, interleaved round-robin one call each per round (a burst of load hits all alike);
  medians over `steps` rounds after `warmup`.
  """
  import jax
  from qgnn_jax import export, models
  from qgnn_jax import workdir as workdir_lib
  path = os.path.join(workdir, "bench_export.qgx.tmp")
  export.save(path, workdir_lib.from_workdir(workdir))
  try:
    e = export.load(path)
  finally:
    os.remove(path)
  fq_fn, fq_vars = workdir_lib.checkpoint_fn(workdir, exported=e)
  shape = models.input_shape(e.meta["model"])
  x = jax.random.normal(jax.random.PRNGKey(0), (batch,) + tuple(shape))
  plain = jax.jit(lambda v, x: e.model.apply(v, x, train=False))
  fp_vars = {k: v for k, v in e.variables.items() if k != export.QINT}
  fns = {"fp": (plain, fp_vars), "fake_quant": (fq_fn, fq_vars),
         "export_dequantized": (e.apply_fn(False), e.variables),
         "export_integer": (e.apply_fn(True), e.variables)}
  compile_s = {}
  for name, (fn, v) in fns.items():
    _, compile_s[name] = _timed(lambda: fn(v, x))
    for _ in range(warmup):
      jax.block_until_ready(fn(v, x))
  times = {name: [] for name in fns}
  load0 = load_avg()
  for _ in range(steps):
    for name, (fn, v) in fns.items():
      times[name].append(_timed(lambda: fn(v, x))[1])
  load1 = load_avg()
  out = {"device": device_name(), "workdir": workdir, "model": e.meta["model"],
         "method": e.meta["source"].get("method"), "batch": batch, "steps": steps,
         "integer_sites": e.integer_sites, "sites": len(e.plans),
         "load_avg_before": load0, "load_avg_after": load1, "results": []}
  for name in fns:
    st = _stats_ms(times[name])
    out["results"].append({"path": name, "compile_s": compile_s[name],
                           "ms_median": st["median"], "ms_iqr": st["iqr"],
                           "img_s": batch / (st["median"] / 1e3)})
  base = out["results"][0]["img_s"]
  print(f"{out['model']} {out['method']} batch {batch} on {out['device']} "
        f"(load {load0} -> {load1}); {out['integer_sites']}/{out['sites']} sites integer")
  print("| path | img/s | ms/batch (median, IQR) | vs fp |\n|---|---|---|---|")
  for r in out["results"]:
    print(f"| {r['path']} | {r['img_s']:.0f} | {r['ms_median']:.1f} ({r['ms_iqr']:.1f}) | "
          f"{r['img_s'] / base:.2f}x |")
  if json_path:
    with open(json_path, "w") as f:
      json.dump(out, f, indent=2)
  return out


def main(argv):
  if flags.FLAGS.inference_workdir:
    F = flags.FLAGS
    run_inference_bench(F.inference_workdir, F.batch, F.steps, F.warmup, F.json)
    return
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  F = flags.FLAGS
  # The persistent compilation cache (experiments/cli.py's --compilation_cache): with a warm
  # cache compile_s is the time to load the program; measure compile times with 'off'.
  cli.setup_compilation_cache()
  methods = [m.strip() for m in F.methods.split(",") if m.strip()]
  if methods == ["all"]:
    methods = list(available_methods())
  run_bench(F.model, F.batch, methods,
            steps=F.steps, warmup=F.warmup, dtype=F.dtype, graph_impl=F.graph_impl,
            num_classes=F.num_classes, measure_graph_share=F.graph_share, json_path=F.json,
            progress=F.progress)


if __name__ == "__main__":
  app.run(main)
