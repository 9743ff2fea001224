"""Where can AQD and SQD act? The regime study of issue 21 (CPU protocol, W2A2, vig_tiny_28).

    python -m experiments.distill_regimes \
        --config experiments/configs/fashion_mnist_distill_regimes.py \
        --workdir runs/regimes --out experiments/results/fashion_mnist --parallel 2

Phases (every run is `python -m experiments.run`, skipped when its results.json exists, so
the study resumes; `--phases` picks some):
  screen: the forms and weights, R1, seed 0, on the 5,000 held-out training images: pq, then
    each AQD form and each SQD form at the weights below; the best (form, weight) of each
    term by validation top-1 is its winner.
  final: every regime x {pq, pq+aqd, pq+sqd, pq+aqd+sqd} x seeds, on the 10,000 test images,
    the distillation terms with the screen's winners.
  report: distill_regimes.csv (every run, both splits) and distill_regimes.png.
Regimes: R1 today's 0.25-epoch fine-tune from the FP checkpoint; R2 a 3-epoch fine-tune
from it; R3 as R1 with the stem and the head quantized too; R4 QAT from scratch, the FP
run's 5 epochs and learning rate. Every fine-tune starts from one FP checkpoint
(`fp_workdir`, the CPU ablation's FP run, made with this code). Measured results: README,
"Does distillation help?".
"""
import ml_collections

from experiments.configs import fashion_mnist_ablation_cpu


def get_config():
  c = ml_collections.ConfigDict()
  cpu = fashion_mnist_ablation_cpu.get_config()
  c.run = cpu.run                      # vig_tiny_28, batch 128, 5,000 held out, ...
  c.base_config = cpu.base_config
  # The one FP checkpoint (python -m experiments.sweep --config
  # experiments/configs/fashion_mnist_ablation_cpu.py --workdir runs/onefooting --phases fp).
  c.fp_workdir = "runs/onefooting/fp_s0"
  c.bits = 2
  c.seeds = 3
  # Shared by every run: the CPU protocol's validation winners (docs/METHOD.md).
  c.fixed = ml_collections.ConfigDict({"lam": 2.5, "aqd_tau": 2.0, "sqd_p": 0.25,
                                       "sqd_temperature": 2.0, "lr": 5e-4})
  # name: overrides; "init_from_fp" says whether it starts from the FP checkpoint.
  c.regimes = ml_collections.ConfigDict({
      "R1": {"num_epochs": 0.25, "warmup_epochs": 0.05, "init_from_fp": True},
      "R2": {"num_epochs": 3.0, "warmup_epochs": 0.1, "init_from_fp": True},
      "R3": {"num_epochs": 0.25, "warmup_epochs": 0.05, "init_from_fp": True,
             "quantize_stem": True, "quantize_head": True},
      "R4": {"num_epochs": 5.0, "warmup_epochs": 0.1, "lr": 2e-3, "init_from_fp": False},
  })
  c.regime_order = "R1,R3,R2,R4"        # the cheap regimes first
  c.screen_regime = "R1"
  # form:weight points screened for each term, one weight per form (a 2-core CPU session
  # affords 7 screen runs): channel_mse's and bypass_kl's CPU-protocol winners (0.3, 0.1);
  # for the new forms a weight that puts the term near those terms' size: attention
  # transfer and the channel-attention KL are normalised quantities (unit vectors,
  # distributions), whose gaps are small at W2A2, hence 10; speq's cosine loss has no
  # T^2 factor (KL at T = 2 has), hence 1. The logged term sizes are in the screen runs'
  # metrics.jsonl (README, "Does distillation help?").
  # attention_transfer at 2 too: at 10 its term was ~5x the others' (0.68 vs ~0.13) and cost
  # 3.5 points; 2 puts it near them.
  c.aqd_points = ("channel_mse:0.3,attention_transfer:10,channel_attention:10,"
                  "attention_transfer:2")
  c.sqd_points = "bypass_kl:0.1,speq:1,stochastic_channels:0.1"
  c.methods = "pq,pq+aqd,pq+sqd,pq+aqd+sqd"
  # Classic KD from the frozen FP checkpoint (what AQD / SQD claim to replace): its weights
  # screened like the terms' (KL at sqd_temperature, T^2-scaled), then pq+kd in these
  # regimes (every one that starts from the FP checkpoint, its teacher).
  c.kd_weights = "0.3,1"
  c.kd_regimes = "R1,R3,R2"
  return c
