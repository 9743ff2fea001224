"""qgnn_jax.export: the file (packed codes, grids, round trip), integer inference equal to
fake quantization, bad input named, and the CLI round trip on a trained workdir."""
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from qgnn_jax import export, models, qat, quant
from qgnn_jax import workdir as workdir_lib
from qgnn_jax.models import LAYER_GROUPS
from qgnn_jax.models.blocks import GroupedDense

MODEL = "vig_digits"


def _trained(method, bits, model=None, shape=None, **rule_kw):
  """(model, rules, quantized model, variables, images): random weights, quantizer params
  and activation ranges calibrated on the batch (no init compile: it is the slow one)."""
  model = model or models.create_model(MODEL, 10)
  shape = shape or models.input_shape(MODEL)
  rule_kw.setdefault("module_path", LAYER_GROUPS["body"])
  rules = (qat.QuantRule(w_quantizer=method, a_quantizer=method, w_bits=bits, a_bits=bits,
                         **rule_kw),)
  qm = qat.quantize_model(model, rules)
  x = jax.random.normal(jax.random.PRNGKey(1), (16,) + tuple(shape))
  abstract = jax.eval_shape(lambda x: qm.init(jax.random.PRNGKey(0), x, train=False), x)
  rng = np.random.default_rng(0)
  fill = lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape).astype(a.dtype)
                               if jnp.issubdtype(a.dtype, jnp.floating) else np.zeros(a.shape, a.dtype))
  v = jax.tree_util.tree_map(fill, abstract)
  if "batch_stats" in v:
    v["batch_stats"] = jax.tree_util.tree_map(lambda a: jnp.abs(a) + 0.5, v["batch_stats"])
  upd = jax.jit(lambda v, x: qm.apply(v, x, train=False, calibrate=True,
                                       mutable=["params", "quant_stats"])[1])(v, x)
  return model, rules, qm, {**v, **upd}, x


def _fake_quant(qm, v, x):
  return np.asarray(jax.jit(lambda v, x: qm.apply(v, x, train=False, mode="quant"))(v, x))


def _roundtrip(tmp_path, model, rules, v, **kw):
  path = str(tmp_path / "m.qgx")
  payload = export.build(model if kw.get("input_shape") else MODEL, 10, rules, v, **kw)
  size = export.save(path, payload)
  assert size == os.path.getsize(path) == export.nbytes(payload)
  return path, payload


class _Toy(nn.Module):
  """Every op kind a site meets: a padded conv (the offset term must see the borders), a
  grouped dense (einsum), BN, a strided conv and a dense head."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3), padding="SAME", name="conv")(x)
    x = GroupedDense(8, 2, name="gdense")(nn.gelu(x))
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    x = nn.Conv(8, (3, 3), strides=2, padding=1, name="conv2")(nn.gelu(x))
    return nn.Dense(10, name="fc")(x.mean(axis=(1, 2)))


TOY_SHAPE = (8, 8, 3)


@pytest.mark.parametrize("method,bits,sym", [("pq", 2, False), ("lsq", 4, False),
                                            ("n2uq", 2, False), ("minmax", 8, True)])
def test_integer_path_equals_fake_quant(tmp_path, method, bits, sym):
  model, rules, qm, v, x = _trained(method, bits, model=_Toy(), shape=TOY_SHAPE,
                                    module_path=".*", a_symmetric=sym)
  path, _ = _roundtrip(tmp_path, model, rules, v, input_shape=TOY_SHAPE)
  e = export.load(path, model=_Toy())
  assert len(e.plans) == 4 and all(p.integer for p in e.plans.values()), e.plans
  ref = _fake_quant(qm, v, x)
  for integer in (True, False):
    out = np.asarray(e.apply(x, integer=integer))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert (out.argmax(-1) == ref.argmax(-1)).all()


@pytest.fixture(scope="module")
def vig(tmp_path_factory):
  """A vig_digits at W2A2 pq, exported: (model, rules, qm, variables, images, path, payload)."""
  model, rules, qm, v, x = _trained("pq", 2)
  path, payload = _roundtrip(tmp_path_factory.mktemp("vig"), model, rules, v)
  return model, rules, qm, v, x, path, payload


def test_vig_integer_path(vig):
  """On the ViG: predictions as fake quantization's. (Logits agree to float rounding up to
  the k-NN: at 2 bits many node features tie exactly, and float rounding breaks ties.)"""
  _, _, qm, v, x, path, _ = vig
  e = export.load(path)
  assert len(e.plans) == 5 * 4 and all(p.integer for p in e.plans.values())
  ref = _fake_quant(qm, v, x)
  out = np.asarray(e.apply(x, integer=False))
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
  assert (np.asarray(e.apply(x)).argmax(-1) == ref.argmax(-1)).all()


def test_integer_ops_run_on_int8(vig):
  """The jaxpr of the integer path multiplies int8 operands into int32."""
  _, _, _, _, x, path, _ = vig
  e = export.load(path)
  text = str(jax.make_jaxpr(lambda v, x: e.module(True).apply(v, x))(e.variables, x))
  assert "preferred_element_type=int32" in text and "i8[" in text
  text = str(jax.make_jaxpr(lambda v, x: e.module(False).apply(v, x))(e.variables, x))
  assert "preferred_element_type=int32" not in text


def test_file_contents(vig):
  _, rules, _, v, _, path, payload = vig
  payload = export.from_bytes(export.to_bytes(payload))
  meta = payload["meta"]
  assert meta["version"] == export.VERSION and meta["model"] == MODEL
  assert meta["rules"][0]["w_quantizer"] == "pq" and meta["rules"][0]["w_bits"] == 2
  site = payload["sites"]["grapher0/gconv/quant"]
  w, a = site["w"], site["a"]
  n = math.prod(w["shape"])
  # 2-bit codes packed: ceil(n * 2 / 8) bytes; per-channel scales, zero point 0 (symmetric).
  assert w["codes"].dtype == np.uint8 and w["codes"].size == math.ceil(n * 2 / 8)
  assert w["scale"].shape == (w["shape"][0] * w["shape"][2],) and int(w["zero_point"]) == 0
  assert w["channel_axes"] == [0, 2]  # grouped kernel (G, I, O/G): output channels G x O/G
  # Activation: the EMA range, an integer zero point, the rest of the anchor as offset.
  assert set(a["state"]) == {"lo", "hi"} and a["zero_point"].dtype == np.int32
  lo, scale = float(a["state"]["lo"]), float(a["scale"])
  lowest = -2 ** (a["bits"] - 1)  # codes are signed b-bit: the grid starts at lo
  np.testing.assert_allclose(scale * (lowest - a["zero_point"]) + a["offset"], lo, atol=1e-5)
  assert abs(float(a["offset"])) <= scale / 2 + 1e-7
  # The kernel is not stored at full precision; unquantized layers are.
  assert "grapher0/gconv/kernel" not in payload["params"]
  assert "stem/conv0/kernel" in payload["params"] and "head/classifier/kernel" in payload["params"]
  # Codes round-trip: the dequantized kernel is the fake-quantized one.
  e = export.load(path)
  kernel = v["params"]["grapher0"]["gconv"]["kernel"]
  w2, how = qat.site.to_channels_last(kernel, (0, 2))
  lo_w, hi_w = quant.QUANTIZERS.get("pq").weight_range(w2, rules[0].weight_spec)
  fq = qat.site.from_channels_last(quant.fake_quant(w2, lo_w, hi_w, 2, symmetric=True), how)
  np.testing.assert_allclose(e.variables["params"]["grapher0"]["gconv"]["kernel"], fq,
                             atol=1e-6)


def test_zero_points_are_integers_lsq_and_8bit_int8(tmp_path):
  model, rules, _, v, _ = _trained("lsq", 8, model=_Toy(), shape=TOY_SHAPE, module_path=".*")
  _, payload = _roundtrip(tmp_path, model, rules, v, input_shape=TOY_SHAPE)
  for site in payload["sites"].values():
    assert site["w"]["codes"].dtype == np.int8  # 8 bits: int8, unpacked
    # LSQ's -lo/scale is 2^(b-1) up to float rounding: snapped, no offset left.
    assert float(site["w"]["offset"]) == 0.0 and float(site["a"]["offset"]) == 0.0


def test_sizes_are_the_files(vig):
  _, rules, _, v, _, _, _ = vig
  q = export.nbytes(export.build(MODEL, 10, rules, v))
  fp = export.nbytes(export.build(MODEL, 10, rules, v, fp32=True))
  n = sum(x.size for x in jax.tree_util.tree_leaves(v["params"]))
  assert q < fp / 2 and 4 * n < fp < 4 * n * 1.3 + 8000


def test_fallbacks_are_named_and_still_equal(tmp_path):
  model, rules, qm, v, x = _trained("pq", 4, model=_Toy(), shape=TOY_SHAPE, module_path=".*",
                                    a_granularity="channel")
  e = export.load(_roundtrip(tmp_path, model, rules, v, input_shape=TOY_SHAPE)[0], model=_Toy())
  assert not any(p.integer for p in e.plans.values())
  assert all("per channel" in p.reason for p in e.plans.values())
  ref = _fake_quant(qm, v, x)
  np.testing.assert_allclose(e.apply(x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def _rewrite(path, payload=None, **outer):
  data = open(path, "rb").read()
  o = serialization.msgpack_restore(data)
  if payload is not None:
    o["payload"] = serialization.msgpack_serialize(payload)
    o["sha256"] = __import__("hashlib").sha256(o["payload"]).hexdigest()
  o.update(outer)
  with open(path, "wb") as f:
    f.write(serialization.msgpack_serialize(o))


def test_bad_input_names_file_and_fault(vig, tmp_path):
  path, payload = vig[5], vig[6]
  data = open(path, "rb").read()
  with pytest.raises(FileNotFoundError):
    export.load(str(tmp_path / "missing.qgx"))
  bad = str(tmp_path / "bad.qgx")
  with open(bad, "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(export.ExportError, match=f"{bad}: .*truncated or corrupt"):
    export.load(bad)
  flipped = bytearray(data)
  flipped[len(data) // 2] ^= 0xFF
  with open(bad, "wb") as f:
    f.write(bytes(flipped))
  with pytest.raises(export.ExportError, match=f"{bad}: corrupt export .*sha256"):
    export.load(bad)
  with open(bad, "wb") as f:
    f.write(b"PK\x03\x04 not an export")
  with pytest.raises(export.ExportError, match=f"{bad}: not a"):
    export.load(bad)
  with open(bad, "wb") as f:
    f.write(data)
  _rewrite(bad, version=99)
  with pytest.raises(export.ExportError, match=f"{bad}: export format version 99; .* reads "
                     f"version {export.VERSION}"):
    export.load(bad)
  # model/rules mismatch: other bits in the rules, another model, an unknown model.
  for change, match in ((lambda m: m["rules"][0].update(w_bits=4), "mismatch: weight pq 2-bit"),
                        (lambda m: m.update(model="vig_tiny_28"), "mismatch: vig_tiny_28 takes"),
                        (lambda m: m.update(input_shape=[9, 9, 1]), "mismatch"),
                        (lambda m: m.update(model="nope"), "model 'nope'"),
                        (lambda m: m["rules"][0].update(module_path="head/.*"), "mismatch")):
    meta = json.loads(payload["meta"])
    change(meta)
    with open(bad, "wb") as f:
      f.write(data)
    _rewrite(bad, {**payload, "meta": json.dumps(meta)})
    with pytest.raises(export.ExportError, match=f"{bad}: .*{match}"):
      export.load(bad)


def test_cli_bad_export_is_one_line(tmp_path):
  bad = tmp_path / "bad.qgx"
  bad.write_bytes(b"\x00\x01garbage")
  r = subprocess.run([sys.executable, "-m", "experiments.evaluate", "--export", str(bad)],
                     capture_output=True, text=True, timeout=120,
                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert r.returncode == 1 and "Traceback" not in r.stderr
  assert r.stderr.strip().startswith(f"error: {bad}: not a readable qgnn-jax export")


@pytest.mark.slow  # trains a run (train-step compile): ~2 min on a shared 2-core CPU
def test_workdir_export_load_evaluate_round_trip(tmp_path):
  """experiments.export + experiments.evaluate --export on a trained (1-step) QAT run."""
  from experiments.configs import quickstart  # pylint: disable=g-import-not-at-top
  from qgnn_jax import experiment  # pylint: disable=g-import-not-at-top
  c = quickstart.get_config()
  c.update(pretrain_fp_epochs=0.0, method="pq", num_steps=1, batch_size=32,
           eval_batch_size=360, checkpoint_every=1, eval_every_epochs=0.0, progress=False)
  wd = str(tmp_path / "qat")
  res = experiment.train_and_evaluate(c, wd)
  out = workdir_lib.export_workdir(wd, str(tmp_path / "m.qgx"))
  assert (out["bytes"], out["bytes_fp32"]) == \
      (res["model_bytes_quantized"], res["model_bytes_fp32"])
  ev = workdir_lib.evaluate_export(str(tmp_path / "m.qgx"), compare=True)
  assert ev["count"] == 359 and ev["integer_sites"] == ev["sites"] > 0  # digits test split
  assert ev["top1_integer"] == ev["top1_checkpoint"] == pytest.approx(res["top1"])
  assert ev["integer_vs_checkpoint"]["differing_predictions"] == 0
