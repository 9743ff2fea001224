"""Full-precision ViG-Ti (32-px, stride-4 stem, 64 nodes) on CIFAR-10 via tfds.

    python -m experiments.run --config experiments/configs/cifar10_fp.py --workdir runs/c10_fp

Needs the tfds cifar10 data in TFDS_DATA_DIR (`tfds build cifar10` on a machine with
internet). Not run here (no internet on the build machine): no accuracy is claimed.
"""
from experiments.configs.common import base_config


def get_config():
  c = base_config()
  c.dataset = "cifar10"
  c.model = "vig_ti_32"
  c.method = "fp"
  c.batch_size = 128
  c.num_epochs = 100.0
  c.lr = 2e-3
  c.warmup_epochs = 5.0
  c.drop_path = 0.1
  c.label_smoothing = 0.1
  c.eval_every_epochs = 5.0
  c.checkpoint_every = 1000
  return c
