"""One training run from an ml_collections config: the logic behind `experiments.run`.

`train_and_evaluate(config, workdir)` trains (FP or QAT), evaluates, checkpoints
and writes `config.json`, `metrics.jsonl` and `results.json` (SPEC §6) into
`workdir`. Restarting it with the same workdir resumes from the latest
checkpoint with the same data order.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from qgnn_jax import checkpoint as ckpt
from qgnn_jax import data as data_lib
from qgnn_jax import distributed
from qgnn_jax import train as train_lib
from qgnn_jax.recipe import build_model, loss_config, model_size_bytes, parse_method

RESULT_KEYS = ("dataset", "model", "method", "w_bits", "a_bits", "seed", "top1", "fp_top1",
               "train_steps", "train_seconds", "params", "model_bytes_fp32",
               "model_bytes_quantized")


# ----------------------------------------------------------------------------- logging


class MetricsWriter:
  """Appends one JSON object per line to workdir/metrics.jsonl (flushed each write).

  ``enabled=False`` (processes other than 0 of a multi-process run) writes nothing.
  """

  def __init__(self, path: str, enabled: bool = True):
    self._f = open(path, "a", encoding="utf-8") if enabled else None

  def write(self, record: Dict[str, Any]) -> None:
    if self._f is None:
      return
    self._f.write(json.dumps({k: (float(v) if isinstance(v, (np.floating, jax.Array)) else v)
                              for k, v in record.items()}) + "\n")
    self._f.flush()

  def close(self) -> None:
    if self._f is not None:
      self._f.close()


def evaluate(eval_step, state, batches) -> Dict:
  """Top-1 and mean CE over one pass of `batches` (padding masked out)."""
  tot = {"correct": 0.0, "count": 0.0, "loss_sum": 0.0}
  for batch in batches:
    out = eval_step(state, batch)
    for k in tot:
      tot[k] += float(out[k][0])
  return {"top1": tot["correct"] / max(tot["count"], 1.0),
          "loss": tot["loss_sum"] / max(tot["count"], 1.0), "count": int(tot["count"])}


# ----------------------------------------------------------------------------- main entry


def _init_from_fp(state, directory: str) -> tuple:
  """Copies matching params / batch_stats from another run's checkpoint into state."""
  raw = ckpt.restore_from(directory)
  merged_p, copied, missing = ckpt.merge_matching(state.params, raw["params"])
  merged_bs, _, _ = ckpt.merge_matching(state.batch_stats, raw.get("batch_stats", {}))
  if not copied:
    raise ckpt.CheckpointError(f"init_from={directory!r}: no parameter matched this model "
                               f"(is it the same architecture?)")
  logging.info("init_from %s: copied %d leaves, kept init for %d (%s)", directory, len(copied),
               len(missing), ", ".join("/".join(map(str, p)) for p in missing[:8]))
  fp_top1 = None
  res = os.path.join(os.path.abspath(directory), "results.json")
  if os.path.exists(res):
    with open(res) as f:
      fp_top1 = json.load(f).get("top1")
  return state.replace(params=merged_p, batch_stats=merged_bs), fp_top1


def input_pipeline(config, num_devices: int) -> Dict[str, Any]:
  """Train / eval batch iterators for the config's dataset.

  Returns {"train": start_step -> iterator, "eval": () -> one-pass iterator,
  "info", "steps_per_epoch", "eval_split"}. Small datasets are held in memory;
  `DatasetInfo.streamed` ones (imagenette, imagenet2012) stream from tfds.
  `config.batch_size` is the global batch: each of the P processes reads its
  B/P examples of every batch (`data_lib.shard_bounds`), split over its
  `num_devices` devices, and gets them on its devices (prefetched).
  """
  info = data_lib.get_info(config.dataset)
  shard, shards = data_lib.process_shard()
  data_lib.check_batching(1, config.batch_size, num_devices, shards)
  data_lib.check_batching(1, config.eval_batch_size, num_devices, shards)
  data_dir = config.data_dir or None
  if config.eval_on not in ("auto", "test", "validation"):
    raise ValueError(f"eval_on={config.eval_on!r}; valid: 'auto', 'test', 'validation'")
  if info.streamed:
    if config.val_holdout:
      raise ValueError(f"val_holdout is not supported for streamed dataset {config.dataset!r}")
    n = data_lib.num_examples(config.dataset, "train", data_dir)
    return {
        "train": lambda start: data_lib.prefetch(data_lib.stream_train_batches(
            config.dataset, config.batch_size, config.seed, start, num_devices, data_dir,
            shard_index=shard, shard_count=shards)),
        "eval": lambda: data_lib.prefetch(data_lib.stream_eval_batches(
            config.dataset, config.eval_batch_size, num_devices, data_dir,
            shard_index=shard, shard_count=shards)),
        "info": info, "steps_per_epoch": n // config.batch_size, "eval_split": info.eval_split}
  splits = data_lib.load_splits(config.dataset, data_dir, val_holdout=int(config.val_holdout))
  (x_train, y_train), (x_eval, y_eval), info = splits["train"], splits["eval"], splits["info"]
  eval_split = splits["eval_split"]
  if config.eval_on == "test" and eval_split != "test":
    # Train without the held-out images (as the validation runs do), report test.
    test = data_lib.load_splits(config.dataset, data_dir, val_holdout=0)
    (x_eval, y_eval), eval_split = test["eval"], test["eval_split"]
  elif config.eval_on == "validation" and eval_split != "validation":
    raise ValueError("eval_on='validation' needs val_holdout > 0")
  if len(x_train) < config.batch_size:
    raise ValueError(f"batch_size={config.batch_size} exceeds the {len(x_train)} training images")
  return {
      "train": lambda start: data_lib.train_batches(
          x_train, y_train, info, config.batch_size, config.seed, start_step=start,
          augment=bool(config.augment), num_devices=num_devices, shard_index=shard,
          shard_count=shards, device_put=True),
      "eval": lambda: data_lib.eval_batches(x_eval, y_eval, info, config.eval_batch_size,
                                            num_devices, shard_index=shard, shard_count=shards,
                                            device_put=True),
      "info": info, "steps_per_epoch": len(x_train) // config.batch_size,
      "eval_split": eval_split}


def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
  """Runs (or resumes) one training job; returns the results.json dict.

  In a multi-process run every process calls it with the same config and workdir (a
  file system all processes share); process 0 alone writes config.json,
  metrics.jsonl, progress.json and results.json, and orbax writes each checkpoint once.
  """
  main = distributed.is_main_process()
  os.makedirs(workdir, exist_ok=True)
  if main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json(indent=2))
  num_devices = jax.local_device_count()
  data = input_pipeline(config, num_devices)
  info, steps_per_epoch, eval_split = data["info"], data["steps_per_epoch"], data["eval_split"]
  total_steps = int(config.num_steps) or int(round(config.num_epochs * steps_per_epoch))
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  method = parse_method(config.method)

  model = build_model(config, info.num_classes, axis_name=train_lib.AXIS)
  init_model = build_model(config, info.num_classes)
  tx = train_lib.make_optimizer(
      config.optimizer, config.lr, total_steps, warmup, config.weight_decay,
      quant_lr=(config.quant_lr if config.quant_lr > 0 else None),
      grad_clip=(config.grad_clip or None))
  it0 = data["train"](0)
  first = next(it0)
  if hasattr(it0, "close"):
    it0.close()
  # The whole first global batch (every process's shard, in process order): calibration
  # must see the same images on every process and for every process count.
  sample = jnp.asarray(distributed.allgather(
      np.asarray(first["image"]).reshape((-1,) + first["image"].shape[2:])))
  state = train_lib.create_state(init_model, tx, sample[:2], jax.random.key(config.seed))

  manager = ckpt.make_manager(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
  restored, start_step = ckpt.restore_latest(manager, state)
  data_state = None if restored is None else ckpt.restore_data_state(manager, start_step)
  fp_top1 = None
  progress_path = os.path.join(workdir, "progress.json")
  prev_seconds = 0.0
  if restored is not None:
    state, start_step = restored, int(start_step)
    if os.path.exists(progress_path):
      with open(progress_path) as f:
        prog = json.load(f)
      prev_seconds, fp_top1 = prog.get("train_seconds", 0.0), prog.get("fp_top1")
    logging.info("resumed from step %d", start_step)
  else:
    start_step = 0
    if config.init_from:
      state, fp_top1 = _init_from_fp(state, config.init_from)
    if method.quantized:
      state = train_lib.calibrate(init_model, state, sample)
    state = state.replace(opt_state=tx.init(state.params))

  loss_cfg = loss_config(config)
  train_step = train_lib.make_train_step(model, tx, loss_cfg, info.num_classes)
  eval_mode = "quant" if method.quantized else "fp"
  eval_step = train_lib.make_eval_step(model, eval_mode)
  writer = MetricsWriter(os.path.join(workdir, "metrics.jsonl"), enabled=main)

  def save(step, seconds):
    ckpt.save(manager, step, state_host(), force=True,
              data_state=data_lib.iterator_state(batches, step))
    if main:
      with open(progress_path, "w") as f:
        json.dump({"step": step, "train_seconds": seconds, "fp_top1": fp_top1}, f)

  rstate = train_lib.replicate(state, num_devices)
  state_host = lambda: jax.device_get(train_lib.unreplicate(rstate))
  stop_at = int(config.stop_at_step) or total_steps
  batches = data["train"](start_step)  # on the devices, prefetched
  data_lib.restore_iterator(batches, data_state, start_step)
  t0, seconds = time.perf_counter(), prev_seconds
  bar = tqdm(total=total_steps, initial=start_step, desc=f"{config.method} {config.model}",
             disable=not (config.progress and main), dynamic_ncols=True)
  step = start_step
  try:
    for step in range(start_step, min(stop_at, total_steps)):
      rstate, metrics = train_step(rstate, next(batches))
      bar.update(1)
      done = step + 1
      if done % config.log_every == 0 or done == total_steps:
        m = {k: float(v[0]) for k, v in jax.device_get(metrics).items()}
        if not all(math.isfinite(v) for v in m.values()):
          raise FloatingPointError(
              f"non-finite training metrics at step {done}: {m}; the last good checkpoint is "
              f"kept in {workdir}/checkpoints (try a lower lr or grad_clip)")
        writer.write({"step": done, "epoch": done / steps_per_epoch, "split": "train", **m})
        bar.set_postfix(loss=f"{m['loss']:.3f}", top1=f"{m['top1']:.3f}")
      if config.eval_every_epochs and done % max(1, int(config.eval_every_epochs *
                                                        steps_per_epoch)) == 0 and done < total_steps:
        ev = evaluate(eval_step, rstate, data["eval"]())
        writer.write({"step": done, "epoch": done / steps_per_epoch,
                      "split": eval_split, **ev})
      if done % config.checkpoint_every == 0 and done < total_steps:
        save(done, seconds + time.perf_counter() - t0)
    step = min(stop_at, total_steps)
    jax.block_until_ready(rstate)
    seconds += time.perf_counter() - t0
    save(step, seconds)
  finally:
    bar.close()
  if step < total_steps:  # stopped early on purpose (stop_at_step): resumable
    writer.close()
    return {}

  ev = evaluate(eval_step, rstate, data["eval"]())
  writer.write({"step": total_steps, "epoch": total_steps / steps_per_epoch,
                "split": eval_split, "final": True, **ev})
  writer.close()
  final = state_host()
  sizes = model_size_bytes(final.params, final.quant_stats)
  results = {
      "dataset": config.dataset, "model": config.model, "method": config.method,
      "w_bits": int(config.w_bits) if method.quantized else None,
      "a_bits": int(config.a_bits) if method.quantized else None,
      "seed": int(config.seed), "top1": float(ev["top1"]),
      "fp_top1": None if fp_top1 is None else float(fp_top1),
      "train_steps": int(total_steps), "train_seconds": float(seconds), **sizes}
  # Written whole or not at all: its presence marks the run as done (experiments.sweep).
  if main:
    tmp = os.path.join(workdir, "results.json.tmp")
    with open(tmp, "w") as f:
      json.dump(results, f, indent=2)
    os.replace(tmp, os.path.join(workdir, "results.json"))
  return results


def summary_table(rows: list) -> str:
  """Markdown table of results dicts (one row per run)."""
  head = "| run | method | W/A bits | top-1 | params | size fp32 | size quantized | train s |"
  lines = [head, "|---|---|---|---|---|---|---|---|"]
  for name, r in rows:
    bits = "-" if r["w_bits"] is None else f"{r['w_bits']}/{r['a_bits']}"
    lines.append(f"| {name} | {r['method']} | {bits} | {100 * r['top1']:.2f}% | {r['params']:,} | "
                 f"{r['model_bytes_fp32'] / 1024:.0f} KiB | {r['model_bytes_quantized'] / 1024:.0f} KiB"
                 f" | {r['train_seconds']:.0f} |")
  return "\n".join(lines)


def run_pipeline(config, workdir: str) -> list:
  """Runs the config: one run, or FP pretraining then QAT when pretrain_fp_epochs > 0.

  Returns [(name, results)] and prints the summary table.
  """
  rows = []
  if config.pretrain_fp_epochs > 0 and parse_method(config.method).quantized:
    fp_cfg = config.copy_and_resolve_references()
    with fp_cfg.unlocked():
      fp_cfg.method, fp_cfg.num_epochs = "fp", config.pretrain_fp_epochs
    fp_dir = os.path.join(workdir, "fp")
    rows.append(("fp", train_and_evaluate(fp_cfg, fp_dir)))
    qat_cfg = config.copy_and_resolve_references()
    with qat_cfg.unlocked():
      qat_cfg.init_from = fp_dir
      qat_cfg.lr = config.lr / 4
    rows.append(("qat", train_and_evaluate(qat_cfg, os.path.join(workdir, "qat"))))
  else:
    rows.append((os.path.basename(os.path.normpath(workdir)), train_and_evaluate(config, workdir)))
  rows = [(n, r) for n, r in rows if r]
  if rows and distributed.is_main_process():
    print("\n" + summary_table(rows))
  return rows
