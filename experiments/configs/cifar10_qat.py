"""QAT of the CIFAR-10 ViG-Ti, initialised from a cifar10_fp run.

    python -m experiments.run --config experiments/configs/cifar10_qat.py \
        --config.init_from=runs/c10_fp --workdir runs/c10_qat

Not run here (no CIFAR-10 offline): no accuracy is claimed.
"""
from experiments.configs.common import base_config


def get_config():
  c = base_config()
  c.dataset = "cifar10"
  c.model = "vig_ti_32"
  c.method = "pq+aqd+sqd"
  c.w_bits = c.a_bits = 4
  c.batch_size = 128
  c.num_epochs = 20.0
  c.lr = 5e-4
  c.warmup_epochs = 1.0
  c.eval_every_epochs = 5.0
  c.checkpoint_every = 1000
  return c
