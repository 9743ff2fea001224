"""One training run from an ml_collections config: the logic behind `experiments.run`.

`train_and_evaluate(config, workdir)` trains (FP or QAT), evaluates, checkpoints and
writes into `workdir`: `config.json`, `metrics.jsonl`, TensorBoard events
(`tensorboard/`), `checkpoints/`, and at the end `results.json` (docs/METHOD.md,
"Results"; `qgnn_jax.results`) and `curves.png`. It is small functions over explicit
values, run in this order:

1. `check_workdir`: every config field validated (`qgnn_jax.run_config`) and the config
   compared with the workdir's config.json; nothing is written before this passes, and a
   finished workdir is reported, not rerun.
2. `setup(config, workdir) -> RunSetup`: data (`recipe.input_pipeline`), the method
   (parsed once), the model,
   optimiser, a fresh state and the checkpoint manager.
3. `restore_or_init(run) -> Start`: the newest readable checkpoint (a corrupt one is
   skipped with a warning, `config.restore_step` picks one) or a fresh state (init_from,
   calibration); metrics.jsonl cut back to the restored step; config.json written.
4. `train_loop(run, start, writer) -> (replicated state, Progress)`: training with logging,
   evaluation and asynchronous checkpoints, each save preceded by an on-device finiteness
   check (a diverged state is never saved).
5. `finish(run, state, progress, ...)`: final evaluation, results.json, the curves' plot.

Restarting with the same workdir resumes from the latest checkpoint with the same data
order; the resumed run ends bit-identical to an uninterrupted one. While it writes, a run
holds the workdir's lock (`qgnn_jax.workdir_lock`: a second run there is refused); Ctrl-C
raises `Interrupted` (which step the same command resumes from) after any save in flight
completes; a run that fails before writing anything removes the workdir it created.
`on_event(point, step)` (`OnEvent`) is told of the run's fault points; the tests pass one
that kills the process there. A finished run's workdir is read, evaluated and exported by
`qgnn_jax.workdir`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from qgnn_jax import checkpoint as ckpt
from qgnn_jax import data as data_lib
from qgnn_jax import distributed
from qgnn_jax import method as method_lib
from qgnn_jax import ptq_run
from qgnn_jax import recipe
from qgnn_jax import results as results_lib
from qgnn_jax import run_config
from qgnn_jax import run_log
from qgnn_jax import train as train_lib
from qgnn_jax import workdir_lock
from qgnn_jax.run_config import CONFIG_FILE, load_run_config  # pylint: disable=unused-import

RESULT_KEYS = results_lib.RESULT_KEYS  # the results.json keys (qgnn_jax.results)
CHECKPOINT_DIR = "checkpoints"
DISCARDED_DIR = "discarded_checkpoints"


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
  """Top-1 and mean CE over one pass of `batches` (padding masked out).

  eval_step: `train.make_eval_step`'s pmap-ed step; state: the replicated TrainState;
  batches: {"image": (D, B/D, H, W, C) float32, "label": (D, B/D) int32, "mask": (D, B/D)}.
  Returns {"top1": float, "loss": float, "count": int}.
  """
  tot = {"correct": 0.0, "count": 0.0, "loss_sum": 0.0}
  for batch in batches:
    # Device 0's copy (the sums are psum-ed; see `train.unreplicate`).
    out = jax.device_get(train_lib.unreplicate(eval_step(state, batch)))
    for k in tot:
      tot[k] += float(out[k])
  return {"top1": tot["correct"] / max(tot["count"], 1.0),
          "loss": tot["loss_sum"] / max(tot["count"], 1.0), "count": int(tot["count"])}


# ----------------------------------------------------------------------------- one run


def _init_from_fp(state, directory: str) -> tuple:
  """(state with the matching params / batch_stats of another run's checkpoint copied in,
  that run's top-1 or None). CheckpointError when no parameter matches."""
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


def _notify(message: str) -> None:
  """A line for the person watching (process 0 only), above any progress bar."""
  if distributed.is_main_process():
    tqdm.write(message, file=sys.stderr)


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


# An observer of the run's fault points, called as on_event(point, step): "mid_step" (a
# train step dispatched, not finished), "save" (an asynchronous checkpoint save in flight),
# "eval" (an evaluation after its first batch). Tests pass one that kills the process
# there (tests/fault_run.py); a run without one calls nothing.
OnEvent = Callable[[str, int], None]


def _no_event(point: str, step: int) -> None:
  del point, step


@dataclasses.dataclass(frozen=True)
class RunSetup:
  """What one run is made of, fixed before its first step (`setup`).

  method: the config's method, parsed once; data: `input_pipeline`'s dict; total_steps:
  the steps the run trains (0 for post-training quantization); model: the quantized model
  (BatchNorm over the pmap axis `train.AXIS`; it also initialises and calibrates, outside
  the pmap); tx: the optimiser; sample: the first global batch's images (B, H, W, C)
  float32; fresh_state: the freshly initialised host TrainState (before init_from and
  calibration); manager: the checkpoint manager of workdir/checkpoints.
  """
  config: Any
  workdir: str
  method: method_lib.Method
  main: bool
  num_devices: int
  data: Dict[str, Any]
  total_steps: int
  model: Any
  tx: Any
  sample: jax.Array
  fresh_state: Any
  manager: Any

  @property
  def steps_per_epoch(self) -> int:
    return self.data["steps_per_epoch"]

  @property
  def eval_split(self) -> str:
    return self.data["eval_split"]

  @property
  def num_classes(self) -> int:
    return self.data["info"].num_classes


@dataclasses.dataclass(frozen=True)
class Start:
  """Where training starts (`restore_or_init`): the host TrainState, the data iterator's
  saved state (None for a fresh run), the run's progress and its config change history
  (`run_config.CHANGES_KEY`)."""
  state: Any
  data_state: Optional[Dict[str, Any]]
  progress: Progress
  config_changes: List[Dict[str, Any]]


def setup(config, workdir: str) -> RunSetup:
  """Data, model, optimiser and a freshly initialised state; the checkpoint manager.

  The only file it creates is the workdir's checkpoints/ folder (after the data is read).
  Raises DataError (naming the file, e.g. a truncated .gz IDX file) when the data cannot
  be loaded.
  """
  method = method_lib.parse_method(config.method)
  num_devices = jax.local_device_count()
  try:
    data = recipe.input_pipeline(config, num_devices)
  except (ValueError, OSError, EOFError) as e:  # missing, truncated or malformed files
    raise DataError(f"config.dataset={config.dataset!r}: the data could not be loaded: "
                    f"{e}") from e
  steps_per_epoch = data["steps_per_epoch"]
  total_steps = int(config.num_steps) or int(round(config.num_epochs * steps_per_epoch))
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  model = recipe.build_model(config, data["info"].num_classes, axis_name=train_lib.AXIS,
                             method=method)
  tx = recipe.optimizer(config, total_steps, warmup)
  sample = _first_global_batch(data)
  state = train_lib.create_state(model, tx, sample[:2], jax.random.key(config.seed))
  manager = ckpt.make_manager(os.path.join(workdir, CHECKPOINT_DIR), config.keep_checkpoints)
  return RunSetup(config=config, workdir=workdir, method=method,
                  main=distributed.is_main_process(), num_devices=num_devices, data=data,
                  total_steps=total_steps, model=model, tx=tx, sample=sample,
                  fresh_state=state, manager=manager)


def _first_global_batch(data: Dict[str, Any]) -> jax.Array:
  """The whole first global batch's images (every process's shard, in process order):
  calibration must see the same images on every process and for every process count."""
  it0 = data["train"](0)
  first = next(it0)
  if hasattr(it0, "close"):
    it0.close()
  return jnp.asarray(distributed.allgather(
      np.asarray(first["image"]).reshape((-1,) + first["image"].shape[2:])))


def restore_or_init(run: RunSetup) -> Start:
  """Resumes from a checkpoint or initialises the state (init_from, calibration), then
  writes config.json.

  A corrupt newest checkpoint is skipped with a warning (`checkpoint.restore`); an explicit
  `config.restore_step` restores that step. Checkpoints newer than the restored step move to
  workdir/discarded_checkpoints/, and metrics.jsonl loses its lines past it.
  """
  config, workdir = run.config, run.workdir
  restored = ckpt.restore(run.manager, run.fresh_state, step=int(config.restore_step) or None)
  if restored is not None:
    moved = ckpt.set_aside_steps_after(run.manager, restored.step,
                                       os.path.join(workdir, DISCARDED_DIR))
    if moved:
      _notify(f"checkpoints of steps {moved} (after the restored step {restored.step}) moved "
              f"to {os.path.join(workdir, DISCARDED_DIR)}")
    meta = restored.meta or _read_json(os.path.join(workdir, "progress.json")) or {}
    state, data_state = restored.state, restored.data_state
    progress = Progress(step=restored.step, train_seconds=meta.get("train_seconds", 0.0),
                        fp_top1=meta.get("fp_top1"),
                        started_at=meta.get("started_at") or results_lib.utc_now())
    _notify(f"{workdir}: resumed from step {restored.step} of {run.total_steps}")
  else:
    state, fp_top1, data_state = run.fresh_state, None, None
    if config.init_from:
      state, fp_top1 = _init_from_fp(state, config.init_from)
    if run.method.quantized:
      state = train_lib.calibrate(run.model, state, run.sample)
    state = state.replace(opt_state=run.tx.init(state.params))
    progress = Progress(step=0, train_seconds=0.0, fp_top1=fp_top1,
                        started_at=results_lib.utc_now())
  saved = _read_json(os.path.join(workdir, CONFIG_FILE))
  changes = run_config.changes(saved)
  if saved is not None and (diff := run_config.config_diff(saved, config)):
    # Let through by --allow_config_change (check_workdir refused it otherwise): say so, and
    # keep the history in config.json and results.json.
    _notify(f"{workdir}: continuing from step {progress.step} with a changed config: "
            + "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff))
    changes += [{"step": progress.step, "field": k, "old": a, "new": b} for k, a, b in diff]
  if run.main:
    metrics_path = os.path.join(workdir, run_log.METRICS_FILE)
    if dropped := run_log.truncate_metrics(metrics_path, progress.step):
      _notify(f"metrics.jsonl: dropped {dropped} lines past step {progress.step}")
    saved_config = json.loads(config.to_json())
    if changes:
      saved_config[run_config.CHANGES_KEY] = changes
    results_lib.write_json_atomic(os.path.join(workdir, CONFIG_FILE), saved_config)
  return Start(state=state, data_state=data_state, progress=progress, config_changes=changes)


def _save(run: RunSetup, rstate, batches, progress: Progress, last_loss,
          on_event: OnEvent) -> None:
  """Checks the replicated state finite on the device, then saves it asynchronously at
  progress.step (with the data iterator's state and the run's progress)."""
  device_state = train_lib.unreplicate(rstate)
  ckpt.check_finite(run.manager, progress.step, device_state, last_loss)
  ckpt.save(run.manager, progress.step, jax.device_get(device_state), force=True,
            data_state=data_lib.iterator_state(batches, progress.step), meta=progress.meta(),
            wait_for_it=False)
  on_event("save", progress.step)


def _observed(batches: Iterator, on_event: OnEvent, point: str, step: int) -> Iterator:
  """The batches, with on_event(point, step) after the first one."""
  for i, batch in enumerate(batches):
    if i == 1:
      on_event(point, step)
    yield batch


def train_loop(run: RunSetup, start: Start, writer: run_log.MetricsWriter,
               on_event: OnEvent = _no_event) -> Tuple[Any, Progress]:
  """Trains from start.progress.step to stop_at_step or the end, logging, evaluating and
  checkpointing on the config's schedule; a checkpoint is written at the last step.

  Returns (the replicated state, the progress reached). Ctrl-C raises `Interrupted` after
  any save in flight completes.
  """
  config, total = run.config, run.total_steps
  teacher = None
  if run.method.kd:  # also after a resume: read init_from again
    teacher = _init_from_fp(start.state, config.init_from)[0].variables()
  train_step = train_lib.make_train_step(run.model, run.tx,
                                         recipe.loss_config(config, run.method),
                                         run.num_classes, teacher_variables=teacher,
                                         num_devices=run.num_devices)
  eval_step = make_eval_step(run)
  first = start.progress.step
  rstate = train_lib.replicate(start.state, run.num_devices)
  batches = run.data["train"](first)  # on the devices, prefetched
  data_lib.restore_iterator(batches, start.data_state, first)
  stop = min(int(config.stop_at_step) or total, total)
  eval_every = (max(1, int(config.eval_every_epochs * run.steps_per_epoch))
                if config.eval_every_epochs else 0)
  t0 = time.perf_counter()
  seconds = lambda: start.progress.train_seconds + time.perf_counter() - t0
  at = lambda step, s: dataclasses.replace(start.progress, step=step, train_seconds=s)
  bar = tqdm(total=total, initial=first, unit="step", desc=f"{config.method} {config.model}",
             disable=not (config.progress and run.main), dynamic_ncols=True, file=sys.stderr)
  done, last_loss = first, None
  try:
    for step in range(first, stop):
      rstate, metrics = train_step(rstate, next(batches))
      done = step + 1
      on_event("mid_step", done)
      # From device 0's shard (`train.unreplicate`): the loss every step, the other
      # metrics only at the steps that log them.
      last_loss = train_lib.unreplicate(metrics["loss"])
      bar.update(1)
      if done % config.log_every == 0 or done == total:
        m = {k: float(v) for k, v in jax.device_get(train_lib.unreplicate(metrics)).items()}
        if not all(math.isfinite(v) for v in m.values()):
          ckpt.check_finite(run.manager, done, None, float("nan"))
        writer.write({"step": done, "epoch": done / run.steps_per_epoch, "split": "train", **m})
        bar.set_postfix(loss=f"{m['loss']:.3f}", top1=f"{m['top1']:.3f}")
      if eval_every and done % eval_every == 0 and done < total:
        ev = evaluate(eval_step, rstate, _observed(run.data["eval"](), on_event, "eval", done))
        writer.write({"step": done, "epoch": done / run.steps_per_epoch,
                      "split": run.eval_split, **ev})
      if done % config.checkpoint_every == 0 and done < stop:
        _save(run, rstate, batches, at(done, seconds()), last_loss, on_event)
    progress = start.progress
    if stop > first:
      jax.block_until_ready(rstate)
      progress = at(stop, seconds())
      _save(run, rstate, batches, progress, last_loss, on_event)
  except KeyboardInterrupt:
    ckpt.wait(run.manager)  # a save in flight completes: the resume point is on disk
    raise Interrupted(run.workdir, done, run.manager.latest_step()) from None
  finally:
    bar.close()
    ckpt.wait(run.manager)
  return rstate, progress


def make_eval_step(run: RunSetup):
  """The pmap-ed evaluation step in the mode the run is evaluated in (quant for QAT)."""
  return train_lib.make_eval_step(run.model, run.method.mode)


def finish(run: RunSetup, rstate, progress: Progress, config_changes: List[Dict[str, Any]],
           writer: run_log.MetricsWriter, on_event: OnEvent = _no_event) -> Dict[str, Any]:
  """The final evaluation of the replicated state, results.json (docs/METHOD.md, "Results")
  and the curves' plot; returns the results."""
  config, total = run.config, run.total_steps
  ev = evaluate(make_eval_step(run), rstate,
                _observed(run.data["eval"](), on_event, "eval", total))
  writer.write({"step": total, "epoch": total / run.steps_per_epoch,
                "split": run.eval_split, "final": True, **ev})
  final = jax.device_get(train_lib.unreplicate(rstate))
  # The real sizes: the file `experiments.export --workdir` writes from this checkpoint.
  sizes = recipe.model_size_bytes(config, run.num_classes, final.variables(),
                                  source=recipe.export_source(run.workdir, total, config),
                                  method=run.method)
  bits = lambda b: int(b) if run.method.quantized else None
  results = {
      "dataset": config.dataset, "model": config.model, "method": config.method,
      "w_bits": bits(config.w_bits), "a_bits": bits(config.a_bits),
      "seed": int(config.seed), "top1": float(ev["top1"]),
      "fp_top1": None if progress.fp_top1 is None else float(progress.fp_top1),
      "train_steps": int(total), "train_seconds": float(progress.train_seconds), **sizes,
      "eval_split": run.eval_split, "eval_loss": float(ev["loss"]),
      **results_lib.provenance(run_config.config_sha256(config), run.data["source"]),
      "config_changes": config_changes,
      "started_at": progress.started_at, "finished_at": results_lib.utc_now()}
  results_lib.check_results(results)
  if run.main:
    writer.close()
    # Written whole or not at all: its presence marks the run as done.
    results_lib.write_json_atomic(os.path.join(run.workdir, results_lib.RESULTS_FILE), results)
    run_log.plot_curves(os.path.join(run.workdir, run_log.METRICS_FILE),
                        os.path.join(run.workdir, run_log.CURVES_FILE),
                        title=f"{config.dataset} {config.model} {config.method}")
  return results


def train_and_evaluate(config, workdir: str, allow_config_change: bool = False,
                       on_event: Optional[OnEvent] = None) -> Dict[str, Any]:
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
    on_event: called as on_event(point, step) at the run's fault points (`OnEvent`).
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
      return _train_and_evaluate_locked(config, workdir, on_event or _no_event)
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


def _train_and_evaluate_locked(config, workdir: str, on_event: OnEvent) -> Dict[str, Any]:
  """setup -> restore_or_init -> (post-training quantization) -> train_loop -> finish."""
  try:
    run = setup(config, workdir)
  except KeyboardInterrupt:
    raise Interrupted(workdir, None, _latest_step(workdir)) from None
  start, writer, reached = None, None, None
  try:
    start = restore_or_init(run)
    reached = start.progress.step
    writer = run_log.MetricsWriter(workdir, enabled=run.main, resume_step=start.progress.step)
    if config.ptq:  # post-training quantization instead of training (issue 22)
      run, start = ptq_run.quantize(run, start)
    rstate, progress = None, start.progress
    if progress.step < run.total_steps:
      rstate, progress = train_loop(run, start, writer, on_event)
      reached = progress.step
    if progress.step < run.total_steps:  # stopped early on purpose (stop_at_step)
      return {}
    if rstate is None:
      rstate = train_lib.replicate(start.state, run.num_devices)
    return finish(run, rstate, progress, start.config_changes, writer, on_event)
  except KeyboardInterrupt:  # outside the training loop (restore, final evaluation)
    ckpt.wait(run.manager)
    raise Interrupted(workdir, reached, run.manager.latest_step()) from None
  finally:
    if writer is not None:
      writer.close()
    run.manager.close()


def run_pipeline(config, workdir: str, allow_config_change: bool = False,
                 on_event: Optional[OnEvent] = None) -> list:
  """Runs the config: one run, or FP pretraining then QAT when pretrain_fp_epochs > 0.

  Every phase's config is validated before the first one starts. Returns [(name, results)]
  and prints the summary table.
  """
  phases = []
  if config.pretrain_fp_epochs > 0 and method_lib.parse_method(config.method).quantized:
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
    res = train_and_evaluate(cfg, wd, allow_config_change, on_event)
    if not res:  # stopped early (stop_at_step): later phases wait for it to finish
      break
    rows.append((name, res))
  if rows and distributed.is_main_process():
    print("\n" + results_lib.summary_table(rows))
  return rows
