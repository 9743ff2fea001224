"""The ablation sweep's planning and reporting (no training here; see test_experiment)."""
import json
import os

import pytest

from experiments import sweep_exec, sweep_plan, sweep_report
from experiments.configs import fashion_mnist_ablation, fashion_mnist_ablation_cpu


def _res(method, bits, seed, top1):
  return {"run": f"{method}_{bits}_{seed}", "method": method, "w_bits": bits, "a_bits": bits,
          "seed": seed, "top1": top1}


def test_plan_covers_protocol():
  cfg = fashion_mnist_ablation.get_config()
  fp = sweep_plan.fp_runs(cfg)
  assert [r.name for r in fp] == ["fp_s0", "fp_s1", "fp_s2"]
  runs = sweep_plan.main_runs(cfg, "/w", {"lam": "2.5", "quant_lr": "2e-3"})
  names = {r.name for r in runs}
  methods = cfg.methods.split(",")
  assert len(runs) == len(methods) * (2 + 3) + 2 * 2
  assert "pq_aqd_sqd_w2a2_s2" in names and "lsq_w3a3_s1" in names and "pq_w3a3_s0" not in names
  by_name = {r.name: dict(r.overrides) for r in runs}
  assert by_name["pq_w4a4_s1"]["init_from"] == "/w/fp_s1"
  assert by_name["pq_w4a4_s1"]["lam"] == "2.5" and "quant_lr" not in by_name["pq_w4a4_s1"]
  assert by_name["lsq_w2a2_s0"]["quant_lr"] == "2e-3"
  # A winner belongs to the methods that have the swept method's parts, and no others.
  runs = sweep_plan.main_runs(cfg, "/w", {"lam": "2.5", "quant_lr": "2e-3", "aqd_alpha": "0.3",
                                     "sqd_p": "0.25"})
  settings = {r.name: dict(r.overrides) for r in runs}
  used = {m: {k for k in ("lam", "quant_lr", "aqd_alpha", "sqd_p") if k in settings[m]}
          for m in ("minmax_w2a2_s0", "lsq_w2a2_s0", "pq_w2a2_s0", "pq_aqd_w2a2_s0",
                    "pq_sqd_w2a2_s0", "pq_aqd_sqd_w2a2_s0")}
  assert used == {"minmax_w2a2_s0": set(), "lsq_w2a2_s0": {"quant_lr"},
                  "pq_w2a2_s0": {"lam"}, "pq_aqd_w2a2_s0": {"lam", "aqd_alpha"},
                  "pq_sqd_w2a2_s0": {"lam", "sqd_p"},
                  "pq_aqd_sqd_w2a2_s0": {"lam", "aqd_alpha", "sqd_p"}}
  # A grid winner found with pq sets min-max's grid too (claim (1) on one grid), not LSQ's.
  runs = sweep_plan.main_runs(cfg, "/w", {"w_symmetric": "False"})
  grid = {r.name: dict(r.overrides).get("w_symmetric") for r in runs}
  assert grid["minmax_w2a2_s0"] == grid["pq_aqd_sqd_w2a2_s0"] == "False"
  assert grid["lsq_w2a2_s0"] is None
  assert all(dict(r.overrides)["eval_on"] == "test" for r in runs)
  points = sweep_plan.sweep_runs(cfg, "/w")
  assert all(dict(r.overrides)["eval_on"] == "validation" for _, _, r in points)
  assert {f for f, _, _ in points} == {"lam", "w_symmetric", "aqd_alpha", "aqd_tau", "sqd_beta",
                                       "sqd_p", "sqd_temperature", "quant_lr"}


def test_cpu_plan_shares_one_fp_checkpoint_and_is_seed_major():
  cfg = fashion_mnist_ablation_cpu.get_config()
  assert [r.name for r in sweep_plan.fp_runs(cfg)] == ["fp_s0"]
  runs = sweep_plan.main_runs(cfg, "/w", {})
  assert {dict(r.overrides)["init_from"] for r in runs} == {"/w/fp_s0"}
  assert sweep_plan.main_cells(cfg) == [(2, 0), (2, 1), (4, 0), (2, 2), (4, 1), (3, 0), (3, 1)]
  assert [r.name for r in runs[:2]] == ["minmax_w2a2_s0", "lsq_w2a2_s0"]
  assert len(runs) == len(set(r.name for r in runs)) == 6 * 3 + 6 * 2 + 2 * 2
  # Without main_order: seed-major over cfg.bits, W3A3 last.
  cfg.main_order = ""
  assert sweep_plan.main_cells(cfg) == [(2, 0), (4, 0), (2, 1), (4, 1), (2, 2), (3, 0), (3, 1)]
  for bad in ("2:0,4:0", "2-0"):
    cfg.main_order = bad
    with pytest.raises(ValueError, match="each \\(bits:seed\\) cell once"):
      sweep_plan.main_cells(cfg)
  cfg.main_order = ""
  cfg.bits = "4,3,2"  # W3A3 comes from seeds and w3_methods only: never twice
  with pytest.raises(ValueError, match="W3A3 is set by seeds"):
    sweep_plan.main_cells(cfg)
  cfg.bits = "8,2"
  with pytest.raises(ValueError, match="bits \\[8\\] have no seed count"):
    sweep_plan.main_cells(cfg)


def test_sweep_points_at_the_default_share_one_run(tmp_path):
  cfg = fashion_mnist_ablation_cpu.get_config()
  points = sweep_plan.sweep_runs(cfg, str(tmp_path))
  by = {(f, v): r.name for f, v, r in points}
  # lambda = 3 and w_symmetric = True are both the run's defaults: the same run.
  assert by[("lam", "3")] == by[("w_symmetric", "True")] == "pq_w2a2_s0_default"
  assert by[("lam", "2.5")] == "pq_w2a2_s0_lam2.5"
  assert by[("w_symmetric", "False")] == "pq_w2a2_s0_w_symmetricFalse"
  # execute() trains a shared run once and hands its result to every point.
  os.makedirs(tmp_path / "pq_w2a2_s0_default")
  (tmp_path / "pq_w2a2_s0_default" / "results.json").write_text(json.dumps(
      {"method": "pq", "w_bits": 2, "top1": 0.5}))
  res = sweep_exec.execute([r for _, _, r in points], cfg, str(tmp_path), 2, run_missing=False)
  got = {(f, v): x for (f, v, _), x in zip(points, res)}
  assert got[("lam", "3")]["top1"] == got[("w_symmetric", "True")]["top1"] == 0.5
  assert got[("lam", "2")] is None
  cfg.sweeps = "no_such_field:pq:2:1,2"
  with pytest.raises(ValueError, match="no_such_field"):
    sweep_plan.sweep_runs(cfg, str(tmp_path))


def test_pick_winners_by_mean_validation():
  pts = [("lam", "2", _res("pq", 4, 0, 0.90)), ("lam", "3", _res("pq", 4, 0, 0.91)),
         ("lam", "2", _res("pq", 2, 0, 0.80)), ("lam", "3", _res("pq", 2, 0, 0.70)),
         ("tau", "1", None)]
  winners, rows = sweep_report.pick_winners(pts)
  assert winners == {"lam": "2"} and len(rows) == 4
  table = sweep_report.summarize_sweeps(rows, winners).splitlines()
  assert len(table) == 2 + 2  # header, rule, one line per (field, method, bits)
  assert "| lam | pq | W4A4 | **2: 90.00**, 3: 91.00 | 2 |" in table
  assert "| lam | pq | W2A2 | **2: 80.00**, 3: 70.00 | 2 |" in table


def test_summary_and_plot(tmp_path):
  res = [_res("pq", 4, 0, 0.9), _res("pq", 4, 1, 0.92), _res("lsq", 2, 0, 0.5)]
  table = sweep_report.summarize(res, [_res("fp", None, 0, 0.95)], {"pq": 1.0, "lsq": 1.2})
  assert "| pq | 91.00 ± 1.41 (n=2) | - | 1.00x |" in table
  assert "| lsq | - | 50.00 ± 0.00 (n=1) | 1.20x |" in table
  assert "| fp (32-bit) | 95.00 ± 0.00 (n=1) | - | - |" in table
  sweep_report.plot(res, [], str(tmp_path / "p.png"))
  assert (tmp_path / "p.png").stat().st_size > 1000


def test_claims_table_verdicts():
  cfg = fashion_mnist_ablation.get_config()  # the claims and the FP-gap row come from it
  res = ([_res("pq", 2, s, t) for s, t in enumerate((0.80, 0.82))]
         + [_res("minmax", 2, s, t) for s, t in enumerate((0.70, 0.72))]     # +10: holds
         + [_res("pq+aqd", 2, s, t) for s, t in enumerate((0.80, 0.84))]     # +1, std 2.8
         + [_res("pq+sqd", 2, s, t) for s, t in enumerate((0.79, 0.79))]     # -2: no
         + [_res("pq+aqd+sqd", 2, 0, 0.9)])                                  # n = 1
  table = sweep_report.summarize_claims(res, [_res("fp", 32, 0, 0.95)], cfg.claims,
                                       cfg.fp_gap_method, cfg.fp_gap_label).splitlines()
  assert table[0] == "| claim | W2A2 |"
  assert "| (1) PQ's range beats min-max | +10.00 (holds) |" in table
  assert "| (2) AQD improves PQ | +1.00 (gain < 1 std) |" in table
  assert "| (3) SQD improves PQ | -2.00 (no) |" in table
  assert "| (4) PQ+AQD+SQD beats LSQ | - |" in table  # no lsq cell
  assert "| (4') PQ+AQD+SQD beats min-max | +19.00 (n < 2) |" in table
  assert table[-1] == "| pq+aqd+sqd minus FP (target > -0.5 at W4A4) | -5.00 |"


def test_existing_run_with_other_settings_is_refused(tmp_path, monkeypatch):
  cfg = fashion_mnist_ablation_cpu.get_config()
  run = sweep_plan.main_runs(cfg, str(tmp_path), {"lam": "2.5"})[2]
  assert run.name == "pq_w2a2_s0"
  wd = tmp_path / run.name
  os.makedirs(wd)
  (wd / "results.json").write_text(json.dumps({"method": "pq", "w_bits": 2, "top1": 0.8}))
  saved = {"method": "pq", "w_bits": 2, "a_bits": 2, "lam": 2.5, "init_from":
           str(tmp_path / "fp_s0")}
  (wd / "config.json").write_text(json.dumps(saved))
  assert sweep_exec.execute([run], cfg, str(tmp_path), 1, run_missing=False)[0]["top1"] == 0.8
  (wd / "config.json").write_text(json.dumps({**saved, "lam": 3.0}))
  # Reporting skips it (and says so); running refuses before anything starts.
  assert sweep_exec.execute([run], cfg, str(tmp_path), 1, run_missing=False) == [None]
  with pytest.raises(ValueError, match="lam=3.0 but the plan asks lam=2.5; .*--rerun_stale"):
    sweep_exec.execute([run], cfg, str(tmp_path), 1, run_missing=True)
  # rerun_stale: past the deadline the run is neither started nor moved ...
  (wd / "config.json").write_text(json.dumps({**saved, "lam": 3.0}))
  assert sweep_exec.execute([run], cfg, str(tmp_path), 1, deadline=1.0, rerun_stale=True) == [None]
  assert json.loads((wd / "config.json").read_text())["lam"] == 3.0
  # ... otherwise the old run is kept aside (never overwriting one kept before) and rerun.
  def fake_run(cmd, **kw):
    d = next(a.split("=", 1)[1] for a in cmd if a.startswith("--workdir="))
    with open(os.path.join(d, "config.json"), "w") as f:
      json.dump({**saved, "lam": 2.5}, f)
    with open(os.path.join(d, "results.json"), "w") as f:
      json.dump({"method": "pq", "w_bits": 2, "top1": 0.9}, f)
    return 0
  monkeypatch.setattr(sweep_exec.subprocess, "call", fake_run)
  for n, kept in enumerate(("pq_w2a2_s0", "pq_w2a2_s0.1")):
    (wd / "config.json").write_text(json.dumps({**saved, "lam": 3.0 + n}))
    assert sweep_exec.execute([run], cfg, str(tmp_path), 1, rerun_stale=True)[0]["top1"] == 0.9
    assert json.loads((tmp_path / "stale" / kept / "config.json").read_text())["lam"] == 3.0 + n
  assert sweep_exec.execute([run], cfg, str(tmp_path), 1)[0]["top1"] == 0.9  # now it matches
  # A fine-tune is refused once its FP checkpoint has been retrained after it started.
  fp = tmp_path / "fp_s0"
  os.makedirs(fp)
  (fp / "results.json").write_text("{}")
  os.utime(fp / "results.json", (os.path.getmtime(wd / "config.json") + 10,) * 2)
  with pytest.raises(ValueError, match="fine-tuned from an earlier .*fp_s0"):
    sweep_exec.execute([run], cfg, str(tmp_path), 1)
  # A results.json that cannot be parsed counts as missing (reporting does not crash).
  os.utime(fp / "results.json", (os.path.getmtime(wd / "config.json") - 10,) * 2)
  (wd / "results.json").write_text('{"top1": 0.')
  assert sweep_exec.execute([run], cfg, str(tmp_path), 1, run_missing=False) == [None]
  assert sweep_plan.same_value("5e-4", 0.0005) and sweep_plan.same_value("True", True)
  assert not sweep_plan.same_value("False", True) and not sweep_plan.same_value("a", "b")


@pytest.mark.parametrize("module", [fashion_mnist_ablation, fashion_mnist_ablation_cpu])
def test_sweep_plan_does_not_move_with_code_defaults(module, monkeypatch):
  """Every swept field is pinned by sweep_centre, so making a winner the code default
  neither renames a sweep point nor changes what its `_default` run trains with."""
  cfg = module.get_config()
  assert {f for f, _, _, _ in sweep_plan.parse_sweeps(cfg.sweeps)} <= set(cfg.sweep_centre)
  before = [(f, v, r) for f, v, r in sweep_plan.sweep_runs(cfg, "/w")]
  defaults = sweep_plan.run_defaults(cfg)
  moved = {**defaults, "aqd_alpha": 0.1, "sqd_p": 0.25, "lam": 2.0, "w_symmetric": False}
  monkeypatch.setattr(sweep_plan, "run_defaults", lambda c: moved)
  assert sweep_plan.sweep_runs(cfg, "/w") == before


def test_report_takes_claims_and_title_from_the_config(tmp_path):
  """write_main_report: the CSV has qgnn_jax.results.CSV_FIELDS; claims, the FP-gap row and
  the plot title are the config's (a config with other claims gets other rows)."""
  from qgnn_jax import results
  cfg = fashion_mnist_ablation_cpu.get_config()
  cfg.claims = (("lsq beats pq", "lsq", "pq"),)
  cfg.fp_gap_method, cfg.fp_gap_label, cfg.plot_title = "lsq", "lsq gap", "my title"
  cfg.bench_json = ""
  res = [_res("pq", 2, s, t) for s, t in enumerate((0.80, 0.82))] + \
      [_res("lsq", 2, s, t) for s, t in enumerate((0.85, 0.86))]
  table = sweep_report.write_main_report(str(tmp_path), cfg, res + [None],
                                         [_res("fp", None, 0, 0.9)])
  assert "| lsq beats pq | +4.50 (holds) |" in table and "| lsq gap | -4.50 |" in table
  assert "PQ's range" not in table
  with open(tmp_path / "ablation.csv") as f:
    assert f.readline().strip().split(",") == list(results.CSV_FIELDS)
  assert (tmp_path / "accuracy_vs_bits.png").stat().st_size > 1000
  titles = []
  import matplotlib.axes
  orig = matplotlib.axes.Axes.set_title
  def spy(self, label, *a, **k):
    titles.append(label)
    return orig(self, label, *a, **k)
  matplotlib.axes.Axes.set_title = spy
  try:
    sweep_report.plot(res, [], str(tmp_path / "p.png"), cfg.plot_title)
  finally:
    matplotlib.axes.Axes.set_title = orig
  assert titles == ["my title"]


def test_sweep_without_config_is_a_usage_error():
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-m", "experiments.sweep"], cwd=root,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  assert "--config is required" in out.stderr and "Traceback" not in out.stderr


def test_fixed_settings_apply_per_method_and_override_winners():
  """cfg.fixed: settings chosen earlier apply like winners, per (field, method)."""
  from experiments.configs import fashion_mnist_claims_cpu
  cfg = fashion_mnist_claims_cpu.get_config()
  runs = {r.name: dict(r.overrides)
          for r in sweep_plan.main_runs(cfg, "/w", {"lam": "3", "aqd_alpha": "1"})}
  assert len(runs) == 7 * (3 + 2 + 2)
  assert runs["lsq_w3a3_s1"]["quant_lr"] == "5e-3"
  assert runs["n2uq_w2a2_s0"]["quant_lr"] == "5e-5"
  assert "quant_lr" not in runs["pq_w2a2_s0"] and "lam" not in runs["n2uq_w4a4_s0"]
  assert runs["pq_w4a4_s0"]["lam"] == "2.5"  # fixed beats the sweep's winner
  assert runs["pq_aqd_sqd_w2a2_s2"]["sqd_form"] == "stochastic_channels"
  assert runs["pq_aqd_sqd_w2a2_s2"]["aqd_alpha"] == "0.3"
  assert "sqd_form" not in runs["pq_aqd_w2a2_s0"] and "aqd_form" not in runs["pq_sqd_w2a2_s0"]
  assert runs["minmax_w2a2_s0"]["w_symmetric"] == "True"  # a grid field reaches min-max
  with pytest.raises(ValueError, match="field:method:value"):
    sweep_plan.parse_fixed("lam:pq")


def test_claim_holds_is_one_rule_for_claims_and_regimes():
  """gain >= min_gain and > both stds, with enough seeds; the regime study uses min_gain 0.3."""
  a, b = [87.6, 87.4, 87.9], [87.2, 87.3, 87.1]
  gain, holds, enough = sweep_report.claim_holds(a, b, min_gain=0.3, min_seeds=3)
  assert enough and holds and gain == pytest.approx(0.433, abs=1e-3)
  assert not sweep_report.claim_holds(a, b, min_gain=0.5)[1]          # gain under min_gain
  assert not sweep_report.claim_holds(a[:2], b[:2], min_seeds=3)[1]  # too few seeds
  assert not sweep_report.claim_holds([88.5, 86.5, 87.3], b)[1]       # inside a's std
  md = sweep_report.summarize_claims(
      [_res("pq", 2, s, t / 100) for s, t in enumerate(a)]
      + [_res("minmax", 2, s, t / 100) for s, t in enumerate(b)], [],
      [("pq beats minmax", "pq", "minmax")], min_gain=0.5)
  assert "+0.43 (gain < 0.5 pt or < 1 std)" in md
