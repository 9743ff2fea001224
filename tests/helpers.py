"""Shared test helpers (imported by the test modules; pytest puts tests/ on sys.path)."""
import functools

import jax
import numpy as np


def host_variables(module, *args, seed: int = 0, step: float = 1.0, **kwargs):
  """Variables with the shapes of `module.init(key, *args, **kwargs)`, filled on the host.

  No RNG or init compile (jax.eval_shape only): kernels ~ N(0, 1/fan_in), biases, BN means and
  position embeddings ~ N(0, 0.1^2), BN scales/variances ~ U(0.5, 1.5), LSQ steps = `step`,
  bit-width records = the module's cfg.w_bits, everything else (EMA ranges, counters) zero.
  """
  shapes = jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.PRNGKey(0), *args)
  rng = np.random.default_rng(seed)
  bits = getattr(getattr(module, "cfg", None), "w_bits", 4)

  def fill(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "kernel":
      fan_in = s.shape[-2] if len(s.shape) == 3 else int(np.prod(s.shape[:-1]))
      return np.asarray(rng.standard_normal(s.shape) / np.sqrt(fan_in), s.dtype)
    if name in ("bias", "mean", "pos_embed"):
      return np.asarray(0.1 * rng.standard_normal(s.shape), s.dtype)
    if name in ("scale", "var"):
      return np.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype)
    if name in ("w_step", "a_step"):
      return np.full(s.shape, step, s.dtype)
    if name == "site":
      return np.full(s.shape, bits, s.dtype)
    return np.zeros(s.shape, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def tiny_fp_config(**overrides):
  """The tests' tiny FP run: the quick start's config, vig_digits, 4 steps of batch 32, no
  pretraining phase, a checkpoint every 2 steps; `overrides` set fields on top."""
  from experiments.configs import quickstart  # pylint: disable=g-import-not-at-top
  c = quickstart.get_config()
  c.pretrain_fp_epochs, c.method, c.num_steps, c.batch_size = 0.0, "fp", 4, 32
  c.eval_batch_size, c.log_every, c.checkpoint_every, c.progress = 400, 1, 2, False
  c.eval_every_epochs = 0.0
  for k, v in overrides.items():
    setattr(c, k, v)
  return c
