"""train.make_optimizer: weight decay on kernels only (not biases, BN, quantizer steps), linear
warmup then cosine decay to 0, grad_clip on the global norm, quantizer params at quant_lr.

Each property is read off one optax update of a tiny params tree (no model, no compile of
note): with zero gradients AdamW's update is the decay alone, -lr_t * wd * p, so it shows
both the mask and the schedule's lr_t."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qgnn_jax import train as T


def _params():
  return {"dense": {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.full((2,), 2.0),
                    "quant": {"w_step": jnp.full((), 2.0)}},
          "bn": {"scale": jnp.full((2,), 2.0)}}


def _updates(tx, params, grads, steps):
  """The update of each of `steps` successive steps (params held fixed)."""
  state, out = tx.init(params), []
  for _ in range(steps):
    upd, state = tx.update(grads, state, params)
    out.append(jax.device_get(upd))
  return out


def test_weight_decay_only_on_kernels_and_the_warmup_cosine_schedule():
  peak, wd, total, warmup = 0.1, 0.05, 10, 3
  params = _params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  ups = _updates(T.make_optimizer("adamw", peak, total, warmup, weight_decay=wd), params,
                 zeros, total)
  for t, u in enumerate(ups):
    # Not decayed: biases, BN scales, quantizer steps (ndim < 2, or a site's parameter).
    assert float(np.abs(u["dense"]["bias"]).max()) == 0.0
    assert float(np.abs(u["bn"]["scale"]).max()) == 0.0
    assert float(u["dense"]["quant"]["w_step"]) == 0.0
    lr_t = peak * t / warmup if t < warmup else \
        peak * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))
    np.testing.assert_allclose(u["dense"]["kernel"], -lr_t * wd * 2.0, rtol=1e-5, atol=1e-9,
                               err_msg=f"step {t}")
  # The schedule reaches its peak after the warmup and 0 at the end.
  assert float(np.abs(ups[warmup]["dense"]["kernel"]).max()) == pytest.approx(peak * wd * 2)


def test_grad_clip_bounds_the_global_norm_and_quant_lr_applies_to_quantizer_params():
  lr, qlr, clip, mu = 0.1, 0.01, 1.0, 0.9
  params = _params()
  grads = jax.tree.map(lambda x: jnp.full_like(x, 3.0), params)
  gnorm = math.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grads)))
  assert gnorm > clip
  for grad_clip, scale in ((None, 1.0), (clip, clip / gnorm)):
    u, = _updates(T.make_optimizer("sgd", lr, 10, 0, weight_decay=0.0, quant_lr=qlr,
                                   grad_clip=grad_clip), params, grads, 1)
    # SGD with Nesterov momentum, first step: -lr (1 + mu) g, g clipped to the global norm.
    np.testing.assert_allclose(u["dense"]["kernel"], -lr * (1 + mu) * 3.0 * scale, rtol=1e-5)
    np.testing.assert_allclose(u["dense"]["quant"]["w_step"], -qlr * (1 + mu) * 3.0 * scale,
                               rtol=1e-5)
