"""Quick start on scikit-learn's 8x8 digits: FP training, then W4A4 PQ+SQD QAT.

    python -m experiments.run            # same as --config experiments/configs/quickstart.py

Two phases in workdir/fp and workdir/qat (QAT initialised from the FP checkpoint).
Expected on a 2-core CPU (measured 2026-12-03, quiet machine): 136 s wall with an empty
compilation cache, 92 s with it filled; test top-1 98.33 % FP, 97.21 % W4A4 on the 359
held-out images (README, "Set-up").
"""
from experiments.configs.common import base_config


def get_config():
  c = base_config()
  c.dataset = "digits"
  c.model = "vig_digits"
  c.method = "pq+sqd"           # the term that helped (README, "Does distillation help?")
  c.w_bits = c.a_bits = 4
  c.batch_size = 64
  c.pretrain_fp_epochs = 20.0   # phase 1: FP
  c.num_epochs = 5.0            # phase 2: QAT
  c.lr = 2e-3
  c.warmup_epochs = 1.0
  c.log_every = 10
  c.eval_every_epochs = 0.0
  c.checkpoint_every = 200
  return c
