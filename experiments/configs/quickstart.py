"""Quick start on scikit-learn's 8x8 digits: FP training, then W4A4 PQ+SQD QAT.

    python -m experiments.run            # same as --config experiments/configs/quickstart.py

Two phases in workdir/fp and workdir/qat (QAT initialised from the FP checkpoint).
Expected on a 2-core CPU (Intel Xeon with AVX-512, measured 2026-12-06, quiet machine):
70 s wall with the FP phase's programs in the compilation cache; test top-1 97.77 % FP,
96.94 % W4A4 pq+sqd on the 359 held-out images (README, "Set-up").
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
