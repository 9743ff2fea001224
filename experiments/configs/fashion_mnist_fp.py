"""Full-precision ViG on Fashion-MNIST (offline IDX files from dataset-fashion-mnist).

    python -m experiments.run --config experiments/configs/fashion_mnist_fp.py --workdir runs/fmnist_fp

See README ("Fashion-MNIST") for the measured accuracy and time of this command.
"""
from experiments.configs.common import base_config


def get_config():
  c = base_config()
  c.dataset = "fashion_mnist"
  c.model = "vig_tiny_28"
  c.method = "fp"
  c.batch_size = 128
  c.num_epochs = 10.0
  c.lr = 2e-3
  c.weight_decay = 0.05
  c.warmup_epochs = 1.0
  c.log_every = 50
  c.checkpoint_every = 500
  return c
