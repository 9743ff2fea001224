"""The claims table on one footing (issue 21, item 4): every method x W4A4 / W3A3 / W2A2 from
one FP checkpoint made with today's code, on the CPU protocol.

    python -m experiments.sweep --config experiments/configs/fashion_mnist_claims_cpu.py \
        --workdir runs/onefooting --out experiments/results/fashion_mnist --parallel 2

The CPU ablation's protocol (fashion_mnist_ablation_cpu.py: vig_tiny_28, one 5-epoch FP
checkpoint `fp_s0` in the workdir, 0.25-epoch QAT fine-tunes, test top-1) with:
  - every method at every bit-width, N2UQ included: minmax, lsq, n2uq, pq, pq+aqd, pq+sqd,
    pq+aqd+sqd; seeds 2 at W4A4 and W3A3, 3 at W2A2;
  - no sweep phase: the settings below were chosen earlier on the 5,000 validation images
    (docs/METHOD.md): PQ's lambda and grid, LSQ's step lr and the distillation temperature
    and probability by the CPU ablation's sweeps (experiments/results/fashion_mnist/
    sweeps.md); N2UQ's step lr as its official code (lr / 10); the distillation forms and
    weights by the regime study's screen (distill_regimes_winners.json: AQD channel_mse
    alpha 0.3, SQD stochastic_channels beta 0.1).
The W2A2 runs of pq and the distillation methods are the regime study's R1 runs (same
settings, same FP checkpoint; `check_matches_plan` verifies a reused run's config).
Measured results: README, "Ablation" (the rows before this table: ablation_history.csv).
"""
from experiments.configs import fashion_mnist_ablation_cpu


def get_config():
  c = fashion_mnist_ablation_cpu.get_config()
  c.methods = "minmax,lsq,n2uq,pq,pq+aqd,pq+sqd,pq+aqd+sqd"
  c.w3_methods = c.methods
  c.bits = "2,4"
  c.seeds = "4:2,3:2,2:3"
  c.main_order = "2:0,2:1,2:2,4:0,3:0,4:1,3:1"
  c.sweeps = ""
  c.fixed = ";".join([
      "lam:pq:2.5", "w_symmetric:pq:True", "quant_lr:lsq:5e-3", "quant_lr:n2uq:5e-5",
      "aqd_form:pq+aqd:channel_mse", "aqd_alpha:pq+aqd:0.3", "aqd_tau:pq+aqd:2.0",
      "sqd_form:pq+sqd:stochastic_channels", "sqd_beta:pq+sqd:0.1", "sqd_p:pq+sqd:0.25",
      "sqd_temperature:pq+sqd:2.0",
  ])
  c.claims = c.claims + (("(5) PQ beats N2UQ", "pq", "n2uq"),
                         ("(4'') PQ+AQD+SQD beats N2UQ", "pq+aqd+sqd", "n2uq"))
  # One rule with the regime study (issue 21): a gain "holds" when >= 0.3 pt and larger
  # than both cells' std (sweep_report.claim_holds).
  c.claim_min_gain = 0.3
  c.plot_title = "Fashion-MNIST, vig_tiny_28, QAT from one FP checkpoint (CPU)"
  return c
