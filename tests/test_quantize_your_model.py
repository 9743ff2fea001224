"""README "Quantize your own model": its code runs as written, and a model from another
codebase (the ResNet of flax's examples/imagenet, written out below) goes through the
same transform and train step."""
import functools
import os
import re
from typing import Any, Callable, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qgnn_jax import qat, train

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def _section_code(heading: str) -> str:
  """The python block right under `heading` (before its first ### subsection)."""
  text = open(README, encoding="utf-8").read()
  section = text.split(heading, 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
  blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
  assert len(blocks) == 1, f"expected one python block under {heading!r}"
  return blocks[0]


def test_readme_quantize_your_own_model_runs_as_written(capsys):
  scope = {"__name__": "readme_block"}
  exec(compile(_section_code("## Quantize your own model"), "README.md", "exec"), scope)
  metrics = {k: float(v[0]) for k, v in scope["metrics"].items()}
  assert all(np.isfinite(list(metrics.values()))), metrics
  assert metrics["aqd"] > 0  # the AQD term saw the tapped outputs
  v = scope["variables"]
  # conv1 and head matched the full-precision rule; conv2 and fc are quantized sites.
  assert {k for k, s in v["quant_stats"].items() if "quant" in s} == {"conv2", "fc"}
  assert scope["logits"].shape == (32, 10)
  assert "aqd" in capsys.readouterr().out


def test_readme_nnx_model_runs_as_written(capsys):
  scope = {"__name__": "readme_block"}
  exec(compile(_section_code("### An NNX model"), "README.md", "exec"), scope)
  metrics = {k: float(v[0]) for k, v in scope["metrics"].items()}
  assert all(np.isfinite(list(metrics.values()))) and metrics["aqd"] > 0, metrics
  out = capsys.readouterr().out
  assert "conv2/quant" in out and "pq 4-bit" in out and "conv1/quant" not in out


def test_readme_a_models_whole_life_runs_as_written(capsys):
  """FP training -> train.from_fp -> checkpointed loop and resume -> export -> load ->
  apply, and PTQ, as the README shows them."""
  scope = {"__name__": "readme_block"}
  cwd = os.getcwd()
  import tempfile  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    os.chdir(tmp)
    try:
      exec(compile(_section_code("### A model's whole life"), "README.md", "exec"), scope)
    finally:
      os.chdir(cwd)
  assert scope["restored"].step == 4
  fp, q = scope["fp_variables"], scope["variables"]
  # QAT started from the FP variables: BN statistics carried over (then trained on).
  assert set(q["batch_stats"]["bn1"]) == set(fp["batch_stats"]["bn1"])
  assert scope["same"] >= 0.9
  assert [c.key for c in scope["choices"]] == ["conv2/quant"]
  assert "resume at step 4" in capsys.readouterr().out


def test_rules_matching_nothing_raise_with_the_op_paths():
  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name="fc")(nn.Conv(4, (3, 3), name="conv")(x))

  rules = [qat.QuantRule("conv", w_quantizer="pq"), qat.QuantRule("fc1", w_quantizer="pq")]
  with pytest.raises(ValueError, match=r"rules\[1\] = QuantRule\(module_path='fc1'\) "
                     r"matches no op.*'conv \(conv_general_dilated\)', 'fc \(dot_general\)'"):
    qat.quantize_model(CNN(), rules).init(jax.random.key(0), jnp.zeros((1, 6, 6, 2)))


def test_describe_lists_sites_with_quantizers_and_bits():
  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name="fc")(nn.Conv(4, (3, 3), name="conv")(x).mean((1, 2)))

  lines = []
  rules = [qat.full_precision("fc"),
           qat.QuantRule(".*", w_quantizer="lsq", a_quantizer="pq", w_bits=3, a_bits=5)]
  sites = qat.describe(qat.quantize_model(CNN(), rules), jnp.zeros((2, 6, 6, 2)),
                       print_fn=lines.append)
  assert [s.key for s in sites] == ["conv/quant"]
  assert lines[1].split() == ["conv/quant", "conv_general_dilated", "lsq", "3-bit", "pq",
                              "5-bit"]


def test_models_without_train_get_no_train_argument():
  class NoTrain(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name="fc")(x)

  qm = qat.quantize_model(NoTrain(), [qat.QuantRule(".*", w_quantizer="pq", a_quantizer="pq")])
  x = jnp.ones((4, 5))
  tx = train.make_optimizer("sgd", 0.1, total_steps=4)
  state = train.calibrate(qm, train.create_state(qm, tx, x[:2], jax.random.key(0)), x)
  assert qm.apply(state.variables(), x, train=False).shape == (4, 3)


def test_export_build_names_a_rules_variables_mismatch(tmp_path):
  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(3, name="fc")(nn.Conv(4, (3, 3), name="conv")(x).mean((1, 2)))

  from qgnn_jax import export  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6, 6, 2)), jnp.float32)
  w2 = qat.quantize_model(CNN(), [qat.QuantRule(".*", w_quantizer="pq", a_quantizer="pq",
                                                w_bits=2, a_bits=2)])
  tx = train.make_optimizer("sgd", 0.1, total_steps=4)
  v = train.calibrate(w2, train.create_state(w2, tx, x[:2], jax.random.key(0)), x).variables()
  w4_rules = [qat.QuantRule(".*", w_quantizer="pq", a_quantizer="pq", w_bits=4, a_bits=4)]
  with pytest.raises(export.ExportError, match=r"site conv/quant was trained with 2-bit "
                     r"weights, the rules give 4-bit"):
    export.build(CNN(), 3, w4_rules, v, input_shape=(6, 6, 2))
  with pytest.raises(export.ExportError, match=r"rules quantize \['fc/quant'\], which the "
                     r"variables hold no trained quantizer state for"):
    export.build(CNN(), 3, [qat.QuantRule(".*", w_quantizer="pq", a_quantizer="pq", w_bits=2,
                                          a_bits=2), qat.QuantRule("fc", w_quantizer="pq")],
                 {**v, "quant_stats": {"conv": v["quant_stats"]["conv"]},
                  "params": {k: p for k, p in v["params"].items()}}, input_shape=(6, 6, 2))
  e_path = str(tmp_path / "cnn.qgx")
  export.save(e_path, export.build(w2, 3, None, v, input_shape=(6, 6, 2)))
  e = export.load(e_path, model=w2)
  e.apply(x)
  fn = e.apply_fn(True)
  e.apply(x)
  assert e.apply_fn(True) is fn and fn._cache_size() == 1  # compiled once for this shape


# --- flax examples/imagenet models.py (ResNet), written out: not ours, unmodified. ---

ModuleDef = Any


class ResNetBlock(nn.Module):
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: Tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = self.norm()(y)
    y = self.act(y)
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y)


class ResNet(nn.Module):
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int
  num_filters: int = 64
  dtype: Any = jnp.float32
  act: Callable = nn.relu
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype, axis_name="batch")
    x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
    x = norm(name="bn_init")(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = self.block_cls(self.num_filters * 2 ** i, strides=strides, conv=conv, norm=norm,
                           act=self.act)(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
    return jnp.asarray(x, self.dtype)


def test_flax_examples_resnet_pq_w4a4_with_aqd_and_sqd():
  resnet = ResNet(stage_sizes=[1, 1], block_cls=ResNetBlock, num_classes=4, num_filters=8)
  rules = [qat.full_precision("conv_init|Dense_0"),
           qat.QuantRule(".*", w_quantizer="pq", a_quantizer="pq", w_bits=4, a_bits=4)]
  model = qat.quantize_model(resnet, rules)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((8, 32, 32, 3)).astype(np.float32)
  labels = (np.arange(8) % 4).astype(np.int32)
  tx = train.make_optimizer("sgd", 0.05, total_steps=10)
  state = train.create_state(model, tx, jnp.asarray(images[:2]), jax.random.key(0))
  state = train.calibrate(model, state, jnp.asarray(images))
  sites = {"/".join(k[:-2]) for k in _paths(state.quant_stats) if k[-1] == "site"}
  assert sites == {"ResNetBlock_0/Conv_0", "ResNetBlock_0/Conv_1", "ResNetBlock_1/Conv_0",
                   "ResNetBlock_1/Conv_1", "ResNetBlock_1/conv_proj"}
  objective = train.LossConfig(student_mode="quant", alpha=0.1,
                               feature_taps=r"ResNetBlock_\d+", beta=3.0)
  step = train.make_train_step(model, tx, objective, num_classes=4)
  n = jax.local_device_count()
  rstate = train.replicate(state, n)
  batch = train.shard_batch({"image": images, "label": labels}, n)
  losses = []
  for _ in range(4):
    rstate, metrics = step(rstate, batch)
    losses.append(float(metrics["ce"][0]))
  assert all(np.isfinite(losses)) and float(metrics["aqd"][0]) > 0
  assert losses[-1] < losses[0], losses  # it learns the 8 images
  final = train.unreplicate(rstate)
  # BN statistics (flax's own BatchNorm, pmean-ed over 'batch') and EMA ranges moved.
  assert not np.allclose(final.batch_stats["bn_init"]["mean"], state.batch_stats["bn_init"]["mean"])
  assert int(final.quant_stats["ResNetBlock_0"]["Conv_0"]["quant"]["a_count"]) == 1 + 4


def _paths(tree):
  return [tuple(str(getattr(k, "key", k)) for k in p)
          for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
