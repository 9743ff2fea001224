"""experiments.bench: runs end to end on the smallest model and writes the documented JSON."""
import json

from experiments import bench

KEYS = {"method": str, "compile_s": float, "train_step_ms_median": float, "train_img_s": float,
        "eval_img_s": float, "graph_share": float}


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
    assert r["train_img_s"] > 0 and r["eval_img_s"] > 0
    assert r["graph_share"] < 1


def test_table():
  out = {"device": "d", "model": "m", "batch": 2, "results": [
      {"method": "fp", "compile_s": 1.0, "train_step_ms_median": 2.0, "train_step_ms_iqr": 0.1,
       "train_img_s": 1000.0, "eval_img_s": 3000.0, "graph_share": 0.1,
       "load_before": 1.0, "load_after": 1.0}]}
  assert "| fp |" in bench.format_table(out)
