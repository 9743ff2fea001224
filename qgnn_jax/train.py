"""Train state, the QGNN-IC loss, and pmap-ed train/eval steps (docs/METHOD.md, "Training
infrastructure").

One code path serves 1 and N local devices: every per-step function runs
under `jax.pmap(axis_name="batch")`; state leaves carry a leading device axis
(`replicate` / `unreplicate`). Batches are (devices, B / devices, ...).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qgnn_jax import distill, qat

AXIS = "batch"
Batch = Dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; a pytree of arrays (checkpointable).

  step: int32 scalar; params / batch_stats / quant_stats: the model's variable
  collections; opt_state: optax state; rng: base PRNG key (uint32 (2,) data),
  folded with the step (and device) inside the step.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  quant_stats: Any
  opt_state: Any
  rng: jax.Array

  def variables(self, params=None) -> Dict[str, Any]:
    v = {"params": self.params if params is None else params}
    if self.batch_stats:
      v["batch_stats"] = self.batch_stats
    if self.quant_stats:
      v["quant_stats"] = self.quant_stats
    return v


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static description of the training objective (hashable).

  student_mode: "fp" for full-precision training, "quant" for QAT.
  alpha / tau: AQD weight and attention temperature; feature_taps: module-path regex
  of the block outputs AQD distils (needed when alpha > 0; ViG's is
  `qgnn_jax.models.FEATURE_TAPS`); beta / bypass_prob / temperature: SQD weight, the
  teacher's per-site (stochastic_channels: per-channel) full-precision probability, KD
  temperature. aqd_form / sqd_form: names in `distill.AQD_FORMS` / `distill.SQD_FORMS`;
  sqd_act_bits: speq's activation bit choices besides each site's own (None = full
  precision). kd_weight: classic knowledge distillation from a separate, frozen FP model
  (T^2 KL at `temperature`; `make_train_step`'s teacher_variables). A zero weight removes
  that teacher pass from the program. tau,
  bypass_prob and temperature default to the ablation's validation winners (the
  paper's starting point: 1, 0.5, 1; docs/METHOD.md, "Distillation weights"); the run configs set alpha = 0.1, beta = 3 for aqd / sqd.
  """
  student_mode: str = "fp"
  alpha: float = 0.0
  tau: float = 2.0
  beta: float = 0.0
  bypass_prob: float = 0.25
  temperature: float = 2.0
  label_smoothing: float = 0.0
  feature_taps: str = ""
  aqd_form: str = "channel_mse"
  sqd_form: str = "bypass_kl"
  sqd_act_bits: Tuple[Optional[int], ...] = ()
  kd_weight: float = 0.0

  def __post_init__(self):
    if self.student_mode not in ("fp", "quant"):
      raise ValueError(f"student_mode={self.student_mode!r}; valid: 'fp', 'quant'")
    if self.alpha > 0 and not self.feature_taps:
      raise ValueError("alpha > 0 (AQD) needs feature_taps: the module-path regex of the "
                       "block outputs to distil")
    distill.AQD_FORMS.get(self.aqd_form)
    if self.beta > 0:
      self.teacher_draw()  # validates sqd_form, bypass_prob and sqd_act_bits

  def teacher_draw(self) -> qat.TeacherDraw:
    """How SQD's stochastic teacher differs from the student (`qat.TeacherDraw`)."""
    form = distill.SQD_FORMS.get(self.sqd_form)
    return qat.TeacherDraw(form.teacher, self.bypass_prob,
                           self.sqd_act_bits if form.teacher == "precision" else ())


# ----------------------------------------------------------------------------- optimiser


def make_optimizer(name: str, learning_rate: float, total_steps: int, warmup_steps: int = 0,
                   weight_decay: float = 0.05, quant_lr: Optional[float] = None,
                   momentum: float = 0.9, grad_clip: Optional[float] = None,
                   params: Any = None) -> optax.GradientTransformation:
  """AdamW (default) or SGD-momentum with linear warmup + cosine decay.

  Weight decay applies to kernels (ndim >= 2) only. Quantizer parameters (e.g. LSQ
  steps; `qat.is_quantizer_param`) get their own peak learning rate `quant_lr` (default: learning_rate)
  and no weight decay. `params` is only used to build the labels' tree.
  """
  if name not in ("adamw", "sgd"):
    raise ValueError(f"optimizer={name!r}; valid: 'adamw', 'sgd'")
  if total_steps < 1:
    raise ValueError(f"total_steps={total_steps}; valid: >= 1")

  def schedule(peak):
    return optax.warmup_cosine_decay_schedule(0.0, peak, min(warmup_steps, total_steps - 1) or 0,
                                              total_steps, end_value=0.0)

  def decay_mask(p):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.ndim >= 2 and not qat.is_quantizer_param(path), p)

  def base(peak, wd):
    if name == "adamw":
      return optax.adamw(schedule(peak), weight_decay=wd, mask=decay_mask if wd else None)
    chain = [optax.add_decayed_weights(wd, decay_mask)] if wd else []
    return optax.chain(*chain, optax.sgd(schedule(peak), momentum=momentum, nesterov=True))

  labels = lambda p: jax.tree_util.tree_map_with_path(
      lambda path, _: "quant" if qat.is_quantizer_param(path) else "default", p)
  tx = optax.multi_transform(
      {"default": base(learning_rate, weight_decay),
       "quant": base(learning_rate if quant_lr is None else quant_lr, 0.0)}, labels)
  if grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip), tx)
  return tx


# ----------------------------------------------------------------------------- state


Model = Any  # a `qat.QuantizedModel`, or a plain linen module (trained in full precision)


def as_quantized(model: Model) -> qat.QuantizedModel:
  """A plain linen module becomes a QuantizedModel without rules (full precision)."""
  return model if isinstance(model, qat.QuantizedModel) else qat.quantize_model(model, ())


def run_once(fn: Callable[..., Any], *args) -> Any:
  """fn(*args) as one program compiled at XLA backend optimisation level 0.

  For set-up code that runs once (initialisation, calibration): run eagerly, every op of a
  model's init compiles on its own (164 s for the quick start's quantized vig_digits on a
  loaded 2-core CPU, mostly threefry kernels); as one program at level 0 it compiles in
  29 s, and its run time does not matter. Values: equal to eager execution up to float
  rounding (max 6e-8 on that model's initial state). Inside a trace (jit, eval_shape) it is
  fn(*args), part of the enclosing program.
  """
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args)):
    return fn(*args)
  return jax.jit(fn).lower(*args).compile(
      compiler_options={"xla_backend_optimization_level": 0})(*args)


def create_state(model: Model, tx: optax.GradientTransformation, images: jax.Array,
                 rng: jax.Array) -> TrainState:
  """Initialises variables from a batch of images (B, H, W, C) and the optimiser state.

  The model is called as `model(images, train=False)`; `train` reaches only models whose
  `__call__` takes it (`qat.QuantizedModel`), NNX models included (docs/METHOD.md).
  Compiled as one program (`run_once`; under an enclosing jit, part of that program).
  """
  return run_once(functools.partial(_init_state, model, tx), images, rng)


def _init_state(model, tx, images, rng) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  variables = as_quantized(model).init(
      {"params": init_rng, "dropout": init_rng, "quant": init_rng}, images, train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}),
                    quant_stats=variables.get("quant_stats", {}),
                    opt_state=tx.init(params), rng=jax.random.key_data(state_rng))


def calibrate(model: Model, state: TrainState, images: jax.Array) -> TrainState:
  """Sets activation-range EMAs and learnable quantizer params from one batch (1 device).

  Used when QAT starts from FP weights: LSQ's init s = 2 mean|x| / sqrt(Q_P)
  must see the real weights and activations, not the random init. Compiled as one
  program (`run_once`; under an enclosing jit, part of that program).
  """
  return run_once(functools.partial(_calibrate, model), state, images)


def _calibrate(model, state, images) -> TrainState:
  _, new = as_quantized(model).apply(state.variables(), images, train=False, mode="quant",
                                     calibrate=True, mutable=["params", "quant_stats"])
  params = new["params"]
  return state.replace(params=params, quant_stats=new.get("quant_stats", state.quant_stats))


def from_fp(model: Any, fp_variables: Mapping[str, Any], tx: Any, images: jax.Array,
            rng: jax.Array, calibrate: bool = True):
  """A `TrainState` for QAT of `model` starting from `fp_variables`, in one call (README,
  "A model's whole life"; docs/METHOD.md, "QAT from FP variables"): the FP parameters and BN
  statistics carried over (`qat.fp_init.carry`), each quantizer site fresh and calibrated,
  a fresh optimiser state.

  model: a `qat.QuantizedModel` (linen or NNX); fp_variables: the FP model's trained
  {"params", "batch_stats"} (e.g. `state.variables()` of its training); tx: the QAT
  optimiser; images: (B, H, W, C) a batch to initialise with and calibrate on (its first
  two images shape the init); rng: a PRNG key. calibrate: set activation ranges and
  learnable quantizer params from `images` (the function `calibrate`).
  """
  state = create_state(model, tx, images[:2], rng)
  params = qat.fp_init.carry(state.params, fp_variables.get("params", {}), "params")
  batch_stats = qat.fp_init.carry(state.batch_stats, fp_variables.get("batch_stats", {}),
                                  "batch_stats")
  state = state.replace(params=params, batch_stats=batch_stats)
  if calibrate and getattr(model, "quantized", False):
    state = run_once(functools.partial(_calibrate, model), state, images)  # = calibrate()
  return state.replace(opt_state=tx.init(state.params))


def replicate(tree: Any, n: Optional[int] = None) -> Any:
  """Copies every leaf to the first n local devices (default: all), stacked on axis 0.

  The result carries pmap's own layout (NamedSharding over a 1-D `batch` mesh),
  whatever device the leaves were committed to before (e.g. restored from a
  checkpoint onto device 0).
  """
  n = n or jax.local_device_count()
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:n]), (AXIS,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
  return jax.tree.map(
      lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), sharding), tree)


def unreplicate(tree: Any) -> Any:
  """Takes this process's first device's copy of every leaf: ``(D, ...) -> (...)``, the same
  values as ``x[0]``, from the shard on that device alone.

  ``x[0]`` of an array sharded over D devices is a D-device XLA program that moves the
  slice with a collective; across processes it is a cross-process program. At a checkpoint
  save that is one such program per leaf, hundreds dispatched asynchronously: on CPU with
  gloo, 2 processes x 2 devices deadlocked in 6 of 29 launches (a device's part of one
  program waiting in an all-reduce for the other device's part, queued behind the next
  programs; tests/test_multiprocess.py). Slicing the local shard is a one-device program.
  """
  def first(x):
    if isinstance(x, jax.Array):
      shard = x.addressable_data(0)
      if shard.shape[1:] == x.shape[1:]:  # the whole first row lives on that device
        return shard[0]
    return x[0]
  return jax.tree.map(first, tree)


# ----------------------------------------------------------------------------- loss and steps


def loss_and_metrics(params: Any, state: TrainState, batch: Batch, drop_rng: jax.Array,
                     quant_rng: jax.Array, model: qat.QuantizedModel, loss_cfg: LossConfig,
                     num_classes: int, teacher_variables: Any = None):
  """L = CE(z_s, y) + alpha * AQD + beta * SQD on one device's batch.

  drop_rng drives dropout / drop-path (per device); quant_rng the SQD teacher's
  draw (the same on every device: one draw per step, `qat.TeacherDraw`).
  Returns (loss, (metrics, new_model_state)). The teacher passes (FP for AQD,
  stochastic for SQD) run only when their weight is non-zero; their outputs
  are constants and their BN/EMA updates are discarded. Student and teachers are the
  same model and parameters, called in the modes "quant" (or "fp"), "fp" and
  "stochastic"; AQD reads the `loss_cfg.feature_taps` outputs of student and FP teacher.
  """
  variables = state.variables(params)
  images = batch["image"]
  taps = distill.FeatureTaps(loss_cfg.feature_taps) if loss_cfg.alpha > 0 else None
  stats = ["batch_stats", "quant_stats"]  # mutable: batch statistics, as in training
  logits, new_state = model.apply(
      variables, images, train=True, mode=loss_cfg.student_mode, axis_name=AXIS,
      rngs={"dropout": drop_rng}, mutable=stats + (["intermediates"] if taps else []),
      capture_intermediates=taps.capture if taps else False)
  labels = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes),
                               loss_cfg.label_smoothing) if loss_cfg.label_smoothing else \
      jax.nn.one_hot(batch["label"], num_classes)
  ce = jnp.mean(optax.softmax_cross_entropy(logits, labels))
  loss = ce
  metrics = {"ce": ce, "top1": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
  teacher_vars = jax.lax.stop_gradient(variables)
  if taps:
    _, t_state = model.apply(teacher_vars, images, train=True, mode="fp", axis_name=AXIS,
                             rngs={"dropout": drop_rng}, mutable=stats + ["intermediates"],
                             capture_intermediates=taps.capture)
    aqd = distill.AQD_FORMS.get(loss_cfg.aqd_form).loss(
        taps.collect(new_state.pop("intermediates")), taps.collect(t_state["intermediates"]),
        loss_cfg.tau)
    loss = loss + loss_cfg.alpha * aqd
    metrics["aqd"] = aqd
  if loss_cfg.beta > 0:
    t_logits, _ = model.apply(teacher_vars, images, train=True, mode="stochastic",
                              teacher=loss_cfg.teacher_draw(), axis_name=AXIS,
                              rngs={"dropout": drop_rng, "quant": quant_rng}, mutable=stats)
    sqd = distill.SQD_FORMS.get(loss_cfg.sqd_form).loss(logits, t_logits,
                                                        loss_cfg.temperature)
    loss = loss + loss_cfg.beta * sqd
    metrics["sqd"] = sqd
  if loss_cfg.kd_weight > 0:
    # A separate frozen model (e.g. the FP checkpoint QAT started from), in eval mode.
    kd_logits = model.apply(jax.lax.stop_gradient(teacher_variables), images, train=False,
                            mode="fp", axis_name=AXIS)
    kd = distill.kl(logits, kd_logits, loss_cfg.temperature)
    loss = loss + loss_cfg.kd_weight * kd
    metrics["kd"] = kd
  metrics["loss"] = loss
  return loss, (metrics, new_state)


def _step_rngs(state: TrainState) -> Tuple[jax.Array, jax.Array]:
  """(dropout key: per step and device, quant key: per step) from the base key."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  drop_key, quant_key = jax.random.split(key)
  return jax.random.fold_in(drop_key, jax.lax.axis_index(AXIS)), quant_key


def train_step(state: TrainState, batch: Batch, teacher_variables: Any = None, *,
               model: qat.QuantizedModel, tx: optax.GradientTransformation,
               loss_cfg: LossConfig, num_classes: int
               ) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One optimisation step on one device's shard; call through `make_train_step`."""
  grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)
  (_, (metrics, new_model_state)), grads = grad_fn(
      state.params, state, batch, *_step_rngs(state), model, loss_cfg, num_classes,
      teacher_variables)
  grads = jax.lax.pmean(grads, AXIS)
  metrics["grad_norm"] = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # BN running stats are computed from pmean-ed batch moments (BatchNorm's
  # axis_name) and EMA ranges from synced ranges, so they already agree; the
  # pmean keeps them bit-identical across devices.
  batch_stats = jax.lax.pmean(new_model_state.get("batch_stats", state.batch_stats), AXIS)
  quant_stats = new_model_state.get("quant_stats", state.quant_stats)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            quant_stats=quant_stats, opt_state=opt_state)
  return new_state, jax.lax.pmean(metrics, AXIS)


def make_train_step(model: Model, tx: optax.GradientTransformation, loss_cfg: LossConfig,
                    num_classes: int, teacher_variables: Any = None,
                    num_devices: Optional[int] = None
                    ) -> Callable[[TrainState, Batch], Tuple[TrainState, Dict]]:
  """pmap-ed, state-donating train step: (replicated state, (D, B/D, ...) batch) -> (state, metrics).

  `model`: any linen module taking (images, train=...) quantized with
  `qat.quantize_model(model, rules)` (a plain module trains in full precision).
  teacher_variables: the frozen KD teacher's variables (same model, run in full
  precision; unreplicated), needed when loss_cfg.kd_weight > 0. They are replicated once
  onto num_devices (default: all local devices, as the state) and bound as the pmap-ed
  function's first argument: the result is then a functools.partial of it (its `func`
  lowers ahead of time with `args` first).
  """
  if loss_cfg.kd_weight <= 0:
    fn = functools.partial(train_step, model=as_quantized(model), tx=tx, loss_cfg=loss_cfg,
                           num_classes=num_classes)
    return jax.pmap(fn, axis_name=AXIS, donate_argnums=(0,))
  if teacher_variables is None:
    raise ValueError("loss_cfg.kd_weight > 0 needs teacher_variables (the frozen FP model's)")

  def with_teacher(teacher, state, batch):
    return train_step(state, batch, teacher, model=as_quantized(model), tx=tx,
                      loss_cfg=loss_cfg, num_classes=num_classes)
  step = jax.pmap(with_teacher, axis_name=AXIS, donate_argnums=(1,))
  return functools.partial(step, replicate(teacher_variables, num_devices))


def eval_step(state: TrainState, batch: Batch, *, model: qat.QuantizedModel,
              mode: str) -> Dict[str, jax.Array]:
  """Counts correct predictions on one device's shard (eval mode: EMA ranges, running BN).

  batch may carry a float 'mask' (padding = 0). Returns psum-ed sums:
  {"correct", "count", "loss_sum"}.
  """
  logits = model.apply(state.variables(), batch["image"], train=False, mode=mode, axis_name=AXIS)
  mask = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32) * mask
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]) * mask
  return jax.lax.psum({"correct": correct.sum(), "count": mask.sum(), "loss_sum": ce.sum()}, AXIS)


def make_eval_step(model: Model, mode: str) -> Callable[[TrainState, Batch], Dict]:
  return jax.pmap(functools.partial(eval_step, model=as_quantized(model), mode=mode),
                  axis_name=AXIS)


def shard_batch(batch: Dict[str, Any], num_devices: int) -> Dict[str, Any]:
  """(B, ...) -> (D, B/D, ...); B must divide by D (`qgnn_jax.data.sharding.shard_batch`)."""
  from qgnn_jax.data import sharding  # pylint: disable=g-import-not-at-top
  return sharding.shard_batch(batch, num_devices)
