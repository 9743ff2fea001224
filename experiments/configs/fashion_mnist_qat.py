"""QAT on Fashion-MNIST, initialised from a fashion_mnist_fp run.

    python -m experiments.run --config experiments/configs/fashion_mnist_qat.py \
        --config.init_from=runs/fmnist_fp --config.method=pq+aqd+sqd \
        --config.w_bits=4 --config.a_bits=4 --workdir runs/fmnist_pq_aqd_sqd_w4a4

method: fp | minmax | lsq | pq | pq+aqd | pq+sqd | pq+aqd+sqd; alpha/tau (AQD), beta/p/T
(SQD) and lambda (PQ) are fields. Results per method and bit-width: README, "Ablation".
"""
from experiments.configs.common import base_config


def get_config():
  c = base_config()
  c.dataset = "fashion_mnist"
  c.model = "vig_tiny_28"
  c.method = "pq+aqd+sqd"
  c.w_bits = c.a_bits = 4
  c.batch_size = 128
  c.num_epochs = 2.0
  c.lr = 5e-4
  c.quant_lr = 5e-5          # LSQ's step lr: 0.1x lr won the GPU ablation's W2A2 sweep (flat)
  c.warmup_epochs = 0.1
  c.init_from = ""
  c.log_every = 50
  c.checkpoint_every = 500
  return c
