"""A run's workdir after (or between) runs: its config, its checkpoint evaluated, exported.

    config = run_config.load_run_config(workdir)       # config.json, with today's defaults
    workdir.evaluate_checkpoint(workdir, step, split)  # eval.json (experiments.evaluate)
    workdir.export_workdir(workdir, out, step)         # the export file (experiments.export)
    workdir.evaluate_export(path, compare=True)        # integer top-1 (evaluate --export)
    workdir.convert_checkpoint(file, model, workdir, config)  # official weights -> workdir

The top floor of the library: it reads what `experiment` wrote and hands it to `export`;
`experiments/` calls it.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from qgnn_jax import checkpoint as ckpt
from qgnn_jax import data as data_lib
from qgnn_jax import experiment, export, official, qat, recipe, run_config
from qgnn_jax import models as models_lib
from qgnn_jax import results as results_lib
from qgnn_jax import train as train_lib
from qgnn_jax.data import augment


# ----------------------------------------------------------------------------- evaluate


def evaluate_checkpoint(workdir: str, step: Optional[int] = None,
                        split: Optional[str] = None) -> Dict[str, Any]:
  """Evaluates a run's checkpoint without training; writes and returns eval.json's dict.

  Args:
    workdir: a run's workdir (its config.json and checkpoints/).
    step: the checkpoint step (None: the newest readable one).
    split: "test" or "validation" (None: the split the run evaluates on). "validation"
      needs a run that held images out (val_holdout > 0).
  Returns:
    {"step", "split", "top1", "loss", "count", dataset / model / method / bits, provenance,
    "evaluated_at"}.
  """
  config = run_config.load_run_config(workdir)
  if split is not None:
    if split not in run_config.EVAL_SPLITS:
      raise run_config.ConfigError(f"split={split!r}: valid: "
                                   f"{', '.join(repr(s) for s in run_config.EVAL_SPLITS)}")
    if split == "validation" and not config.val_holdout:
      raise run_config.ConfigError(
          f"split='validation': {workdir} held out no validation images (val_holdout=0); "
          f"use split='test'")
    with config.unlocked():
      config.eval_on = split
  with config.unlocked():
    config.init_from = ""  # the checkpoint replaces whatever the run started from
  run_config.validate(config, jax.local_device_count(), jax.process_count())
  run = experiment.setup(config, workdir)
  try:
    restored = ckpt.restore(run.manager, run.fresh_state, step=step)
    if restored is None:
      raise ckpt.CheckpointError(f"no checkpoint in {run.manager.directory}")
    rstate = train_lib.replicate(restored.state, run.num_devices)
    ev = experiment.evaluate(experiment.make_eval_step(run), rstate, run.data["eval"]())
  finally:
    run.manager.close()
  bits = lambda b: int(b) if run.method.quantized else None
  out = {"dataset": config.dataset, "model": config.model, "method": config.method,
         "w_bits": bits(config.w_bits), "a_bits": bits(config.a_bits),
         "step": restored.step, "split": run.eval_split, "top1": float(ev["top1"]),
         "loss": float(ev["loss"]), "count": int(ev["count"]),
         **results_lib.provenance(run_config.config_sha256(config), run.data["source"]),
         "evaluated_at": results_lib.utc_now()}
  if run.main:
    results_lib.write_json_atomic(os.path.join(workdir, results_lib.EVAL_FILE), out)
  return out


# ----------------------------------------------------------------------------- export


def from_workdir(workdir: str, step: Optional[int] = None, fp32: bool = False
                 ) -> Dict[str, Any]:
  """The payload of a run's checkpoint (its config.json says model and rules)."""
  config = run_config.load_run_config(workdir)
  raw = ckpt.restore_from(workdir, step=step)
  num_classes = int(data_lib.get_info(config.dataset).num_classes)
  source = recipe.export_source(workdir, int(np.asarray(raw["step"])), config)
  return export.build(config.model, num_classes, recipe.quant_rules(config),
                      {k: raw.get(k, {}) for k in ("params", "batch_stats", "quant_stats")},
                      model_kwargs=recipe.model_kwargs(config), fp32=fp32, source=source)


def export_workdir(workdir: str, out: str, step: Optional[int] = None) -> Dict[str, Any]:
  """Writes `out` from the run's checkpoint; returns {"path", "bytes", "bytes_fp32",
  "sites", "step"}."""
  payload = from_workdir(workdir, step)
  size = export.save(out, payload)
  fp32 = export.nbytes(from_workdir(workdir, step, fp32=True))
  meta = json.loads(payload["meta"])
  return {"path": out, "bytes": size, "bytes_fp32": fp32, "sites": len(payload["sites"]),
          "step": meta["source"]["step"]}


# ----------------------------------------------------------------------------- evaluate an export


def predict(fn, variables: Any, images: np.ndarray, info, batch_size: int = 1000
            ) -> np.ndarray:
  """Logits (N, classes) float32 of uint8 NHWC `images` (normalised with `info`), in
  batches of `batch_size` (the last padded to full size: one compile)."""
  out = []
  for i in range(0, len(images), batch_size):
    x = images[i:i + batch_size]
    k = len(x)
    if k < batch_size:
      x = np.concatenate([x, np.zeros((batch_size - k,) + x.shape[1:], x.dtype)])
    out.append(np.asarray(fn(variables, jnp.asarray(augment.normalize(x, info))))[:k])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def checkpoint_fn(workdir: str, step: Optional[int] = None,
                  exported: Optional[export.Exported] = None):
  """(jitted (variables, images) -> logits, variables) of a run's checkpoint, evaluated as
  the run evaluates it: fake quantization (mode "quant") for QAT, plain for FP.

  exported: take the model and rules from this export (the reference for its integer
  path: the same rules whatever today's config defaults say), else from config.json.
  """
  if exported is not None:
    model = qat.quantize_model(exported.model, exported.rules)
  else:
    config = run_config.load_run_config(workdir)
    model = recipe.build_model(config, int(data_lib.get_info(config.dataset).num_classes))
  raw = ckpt.restore_from(workdir, step=step)
  variables = {k: jax.tree_util.tree_map(jnp.asarray, raw[k])
               for k in ("params", "batch_stats", "quant_stats") if raw.get(k)}
  mode = "quant" if model.quantized else "fp"  # as the run's method.mode
  return jax.jit(lambda v, x: model.apply(v, x, train=False, mode=mode)), variables


def evaluate_export(path: str, dataset: Optional[str] = None, data_dir: Optional[str] = None,
                    compare: bool = False, limit: int = 0, batch_size: int = 1000
                    ) -> Dict[str, Any]:
  """Top-1 of an export on its dataset's test split, on the integer path.

  compare: also evaluates the dequantized path and the fake-quant eval of the checkpoint the
  export came from (meta source: workdir and step) and counts the images whose predicted
  class differs, with the largest logit difference. limit: the first N test images (0 all).
  """
  exported = export.load(path)
  source = exported.meta.get("source", {})
  dataset = dataset or source.get("dataset")
  if not dataset:
    raise export.ExportError(f"{path}: records no dataset; pass one (--dataset)")
  x, y, info = data_lib.load_arrays(dataset, "test", data_dir)
  if limit:
    x, y = x[:limit], y[:limit]
  batch_size = min(batch_size, len(x))
  logits = {"integer": predict(exported.apply_fn(True), exported.variables, x, info, batch_size)}
  if compare:
    logits["dequantized"] = predict(exported.apply_fn(False), exported.variables, x, info,
                                    batch_size)
    if not source.get("workdir"):
      raise export.ExportError(f"{path}: records no source workdir to compare with")
    fn, variables = checkpoint_fn(source["workdir"], source.get("step"), exported)
    logits["checkpoint"] = predict(fn, variables, x, info, batch_size)
  out = {"export": path, "bytes": os.path.getsize(path), "model": exported.meta["model"],
         "method": source.get("method"), "dataset": dataset, "split": "test", "count": len(y),
         "sites": len(exported.plans), "integer_sites": exported.integer_sites,
         "fallback": {k: p.reason for k, p in exported.plans.items() if not p.integer}}
  for name, lg in logits.items():
    out[f"top1_{name}"] = float(np.mean(np.argmax(lg, -1) == y))
  if compare:
    ref = logits["checkpoint"]
    for name in ("integer", "dequantized"):
      out[f"{name}_vs_checkpoint"] = {
          "differing_predictions": int(np.sum(np.argmax(logits[name], -1) != np.argmax(ref, -1))),
          "max_abs_logit_diff": float(np.max(np.abs(logits[name] - ref))),
          "max_abs_logit": float(np.max(np.abs(ref)))}
  return out


# ----------------------------------------------------------------------------- official weights


def convert_checkpoint(checkpoint: str, model_name: str, workdir: str, config,
                       fold_normalization: bool = True) -> Dict[str, Any]:
  """Converts an official checkpoint file into a workdir of an FP run of `model_name`.

  The workdir holds config.json (`config` with `model` = model_name, `method` = 'fp' and
  `source` = 'official <file name> sha256:<hex> ...') and checkpoints/0/, a TrainState
  (params, BN statistics, a fresh optimiser state for the config) that
  `experiments.evaluate --workdir`, `experiments.export --workdir` and
  `--config.init_from=WORKDIR` read. The classes come from the file's head and must equal
  those of `config.dataset`.

  Args:
    checkpoint: .pth / .pt / .bin (needs torch), .npz or .safetensors.
    model_name: a registered ViG / PyramidViG (the official ones: official.OFFICIAL_NAMES).
    workdir: must not hold a checkpoint yet.
    config: a run config (`experiments/configs/common.py`'s fields) giving the dataset,
      data_dir, batch sizes and optimiser of the runs that use the workdir.
    fold_normalization: fold the official input normalisation (mean = std = 0.5) into the
      first conv for the dataset's statistics (`fold_input_normalization`).
  Returns:
    {'workdir', 'model', 'num_classes', 'sha256', 'tensors', 'params', 'seconds'}.
  Raises:
    FileNotFoundError; ConversionError (bad file, wrong model, class count, a workdir that
    holds checkpoints); ValueError (unknown model or dataset); run_config.ConfigError.
  """
  t0 = time.perf_counter()
  if model_name not in models_lib.MODELS:
    raise ValueError(f"unknown model {model_name!r}; valid (official): "
                     f"{', '.join(official.OFFICIAL_NAMES)}")
  dataset = config.dataset
  info = data_lib.get_info(dataset)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise official.ConversionError(f"{workdir} already holds checkpoints; use a new --workdir")
  state_dict = official.read_state_dict(checkpoint)
  num_classes = official.num_classes_of(state_dict, checkpoint)
  if num_classes != info.num_classes:
    raise official.ConversionError(f"{checkpoint}: its head has {num_classes} classes, dataset "
                          f"{dataset!r} has {info.num_classes}; pick a dataset with "
                          f"{num_classes} classes")
  image_shape = models_lib.input_shape(model_name)
  model = models_lib.create_model(model_name, num_classes)
  variables = official.convert(state_dict, model, model_name, image_shape, checkpoint)
  tensors = len(state_dict)
  del state_dict  # the file's arrays (peak memory: ViG-B's 348 MB more)
  if fold_normalization:
    variables = official.fold_input_normalization(variables, info.mean, info.std)
  sha = official.file_sha256(checkpoint)

  config = config.copy_and_resolve_references()
  config.model, config.method, config.init_from = model_name, "fp", ""
  config.source = f"official {os.path.basename(checkpoint)} sha256:{sha}" + (
      f" input-normalisation folded to {dataset}'s" if fold_normalization else "")
  run_config.validate(config, check_init_from=False)
  # The state `experiment.setup` builds for this config (same optimiser tree), holding the
  # converted variables; the optimiser's moments are fresh (zero).
  tx = recipe.optimizer(config, total_steps=1, warmup_steps=0)
  qmodel = recipe.build_model(config, num_classes)
  shapes = jax.eval_shape(lambda: train_lib.create_state(
      qmodel, tx, jnp.zeros((1,) + tuple(image_shape), jnp.float32), jax.random.key(0)))
  num_params = models_lib.count_params(variables["params"])
  params = jax.tree.map(jnp.asarray, variables.pop("params"))
  state = train_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=jax.tree.map(jnp.asarray, variables.pop("batch_stats")), quant_stats={},
      opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(config.seed)))
  ckpt.check_compatible(ckpt.flatten_with_paths(shapes), state, "the converted state")
  os.makedirs(workdir, exist_ok=True)
  manager = ckpt.make_manager(ckpt_dir, max_to_keep=1)
  try:
    ckpt.save(manager, 0, state, force=True,  # orbax reads the arrays where they are
              meta={"step": 0, "train_seconds": 0.0, "fp_top1": None,
                    "started_at": None, "source": config.source})
  finally:
    manager.close()
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json(indent=2))
  return {"workdir": workdir, "model": model_name, "num_classes": num_classes, "sha256": sha,
          "tensors": tensors, "params": num_params,
          "seconds": time.perf_counter() - t0}
