"""The ablation scaled to one session of a 2-core CPU (issue 5's reference protocol).

    python -m experiments.sweep --config experiments/configs/fashion_mnist_ablation_cpu.py \
        --workdir runs/ablation_cpu --out experiments/results/fashion_mnist --parallel 2

Same phases and outputs as fashion_mnist_ablation.py (FP -> validation sweeps -> main
table -> ablation.csv, sweeps.csv, summary.md, accuracy_vs_bits.png), resumable, with:
  - vig_tiny_28 (0.62M params) instead of vig_small_28: ~130 train img/s here, vs 63;
  - one FP checkpoint (5 epochs) shared by every QAT seed (fp_seeds = 1);
  - QAT fine-tunes of 0.25 epoch (107 steps at batch 128);
  - W2A2 first (where the methods differ): main_order puts its seeds 0, 1 first;
  - the sweeps that decide fairness first: PQ's lambda and LSQ's step lr at W2A2; then the
    distillation weights, without the base config's largest (3).
--parallel 2 overlaps one run's single-threaded compile with the other's training.
Measured results (and what this protocol cannot show): README, "Ablation".
"""
from experiments.configs import fashion_mnist_ablation


def get_config():
  c = fashion_mnist_ablation.get_config()
  run = c.run
  run.model = "vig_tiny_28"
  run.batch_size = 128
  run.checkpoint_every = 200
  c.fp_seeds = 1
  c.fp_epochs = 5.0
  c.fp_drop_path = 0.0
  c.qat_epochs = 0.25
  c.qat_warmup_epochs = 0.05
  c.bits = "2,4"                          # seeds per bit-width: the base config's
  # W2A2's second seed before W4A4's first: the targets that decide the claims are at W2A2.
  c.main_order = "2:0,2:1,4:0,2:2,4:1,3:0,3:1"
  c.sweeps = ";".join([
      "quant_lr:lsq:2:5e-5,5e-4,5e-3",
      "lam:pq:2:2,2.5,3,4",
      # At 2 bits a symmetric weight grid has 3 levels (codes -1, 0, 1), an asymmetric one 4.
      "w_symmetric:pq:2:True,False",
      # The distillation terms (added in a later session; the three above were already run).
      # The largest weights of the base config are left out: at 1 both terms already cost
      # accuracy here (README, "Ablation").
      "aqd_alpha:pq+aqd:2:0.1,0.3,1", "aqd_tau:pq+aqd:2:0.5,1,2",
      "sqd_beta:pq+sqd:2:0.1,0.3,1", "sqd_p:pq+sqd:2:0.25,0.5,0.75",
      "sqd_temperature:pq+sqd:2:1,2,4",
      # Issue 15: LSQ's grid at the GELU-fed ops (LSQ+'s offset, LSQ's unsigned grid, the
      # old signed one) and the gradient through PQ's mu, sigma. Run by hand from the FP
      # checkpoint of 89.43 % (runs/lsq15/run_all.sh; experiments/results/fashion_mnist/
      # lsq15.md), not by a sweep over this workdir.
      "lsq_gelu_grid:lsq:2:signed,unsigned,offset", "range_grad:pq:2:False,True",
  ])
  # The overhead column: median train-step time / pq's, all methods in one interleaved run:
  #   python -m experiments.bench --model vig_tiny_28 --batch 128 --nograph_share \
  #     --methods fp,minmax,lsq,pq,pq+aqd,pq+sqd,pq+aqd+sqd --json <this path>
  c.bench_json = "experiments/results/fashion_mnist/bench_vig_tiny_28.json"
  return c
