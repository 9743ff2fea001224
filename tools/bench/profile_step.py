"""Where the time of a train (or eval) step goes: jax.profiler trace of the real pmap step,
per-HLO-op durations joined with the compiled HLO's op_name metadata and grouped.

    python tools/bench/profile_step.py --model vig_ti_32 --batch 128 --method fp [--eval]

Prints a markdown table (ms per step by category, forward vs backward). Op durations are
summed over the XLA CPU runtime's threads, so on a loaded machine they include time the
op's threads waited for a core; compare shares, not absolute numbers.
"""
import argparse, collections, glob, gzip, json, os, re, shutil, tempfile, time

CATEGORIES = [  # (name, regex on the op_name path), first match wins
    ("fake quant + ranges", r"/quant/|pauta|minmax|lsq|fake_quant"),
    ("k-NN graph (norm, distances, top_k)", r"top_k|bnc,bmc->bnm|l2_normalize|knn"),
    ("max-relative aggregation (gather, max, its grad)",
     r"grapher\d+/(gather|reduce|argmax|reduce_max|convert_element_type|reduce_sum|scatter-add|"
     r"vmap\(\)/gather|select_n|eq)$"),
    ("grouped conv layout (stack, reshape, transpose)", r"gconv/reshape|/stack|\.\.\.gi,gio->\.\.\.go/transpose"),
    ("matmul / conv (+ the conv weight gradient's tap slices)",
     r"dot_general|conv_general_dilated|conv\d*/(slice|pad)$"),
    ("BatchNorm (+ its fused GELU)", r"_bn/|/bn\d*/"),
    ("GELU (outside the fused BN+GELU)", r"erfc|erf|exp"),
    ("optimizer (AdamW)", r"^(?!.*ViG).*(adam|optax|multi_transform|apply_updates|update)"),
]


def categorize(op_name):
  for name, pat in CATEGORIES:
    if re.search(pat, op_name):
      return name
  return "other (adds, copies, loss, ...)"


def hlo_op_names(hlo):
  """{ENTRY instruction: op_name}. A fusion without its own op_name (XLA:CPU's library
  fusions) takes the op_name of the ops inside its fused computation (the most common)."""
  body_names, comp = {}, None
  for line in hlo.splitlines():
    m = re.match(r"(?:ENTRY )?%([\w.\-]+) .*\{$", line)
    if m:
      comp = m.group(1); body_names[comp] = []
    elif comp is not None:
      om = re.search(r'op_name="([^"]*)"', line)
      if om:
        body_names[comp].append(om.group(1))
  op_name = {}
  for line in hlo[hlo.index("ENTRY"):].splitlines():
    m = re.match(r"\s+%([\w.\-]+) = ", line)
    if m:
      om = re.search(r'op_name="([^"]*)"', line)
      if om:
        op_name[m.group(1)] = om.group(1)
        continue
      inner = []
      for callee in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", line):
        inner += body_names.get(callee, [])
      op_name[m.group(1)] = collections.Counter(inner).most_common(1)[0][0] if inner else "?"
  return op_name


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="vig_ti_32"); p.add_argument("--batch", type=int, default=128)
  p.add_argument("--method", default="fp"); p.add_argument("--steps", type=int, default=2)
  p.add_argument("--eval", action="store_true"); p.add_argument("--top", type=int, default=0)
  p.add_argument("--hlo_out", help="also write the compiled step's HLO text to this file")
  a = p.parse_args()
  import jax, jax.numpy as jnp, numpy as np
  from qgnn_jax import recipe, train as T
  from qgnn_jax.models import input_shape
  from experiments.bench import build_models, loss_config
  method = recipe.parse_method(a.method)
  quantized = method.quantized
  model, init_model = build_models(a.model, a.method, 10)  # the recipe's W4A4 rules, as bench
  tx = T.make_optimizer("adamw", 1e-3, 1000, 10)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((a.batch,) + input_shape(a.model), np.float32)
  y = rng.integers(0, 10, (a.batch,), np.int32)
  s = T.create_state(init_model, tx, jnp.asarray(x[:2]), jax.random.key(0))
  if quantized:
    s = T.calibrate(init_model, s, jnp.asarray(x[:8]))
  state = T.replicate(s, 1); data = jax.pmap(lambda v: v)(T.shard_batch({"image": x, "label": y}, 1))
  if a.eval:
    fn = T.make_eval_step(model, method.mode)
    step = lambda st, d: (st, fn(st, d))
  else:
    fn = T.make_train_step(model, tx, loss_config(a.method), 10)
    step = fn
  for _ in range(2):  # compile + warm-up
    state, out = step(state, data); jax.block_until_ready((state, out))
  hlo = fn.lower(state, data).compile().as_text()
  if a.hlo_out:
    with open(a.hlo_out, "w") as f:
      f.write(hlo)
  tmp = tempfile.mkdtemp()
  walls = []
  with jax.profiler.trace(tmp):
    for _ in range(a.steps):
      t0 = time.perf_counter(); state, out = step(state, data); jax.block_until_ready((state, out))
      walls.append(time.perf_counter() - t0)
  trace = json.load(gzip.open(glob.glob(tmp + "/**/*.trace.json.gz", recursive=True)[0]))
  shutil.rmtree(tmp, ignore_errors=True)
  op_name = hlo_op_names(hlo)
  by = collections.Counter(); ops = collections.Counter()
  for e in trace["traceEvents"]:
    if e.get("ph") == "X" and e["name"] in op_name:
      on = op_name[e["name"]]
      half = "bwd" if "transpose(" in on else "fwd"
      by[(categorize(on), half)] += e["dur"] / 1e3 / a.steps
      # Unnamed ops keep their instance name, to be found in --hlo_out's text.
      hop = e["name"] if on == "?" else e["name"].rsplit(".", 1)[0]
      ops[(on.replace("jit(_fun)/", ""), hop)] += e["dur"] / 1e3 / a.steps
  total = sum(by.values())
  kind = "eval" if a.eval else "train"
  print(f"{a.model} batch {a.batch} {a.method} {kind} step: wall {1e3 * min(walls):.0f} ms (best of "
        f"{a.steps}), summed op time {total:.0f} ms/step, load {os.getloadavg()[0]:.2f}\n")
  print("| category | fwd ms | bwd ms | share |\n|---|---|---|---|")
  cats = sorted({c for c, _ in by}, key=lambda c: -(by[(c, "fwd")] + by[(c, "bwd")]))
  for c in cats:
    f, b = by[(c, "fwd")], by[(c, "bwd")]
    print(f"| {c} | {f:.0f} | {b:.0f} | {100 * (f + b) / total:.1f}% |")
  for (on, hop), v in ops.most_common(a.top):
    print(f"{v:8.1f} ms  {hop:28s} {on[-100:]}")


if __name__ == "__main__":
  main()
