"""The ablation sweep's planning and reporting (no training here; see test_experiment)."""
from experiments import sweep
from experiments.configs import fashion_mnist_ablation, fashion_mnist_ablation_cpu


def _res(method, bits, seed, top1):
  return {"run": f"{method}_{bits}_{seed}", "method": method, "w_bits": bits, "a_bits": bits,
          "seed": seed, "top1": top1}


def test_plan_covers_protocol():
  cfg = fashion_mnist_ablation.get_config()
  fp = sweep.fp_runs(cfg)
  assert [r.name for r in fp] == ["fp_s0", "fp_s1", "fp_s2"]
  runs = sweep.main_runs(cfg, "/w", {"lam": "2.5", "quant_lr": "2e-3"})
  names = {r.name for r in runs}
  methods = cfg.methods.split(",")
  assert len(runs) == len(methods) * (2 + 3) + 2 * 2
  assert "pq_aqd_sqd_w2a2_s2" in names and "lsq_w3a3_s1" in names and "pq_w3a3_s0" not in names
  by_name = {r.name: dict(r.overrides) for r in runs}
  assert by_name["pq_w4a4_s1"]["init_from"] == "/w/fp_s1"
  assert by_name["pq_w4a4_s1"]["lam"] == "2.5" and "quant_lr" not in by_name["pq_w4a4_s1"]
  assert by_name["lsq_w2a2_s0"]["quant_lr"] == "2e-3"
  assert all(dict(r.overrides)["eval_on"] == "test" for r in runs)
  points = sweep.sweep_runs(cfg, "/w")
  assert all(dict(r.overrides)["eval_on"] == "validation" for _, _, r in points)
  assert {f for f, _, _ in points} == {"lam", "w_symmetric", "aqd_alpha", "aqd_tau", "sqd_beta",
                                       "sqd_p", "sqd_temperature", "quant_lr"}


def test_cpu_plan_shares_one_fp_checkpoint_and_is_seed_major():
  cfg = fashion_mnist_ablation_cpu.get_config()
  assert [r.name for r in sweep.fp_runs(cfg)] == ["fp_s0"]
  runs = sweep.main_runs(cfg, "/w", {})
  assert {dict(r.overrides)["init_from"] for r in runs} == {"/w/fp_s0"}
  bits = [int(dict(r.overrides)["w_bits"]) for r in runs]
  seeds = [int(dict(r.overrides)["seed"]) for r in runs]
  n = len(runs) - 2 * 2
  assert bits[n:] == [3] * 4 and 3 not in bits[:n]  # W3A3 last
  assert seeds[:n] == sorted(seeds[:n])  # every cell has seed 0 before any has seed 1
  assert set(bits[:len(cfg.methods.split(","))]) == {2}  # W2A2 first
  assert len(runs) == len(set(r.name for r in runs)) == 6 * 3 + 6 * 2 + 2 * 2


def test_pick_winners_by_mean_validation():
  pts = [("lam", "2", _res("pq", 4, 0, 0.90)), ("lam", "3", _res("pq", 4, 0, 0.91)),
         ("lam", "2", _res("pq", 2, 0, 0.80)), ("lam", "3", _res("pq", 2, 0, 0.70)),
         ("tau", "1", None)]
  winners, rows = sweep.pick_winners(pts)
  assert winners == {"lam": "2"} and len(rows) == 4
  table = sweep.summarize_sweeps(rows, winners).splitlines()
  assert len(table) == 2 + 2  # header, rule, one line per (field, method, bits)
  assert "| lam | pq | W4A4 | **2: 90.00**, 3: 91.00 | 2 |" in table
  assert "| lam | pq | W2A2 | **2: 80.00**, 3: 70.00 | 2 |" in table


def test_summary_and_plot(tmp_path):
  res = [_res("pq", 4, 0, 0.9), _res("pq", 4, 1, 0.92), _res("lsq", 2, 0, 0.5)]
  table = sweep.summarize(res, [_res("fp", None, 0, 0.95)], {"pq": 1.0, "lsq": 1.2})
  assert "| pq | 91.00 ± 1.41 (n=2) | - | 1.00x |" in table
  assert "| lsq | - | 50.00 ± 0.00 (n=1) | 1.20x |" in table
  assert "fp (32-bit) | 95.00" in table
  sweep.plot(res, [], str(tmp_path / "p.png"))
  assert (tmp_path / "p.png").stat().st_size > 1000
