"""experiments.bench: runs end to end on the smallest model and writes the documented JSON."""
import json

import pytest

from experiments import bench

KEYS = {"method": str, "compile_s": float, "train_step_ms_median": float, "train_img_s": float,
        "eval_img_s": float, "graph_share": float, "lower_s": float, "xla_compile_s": float,
        "first_step_s": float}


def test_bench_json_schema(tmp_path):
  path = tmp_path / "out" / "bench.json"
  bench.run_bench("vig_digits", 4, ["fp", "pq"], steps=2, warmup=1,
                  json_path=str(path), progress=False, verbose=False,
                  model_kwargs={"depth": 1})  # one block: the same code, a quarter of the compile
  out = json.loads(path.read_text())
  assert set(out) == {"device", "model", "batch", "params", "flops_per_image", "results"}
  assert out["params"] > 1000 and out["flops_per_image"] > 1e5
  assert isinstance(out["device"], str) and out["device"]
  assert out["model"] == "vig_digits" and out["batch"] == 4
  assert [r["method"] for r in out["results"]] == ["fp", "pq"]
  for r in out["results"]:
    for k, t in KEYS.items():
      assert isinstance(r[k], t), (k, r[k])
    assert r["compile_s"] > 0 and r["train_step_ms_median"] > 0
    phases = r["lower_s"] + r["xla_compile_s"] + r["first_step_s"]
    assert min(r["lower_s"], r["xla_compile_s"], r["first_step_s"]) > 0
    assert phases == pytest.approx(r["compile_s"], abs=3e-3)  # the three phases are the first call
    assert r["train_img_s"] > 0 and r["eval_img_s"] > 0
    assert r["graph_share"] < 1


def test_table():
  out = {"device": "d", "model": "m", "batch": 2, "results": [
      {"method": "fp", "compile_s": 1.0, "train_step_ms_median": 2.0, "train_step_ms_iqr": 0.1,
       "train_img_s": 1000.0, "eval_img_s": 3000.0, "graph_share": 0.1,
       "load_before": 1.0, "load_after": 1.0}]}
  assert "| fp |" in bench.format_table(out)


def test_methods_come_from_the_registry():
  from qgnn_jax import quant
  methods = bench.METHODS
  assert methods[0] == "fp" and len(set(methods)) == len(methods)
  assert set(quant.QUANTIZERS.names()) <= set(methods)
  assert {"pq+aqd", "pq+sqd", "pq+aqd+sqd"} <= set(methods)

  class Toy(quant.Quantizer):
    name = "benchtoy"

  quant.register(Toy())
  try:
    assert "benchtoy" in bench.METHODS  # read from the registry, not a fixed list
  finally:
    quant.unregister("benchtoy")
  assert "benchtoy" not in bench.METHODS
  with pytest.raises(ValueError, match="method='dorefa'"):
    bench.run_bench("vig_digits", 4, ["fp", "dorefa"], progress=False, verbose=False)


def test_loss_config_and_models_follow_the_recipe():
  from qgnn_jax import qat
  from qgnn_jax.models import FEATURE_TAPS, LAYER_GROUPS
  full = bench.loss_config("pq+aqd+sqd")
  assert (full.student_mode, full.alpha, full.beta, full.feature_taps) == (
      "quant", 1.0, 1.0, FEATURE_TAPS)
  fp = bench.loss_config("fp")
  assert (fp.student_mode, fp.alpha, fp.beta) == ("fp", 0.0, 0.0)
  model, init_model = bench.build_models("vig_digits", "lsq+sqd", 10, depth=1)
  assert isinstance(model, qat.QuantizedModel) and model.rules == init_model.rules
  from qgnn_jax.recipe import GELU_INPUTS
  gelu_fed, rule = model.rules  # the body's GELU-fed ops (LSQ's GELU grid), then the rest
  assert gelu_fed.module_path == GELU_INPUTS["body"]
  assert (rule.module_path, rule.w_quantizer, rule.a_quantizer, rule.w_bits, rule.a_bits) == (
      LAYER_GROUPS["body"], "lsq", "lsq", 4, 4)
  assert model.original.axis_name == "batch" and init_model.original.axis_name is None
  assert model.original.depth == 1
  assert bench.build_models("vig_digits", "fp", 10)[0].rules == ()
