"""The regime study's plan and report (experiments/distill_regimes.py): pure functions."""
import csv

import pytest

from experiments import distill_regimes as D
from experiments.configs import fashion_mnist_distill_regimes
from qgnn_jax import run_config


@pytest.fixture(name="cfg")
def _cfg():
  return fashion_mnist_distill_regimes.get_config()


def test_screen_covers_every_form_once_on_validation(cfg):
  from qgnn_jax import distill  # pylint: disable=g-import-not-at-top
  runs = D.screen_runs(cfg)
  ov = [dict(r.overrides) for r in runs]
  assert {o["eval_on"] for o in ov} == {"validation"} and {o["seed"] for o in ov} == {"0"}
  assert ov[0]["method"] == "pq"
  assert {o["aqd_form"] for o in ov if o["method"] == "pq+aqd"} == set(distill.AQD_FORMS.names())
  assert {o["sqd_form"] for o in ov if o["method"] == "pq+sqd"} == set(distill.SQD_FORMS.names())
  assert len({r.name for r in runs}) == len(runs)
  # Every override is a run config field the run checks (no typo reaches a subprocess).
  assert set().union(*ov) <= set(run_config.FIELD_CHECKS)


def test_regimes_differ_only_where_they_should(cfg):
  r1, r2, r3, r4 = (D.regime_overrides(cfg, r) for r in ("R1", "R2", "R3", "R4"))
  assert r1["init_from"] == r2["init_from"] == r3["init_from"] == cfg.fp_workdir
  assert r4["init_from"] == "" and float(r4["num_epochs"]) == 5.0
  assert float(r2["num_epochs"]) >= 3
  assert r3["quantize_stem"] == r3["quantize_head"] == "True" and "quantize_stem" not in r1
  with pytest.raises(ValueError, match="regime 'R9'"):
    D.regime_overrides(cfg, "R9")


def test_winners_and_finals(cfg):
  runs = D.screen_runs(cfg)
  top1 = {r.name: 0.8 for r in runs}
  n_aqd, n_sqd = len(D.parse_points(cfg.aqd_points)), len(D.parse_points(cfg.sqd_points))
  top1[runs[2].name] = 0.9   # the second AQD point
  top1[runs[n_aqd + n_sqd].name] = 0.85  # the last SQD point
  top1[runs[-1].name] = 0.83  # the last KD weight
  winners = D.pick(cfg, [{"top1": top1[r.name]} for r in runs])
  assert winners == {"aqd": D.parse_points(cfg.aqd_points)[1],
                     "sqd": D.parse_points(cfg.sqd_points)[-1],
                     "kd": ("kl", D.kd_weights(cfg)[-1])}
  assert [dict(r.overrides)["method"] for r in runs].count("pq+kd") == len(D.kd_weights(cfg))
  # pq+kd only where a regime starts from the FP checkpoint (its teacher) and is asked for.
  assert set(cfg.kd_regimes.split(",")) == {"R1", "R2", "R3"}
  final = D.final_runs(cfg, winners, ["R1", "R4"])
  assert len(final) == cfg.seeds * 5 + cfg.seeds * 4
  kd = [dict(r.overrides) for r in final if dict(r.overrides)["method"] == "pq+kd"]
  assert len(kd) == cfg.seeds and {o["kd_weight"] for o in kd} == {"1.0"}
  assert all(r.name.startswith("R1_") for r in final if "kd" in r.name)
  with pytest.raises(ValueError, match="no FP checkpoint"):
    D.make_run(cfg, "R4", "pq+kd", 0, "test", kd=1.0)
  with pytest.raises(ValueError, match="exactly the terms"):
    D.make_run(cfg, "R1", "pq+kd", 0, "test")
  both = [dict(r.overrides) for r in final if dict(r.overrides)["method"] == "pq+aqd+sqd"]
  assert all(o["aqd_form"] == winners["aqd"][0] and o["sqd_form"] == winners["sqd"][0]
             for o in both)
  with pytest.raises(ValueError, match="screen"):
    D.final_runs(cfg, {"aqd": winners["aqd"]}, ["R1"])
  with pytest.raises(ValueError, match="exactly the terms"):
    D.make_run(cfg, "R1", "pq+aqd", 0, "test")


def test_verdict_rule_and_report_files(cfg, tmp_path):
  runs, res = [], []
  for seed in range(3):
    for method, top1 in (("pq", 0.80 + 0.001 * seed), ("pq+aqd", 0.81 + 0.001 * seed),
                         ("pq+sqd", 0.801 + 0.001 * seed)):
      terms = method.split("+")
      runs.append(D.make_run(cfg, "R1", method, seed, "test",
                             aqd=("attention_transfer", 10.0) if "aqd" in terms else None,
                             sqd=("speq", 1.0) if "sqd" in terms else None))
      res.append({"top1": top1, "train_steps": 100, "train_seconds": 50.0})
  rows = [D.csv_row(r, x) for r, x in zip(runs, res)]
  got = {v["method"]: v for v in D.verdicts(rows)}
  assert got["pq+aqd"]["helps"] and got["pq+aqd"]["gain"] == pytest.approx(1.0)
  assert not got["pq+sqd"]["helps"]          # +0.1 point: below the +0.3 rule
  assert not D.verdicts(rows[:6])[0]["helps"]  # 2 seeds are not enough
  path = tmp_path / "r.csv"
  from experiments import sweep_report  # pylint: disable=g-import-not-at-top
  sweep_report.write_csv(str(path), rows, D.CSV_FIELDS)
  with open(path) as f:
    back = list(csv.DictReader(f))
  assert back[1]["aqd_form"] == "attention_transfer" and back[1]["step_s"] == "0.500"
  assert tuple(back[0]) == D.CSV_FIELDS
  table = D.summary_markdown(rows)
  assert "| R1 | pq+aqd | 81.10 ± 0.10 | 3 | +1.00 | yes | – |" in table
  assert "| R1 | pq+sqd | 80.20 ± 0.10 | 3 | +0.10 | no | – |" in table
  # With pq+kd in the regime, each distillation method is also set against it (same rule).
  kd_rows = [dict(r, method="pq+kd", top1=f"{float(r['top1']) + 0.5:.2f}")
             for r in rows if r["method"] == "pq"]
  table = D.summary_markdown(rows + kd_rows)
  assert "| R1 | pq+aqd | 81.10 ± 0.10 | 3 | +1.00 | yes | +0.50 (better) |" in table
  assert "| R1 | pq+sqd | 80.20 ± 0.10 | 3 | +0.10 | no | -0.40 (not better) |" in table
  assert "| R1 | pq+kd | 80.60 ± 0.10 | 3 | +0.50 | yes | – |" in table
  D.plot(rows, str(tmp_path / "r.png"))
  assert (tmp_path / "r.png").stat().st_size > 1000
