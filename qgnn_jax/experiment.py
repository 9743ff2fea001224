"""One training run from an ml_collections config: the logic behind `experiments.run`.

`train_and_evaluate(config, workdir)` trains (FP or QAT), evaluates, checkpoints and
writes into `workdir`: `config.json`, `metrics.jsonl`, TensorBoard events
(`tensorboard/`), `checkpoints/`, and at the end `results.json` (SPEC §6 plus provenance,
`qgnn_jax.results`) and `curves.png`. It runs in four parts:

1. `check_workdir`: every config field validated (`qgnn_jax.run_config`) and the config
   compared with the workdir's config.json; nothing is written before this passes, and a
   finished workdir is reported, not rerun.
2. `setup` + `restore_or_init`: data, model, optimiser; the newest readable checkpoint (a
   corrupt one is skipped with a warning, `config.restore_step` picks one) or a fresh
   state; metrics.jsonl cut back to the restored step; config.json written.
3. `train_loop`: training with logging, evaluation and asynchronous checkpoints, each
   save preceded by an on-device finiteness check (a diverged state is never saved).
4. `finish`: final evaluation, results.json, the curves' plot.

Restarting with the same workdir resumes from the latest checkpoint with the same data
order; the resumed run ends bit-identical to an uninterrupted one. While it writes, a run
holds the workdir's lock (`qgnn_jax.workdir_lock`: a second run there is refused); Ctrl-C
raises `Interrupted` (which step the same command resumes from) after any save in flight
completes; a run that fails before writing anything removes the workdir it created.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Any, Dict, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from qgnn_jax import checkpoint as ckpt
from qgnn_jax import data as data_lib
from qgnn_jax import distributed
from qgnn_jax import export as export_lib
from qgnn_jax import results as results_lib
from qgnn_jax import run_config
from qgnn_jax import run_log
from qgnn_jax import train as train_lib
from qgnn_jax import workdir_lock
from qgnn_jax.recipe import build_model, loss_config, model_size_bytes, parse_method

RESULT_KEYS = results_lib.RESULT_KEYS  # the results.json keys (qgnn_jax.results)
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
DISCARDED_DIR = "discarded_checkpoints"
KILL_AT_ENV = "QGNN_TEST_KILL_AT"


class DataError(RuntimeError):
  """The run's dataset could not be loaded; the message names the file or what was tried."""


class Interrupted(Exception):
  """Ctrl-C (SIGINT) stopped the run; the message says where and which step the same
  command resumes from. Not a KeyboardInterrupt: the command line exits with one line."""

  def __init__(self, workdir: str, at_step: Optional[int], resume_step: Optional[int]):
    where = f"at step {at_step}" if at_step is not None else "before training started"
    resume = (f"resumes from step {resume_step}" if resume_step else "starts from step 0 "
              "(no checkpoint was written yet)")
    super().__init__(f"{workdir}: interrupted {where}; the same command {resume}")
    self.at_step, self.resume_step = at_step, resume_step


# ----------------------------------------------------------------------------- evaluation


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
  "info", "steps_per_epoch", "eval_split", "source" (what the images are read from)}.
  Small datasets are held in memory; `DatasetInfo.streamed` ones (imagenette,
  imagenet2012) stream from tfds. `config.batch_size` is the global batch: each of the P
  processes reads its B/P examples of every batch (`data_lib.shard_bounds`), split over its
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
        "info": info, "steps_per_epoch": n // config.batch_size, "eval_split": info.eval_split,
        "source": f"tfds in {data_lib.tfds_data_dir(data_dir)}"}
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
      "eval_split": eval_split, "source": data_lib.data_source(config.dataset, data_dir)}


# ----------------------------------------------------------------------------- one run


def _notify(message: str) -> None:
  """A line for the person watching (process 0 only), above any progress bar."""
  if distributed.is_main_process():
    tqdm.write(message, file=sys.stderr)


def _kill_point(name: str, step: int) -> None:
  """Test hook: signals this process at a named point when QGNN_TEST_KILL_AT=name:step
  (SIGKILL) or name:step:INT (SIGINT, as Ctrl-C).

  Points: 'mid_step' (a train step dispatched, not finished), 'save' (an asynchronous
  checkpoint save in flight), 'eval' (an evaluation after its first batch).
  """
  at = os.environ.get(KILL_AT_ENV, "")
  if at in (f"{name}:{step}", f"{name}:{step}:INT"):
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGINT if at.endswith(":INT") else signal.SIGKILL)


def _with_kill_point(batches: Iterator, name: str, step: int) -> Iterator:
  for i, batch in enumerate(batches):
    if i == 1:
      _kill_point(name, step)
    yield batch


def _read_json(path: str) -> Optional[Dict[str, Any]]:
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def check_workdir(config, workdir: str, allow_config_change: bool = False,
                  check_init_from: bool = True) -> Optional[Dict[str, Any]]:
  """Everything decided before a file is written: the config is valid and the workdir's.

  Validates every field (`run_config.validate`), then compares with the workdir's saved
  config.json (`run_config.check_restart`). Writes nothing.

  Returns:
    the workdir's results.json when the run has already finished with this config (there is
    nothing to do), else None.
  Raises:
    run_config.ConfigError: a bad field (one line).
    run_config.ConfigMismatchError: the saved config differs in run-defining fields.
  """
  run_config.validate(config, jax.local_device_count(), jax.process_count(),
                      check_init_from=check_init_from)
  saved = _read_json(os.path.join(workdir, CONFIG_FILE))
  diff = []
  if saved is not None:
    diff = run_config.check_restart(saved, config, workdir, allow_config_change)
  done = results_lib.read_results(workdir)
  if done is not None and not diff:
    return done
  return None


@dataclasses.dataclass
class Progress:
  """Where a run stands: the step reached, seconds spent training (over all restarts),
  the FP model's top-1 (QAT from FP) and when the run first started (UTC, ISO 8601)."""
  step: int
  train_seconds: float
  fp_top1: Optional[float]
  started_at: str

  def meta(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class Run:
  """One run between setup and finish: what `setup` builds, what the loop updates.

  data: `input_pipeline`'s dict; state: the host / single-device TrainState before training
  (replicated into rstate by the loop); batches: the training iterator (its state goes
  into every checkpoint).
  """
  config: Any
  workdir: str
  main: bool
  num_devices: int
  data: Dict[str, Any]
  total_steps: int
  method: Any
  model: Any
  init_model: Any
  tx: Any
  sample: jax.Array
  state: Any
  manager: Any
  progress: Optional[Progress] = None
  data_state: Optional[Dict[str, Any]] = None
  rstate: Any = None
  batches: Any = None
  writer: Optional[run_log.MetricsWriter] = None
  last_loss: Any = None
  config_changes: Any = dataclasses.field(default_factory=list)  # run_config.CHANGES_KEY
  kd_teacher: Any = None  # method +kd: the frozen FP variables of init_from

  @property
  def steps_per_epoch(self) -> int:
    return self.data["steps_per_epoch"]

  @property
  def eval_split(self) -> str:
    return self.data["eval_split"]


def setup(config, workdir: str) -> Run:
  """Data, model, optimiser and a freshly initialised state; the checkpoint manager.

  The only file it creates is the workdir's checkpoints/ folder (after the data is read).
  Raises DataError (naming the file, e.g. a truncated .gz IDX file) when the data cannot
  be loaded.
  """
  main = distributed.is_main_process()
  num_devices = jax.local_device_count()
  try:
    data = input_pipeline(config, num_devices)
  except (ValueError, OSError, EOFError) as e:  # missing, truncated or malformed files
    raise DataError(f"config.dataset={config.dataset!r}: the data could not be loaded: "
                    f"{e}") from e
  info, steps_per_epoch = data["info"], data["steps_per_epoch"]
  total_steps = int(config.num_steps) or int(round(config.num_epochs * steps_per_epoch))
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
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
  manager = ckpt.make_manager(os.path.join(workdir, CHECKPOINT_DIR), config.keep_checkpoints)
  return Run(config=config, workdir=workdir, main=main, num_devices=num_devices, data=data,
             total_steps=total_steps, method=parse_method(config.method), model=model,
             init_model=init_model, tx=tx, sample=sample, state=state, manager=manager)


def restore_or_init(run: Run) -> None:
  """Resumes from a checkpoint or initialises the state (init_from, calibration), then
  writes config.json.

  A corrupt newest checkpoint is skipped with a warning (`checkpoint.restore`); an explicit
  `config.restore_step` restores that step. Checkpoints newer than the restored step move to
  workdir/discarded_checkpoints/, and metrics.jsonl loses its lines past it.
  """
  config, workdir = run.config, run.workdir
  restored = ckpt.restore(run.manager, run.state, step=int(config.restore_step) or None)
  if restored is not None:
    moved = ckpt.set_aside_steps_after(run.manager, restored.step,
                                       os.path.join(workdir, DISCARDED_DIR))
    if moved:
      _notify(f"checkpoints of steps {moved} (after the restored step {restored.step}) moved "
              f"to {os.path.join(workdir, DISCARDED_DIR)}")
    meta = restored.meta or _read_json(os.path.join(workdir, "progress.json")) or {}
    run.state, run.data_state = restored.state, restored.data_state
    run.progress = Progress(step=restored.step, train_seconds=meta.get("train_seconds", 0.0),
                            fp_top1=meta.get("fp_top1"),
                            started_at=meta.get("started_at") or results_lib.utc_now())
    _notify(f"{workdir}: resumed from step {restored.step} of {run.total_steps}")
  else:
    state, fp_top1 = run.state, None
    if config.init_from:
      state, fp_top1 = _init_from_fp(state, config.init_from)
    if run.method.quantized:
      state = train_lib.calibrate(run.init_model, state, run.sample)
    run.state = state.replace(opt_state=run.tx.init(state.params))
    run.progress = Progress(step=0, train_seconds=0.0, fp_top1=fp_top1,
                            started_at=results_lib.utc_now())
  saved = _read_json(os.path.join(workdir, CONFIG_FILE))
  run.config_changes = run_config.changes(saved)
  if saved is not None and (diff := run_config.config_diff(saved, config)):
    # Let through by --allow_config_change (check_workdir refused it otherwise): say so, and
    # keep the history in config.json and results.json.
    _notify(f"{workdir}: continuing from step {run.progress.step} with a changed config: "
            + "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff))
    run.config_changes += [{"step": run.progress.step, "field": k, "old": a, "new": b}
                           for k, a, b in diff]
  if run.main:
    metrics_path = os.path.join(workdir, run_log.METRICS_FILE)
    if dropped := run_log.truncate_metrics(metrics_path, run.progress.step):
      _notify(f"metrics.jsonl: dropped {dropped} lines past step {run.progress.step}")
    saved_config = json.loads(config.to_json())
    if run.config_changes:
      saved_config[run_config.CHANGES_KEY] = run.config_changes
    results_lib.write_json_atomic(os.path.join(workdir, CONFIG_FILE), saved_config)


def _save(run: Run, step: int, seconds: float) -> None:
  """Checks the state finite on the device, then saves it asynchronously (with the data
  iterator's state and the run's progress)."""
  device_state = train_lib.unreplicate(run.rstate)
  ckpt.check_finite(run.manager, step, device_state, run.last_loss)
  meta = dataclasses.replace(run.progress, step=step, train_seconds=seconds).meta()
  ckpt.save(run.manager, step, jax.device_get(device_state), force=True,
            data_state=data_lib.iterator_state(run.batches, step), meta=meta,
            wait_for_it=False)
  _kill_point("save", step)


def train_loop(run: Run) -> None:
  """Trains from run.progress.step to stop_at_step or the end, logging, evaluating and
  checkpointing on the config's schedule; a checkpoint is written at the last step."""
  config, total = run.config, run.total_steps
  if run.method.kd and run.kd_teacher is None:  # also after a resume: read init_from again
    run.kd_teacher = _init_from_fp(run.state, config.init_from)[0].variables()
  train_step = train_lib.make_train_step(run.model, run.tx, loss_config(config),
                                         run.data["info"].num_classes,
                                         teacher_variables=run.kd_teacher,
                                         num_devices=run.num_devices)
  eval_step = make_eval_step(run)
  start = run.progress.step
  run.rstate = train_lib.replicate(run.state, run.num_devices)
  run.batches = run.data["train"](start)  # on the devices, prefetched
  data_lib.restore_iterator(run.batches, run.data_state, start)
  stop = min(int(config.stop_at_step) or total, total)
  eval_every = (max(1, int(config.eval_every_epochs * run.steps_per_epoch))
                if config.eval_every_epochs else 0)
  t0 = time.perf_counter()
  seconds = lambda: run.progress.train_seconds + time.perf_counter() - t0
  bar = tqdm(total=total, initial=start, unit="step", desc=f"{config.method} {config.model}",
             disable=not (config.progress and run.main), dynamic_ncols=True, file=sys.stderr)
  done = start
  try:
    for step in range(start, stop):
      run.rstate, metrics = train_step(run.rstate, next(run.batches))
      done = step + 1
      _kill_point("mid_step", done)
      run.last_loss = metrics["loss"][0]
      bar.update(1)
      if done % config.log_every == 0 or done == total:
        m = {k: float(v[0]) for k, v in jax.device_get(metrics).items()}
        if not all(math.isfinite(v) for v in m.values()):
          ckpt.check_finite(run.manager, done, None, float("nan"))
        run.writer.write({"step": done, "epoch": done / run.steps_per_epoch, "split": "train",
                          **m})
        bar.set_postfix(loss=f"{m['loss']:.3f}", top1=f"{m['top1']:.3f}")
      if eval_every and done % eval_every == 0 and done < total:
        ev = evaluate(eval_step, run.rstate,
                      _with_kill_point(run.data["eval"](), "eval", done))
        run.writer.write({"step": done, "epoch": done / run.steps_per_epoch,
                          "split": run.eval_split, **ev})
      if done % config.checkpoint_every == 0 and done < stop:
        _save(run, done, seconds())
    if stop > start:
      jax.block_until_ready(run.rstate)
      run.progress.train_seconds, run.progress.step = seconds(), stop
      _save(run, stop, run.progress.train_seconds)
  except KeyboardInterrupt:
    ckpt.wait(run.manager)  # a save in flight completes: the resume point is on disk
    raise Interrupted(run.workdir, done, run.manager.latest_step()) from None
  finally:
    bar.close()
    ckpt.wait(run.manager)


def make_eval_step(run: Run):
  """The pmap-ed evaluation step in the mode the run is evaluated in (quant for QAT)."""
  return train_lib.make_eval_step(run.model, "quant" if run.method.quantized else "fp")


def finish(run: Run) -> Dict[str, Any]:
  """The final evaluation, results.json (SPEC §6 + provenance) and the curves' plot."""
  config, total = run.config, run.total_steps
  if run.rstate is None:
    run.rstate = train_lib.replicate(run.state, run.num_devices)
  ev = evaluate(make_eval_step(run), run.rstate,
                _with_kill_point(run.data["eval"](), "eval", total))
  run.writer.write({"step": total, "epoch": total / run.steps_per_epoch,
                    "split": run.eval_split, "final": True, **ev})
  final = jax.device_get(train_lib.unreplicate(run.rstate))
  # The real sizes: the file `experiments.export --workdir` writes from this checkpoint.
  sizes = model_size_bytes(config, run.data["info"].num_classes, final.variables(),
                           source=export_lib.source_of(run.workdir, total, config))
  fp_top1 = run.progress.fp_top1
  results = {
      "dataset": config.dataset, "model": config.model, "method": config.method,
      "w_bits": int(config.w_bits) if run.method.quantized else None,
      "a_bits": int(config.a_bits) if run.method.quantized else None,
      "seed": int(config.seed), "top1": float(ev["top1"]),
      "fp_top1": None if fp_top1 is None else float(fp_top1),
      "train_steps": int(total), "train_seconds": float(run.progress.train_seconds), **sizes,
      "eval_split": run.eval_split, "eval_loss": float(ev["loss"]),
      **results_lib.provenance(run_config.config_sha256(config), run.data["source"]),
      "config_changes": run.config_changes,
      "started_at": run.progress.started_at, "finished_at": results_lib.utc_now()}
  results_lib.check_results(results)
  if run.main:
    run.writer.close()
    # Written whole or not at all: its presence marks the run as done.
    results_lib.write_json_atomic(os.path.join(run.workdir, results_lib.RESULTS_FILE), results)
    run_log.plot_curves(os.path.join(run.workdir, run_log.METRICS_FILE),
                        os.path.join(run.workdir, run_log.CURVES_FILE),
                        title=f"{config.dataset} {config.model} {config.method}")
  return results


def train_and_evaluate(config, workdir: str, allow_config_change: bool = False
                       ) -> Dict[str, Any]:
  """Runs (or resumes) one training job; returns the results.json dict ({} when stopped
  early by stop_at_step).

  Before any file is written the config is validated and compared with the workdir's
  config.json (`check_workdir`); a finished workdir returns its results without running.
  In a multi-process run every process calls it with the same config and workdir (a
  file system all processes share); process 0 alone writes config.json, metrics.jsonl,
  TensorBoard events and results.json, and orbax writes each checkpoint once.

  Args:
    allow_config_change: continue a workdir whose config.json differs in run-defining
      fields (the new values apply from the restored step on).
  """
  done = check_workdir(config, workdir, allow_config_change)
  if done is not None:
    _notify(f"{workdir}: already finished ({done['method']}, top-1 {100 * done['top1']:.2f}% "
            f"on {done.get('eval_split', 'eval')}); nothing to do")
    return done
  created = _first_missing_dir(workdir)
  os.makedirs(workdir, exist_ok=True)
  try:
    with workdir_lock.hold(workdir, enabled=distributed.is_main_process(), notify=_notify):
      # Checked again under the lock: a run that held it may have finished or changed it.
      done = check_workdir(config, workdir, allow_config_change)
      if done is not None:
        return done
      return _train_and_evaluate_locked(config, workdir)
  except BaseException:
    if created is not None and distributed.is_main_process():
      _remove_empty_dirs(created)  # a run that failed before writing anything leaves nothing
    raise


def _latest_step(workdir: str) -> Optional[int]:
  """The newest complete checkpoint step in workdir/checkpoints (None when there is none)."""
  d = os.path.join(workdir, CHECKPOINT_DIR)
  steps = [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []
  return max(steps) if steps else None


def _first_missing_dir(path: str) -> Optional[str]:
  """The outermost directory of `path` that does not exist yet (None when `path` exists)."""
  path, missing = os.path.abspath(path), None
  while not os.path.exists(path):
    missing, parent = path, os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return missing


def _remove_empty_dirs(top: str) -> None:
  """Removes `top` and the folders under it if none of them holds a file."""
  if not os.path.isdir(top):
    return
  for root, dirs, files in os.walk(top):
    if files:
      return
  for root, dirs, _ in os.walk(top, topdown=False):
    os.rmdir(root)


def _train_and_evaluate_locked(config, workdir: str) -> Dict[str, Any]:
  try:
    run = setup(config, workdir)
  except KeyboardInterrupt:
    raise Interrupted(workdir, None, _latest_step(workdir)) from None
  try:
    restore_or_init(run)
    run.writer = run_log.MetricsWriter(workdir, enabled=run.main, resume_step=run.progress.step)
    if config.ptq:  # post-training quantization instead of training (issue 22)
      from qgnn_jax import ptq_run  # pylint: disable=g-import-not-at-top
      ptq_run.quantize(run)
    if run.progress.step < run.total_steps:
      train_loop(run)
    if run.progress.step < run.total_steps:  # stopped early on purpose (stop_at_step)
      return {}
    return finish(run)
  except KeyboardInterrupt:  # outside the training loop (restore, final evaluation)
    ckpt.wait(run.manager)
    at = run.progress.step if run.progress is not None else None
    raise Interrupted(workdir, at, run.manager.latest_step()) from None
  finally:
    if run.writer is not None:
      run.writer.close()
    run.manager.close()


def run_pipeline(config, workdir: str, allow_config_change: bool = False) -> list:
  """Runs the config: one run, or FP pretraining then QAT when pretrain_fp_epochs > 0.

  Every phase's config is validated before the first one starts. Returns [(name, results)]
  and prints the summary table.
  """
  phases = []
  if config.pretrain_fp_epochs > 0 and parse_method(config.method).quantized:
    fp_cfg = config.copy_and_resolve_references()
    with fp_cfg.unlocked():
      fp_cfg.method, fp_cfg.num_epochs = "fp", config.pretrain_fp_epochs
    fp_dir = os.path.join(workdir, "fp")
    qat_cfg = config.copy_and_resolve_references()
    with qat_cfg.unlocked():
      qat_cfg.init_from = fp_dir
      qat_cfg.lr = config.lr / 4
    phases = [("fp", fp_cfg, fp_dir), ("qat", qat_cfg, os.path.join(workdir, "qat"))]
  else:
    phases = [(os.path.basename(os.path.normpath(workdir)), config, workdir)]
  for _, cfg, wd in phases:  # every phase checked before anything runs
    check_workdir(cfg, wd, allow_config_change, check_init_from=len(phases) == 1)
  rows = []
  for name, cfg, wd in phases:
    res = train_and_evaluate(cfg, wd, allow_config_change)
    if not res:  # stopped early (stop_at_step): later phases wait for it to finish
      break
    rows.append((name, res))
  if rows and distributed.is_main_process():
    print("\n" + results_lib.summary_table(rows))
  return rows


# ----------------------------------------------------------------------------- evaluation only


def load_run_config(workdir: str):
  """A workdir's config.json as a run ConfigDict: fields it predates take the values the run
  was made with where those are known (`run_config.LEGACY_VALUES`: an old LSQ run's signed
  GELU grid), else today's defaults. Raises FileNotFoundError when there is none."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from experiments.configs.common import base_config  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, CONFIG_FILE)
  saved = _read_json(path)
  if saved is None:
    raise FileNotFoundError(f"{path} not found: is {workdir} a run's workdir?")
  config = base_config()
  config.update(ml_collections.ConfigDict(run_config.with_legacy_values(saved)))
  return config


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
  config = load_run_config(workdir)
  if split is not None:
    if split not in ("test", "validation"):
      raise run_config.ConfigError(f"split={split!r}: valid: 'test', 'validation'")
    if split == "validation" and not config.val_holdout:
      raise run_config.ConfigError(
          f"split='validation': {workdir} held out no validation images (val_holdout=0); "
          f"use split='test'")
    with config.unlocked():
      config.eval_on = split
  with config.unlocked():
    config.init_from = ""  # the checkpoint replaces whatever the run started from
  run_config.validate(config, jax.local_device_count(), jax.process_count())
  run = setup(config, workdir)
  try:
    restored = ckpt.restore(run.manager, run.state, step=step)
    if restored is None:
      raise ckpt.CheckpointError(f"no checkpoint in {run.manager.directory}")
    rstate = train_lib.replicate(restored.state, run.num_devices)
    ev = evaluate(make_eval_step(run), rstate, run.data["eval"]())
  finally:
    run.manager.close()
  out = {"dataset": config.dataset, "model": config.model, "method": config.method,
         "w_bits": int(config.w_bits) if run.method.quantized else None,
         "a_bits": int(config.a_bits) if run.method.quantized else None,
         "step": restored.step, "split": run.eval_split, "top1": float(ev["top1"]),
         "loss": float(ev["loss"]), "count": int(ev["count"]),
         **results_lib.provenance(run_config.config_sha256(config), run.data["source"]),
         "evaluated_at": results_lib.utc_now()}
  if run.main:
    results_lib.write_json_atomic(os.path.join(workdir, results_lib.EVAL_FILE), out)
  return out
