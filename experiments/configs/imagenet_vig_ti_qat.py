"""W4A4 PQ+AQD+SQD QAT of ViG-Ti on ImageNet-1k (tfds imagenet2012, manual download).

    python -m experiments.run --config experiments/configs/imagenet_vig_ti_qat.py \
        --config.init_from=runs/imagenet_vig_ti_fp --config.data_dir=$TFDS_DATA_DIR \
        --workdir runs/imagenet_vig_ti_qat

Sized for a multi-GPU host (global batch 256 split over the local devices by pmap).
Not run here: no accuracy is claimed.
"""
from experiments.configs.common import base_config


def get_config():
  c = base_config()
  c.dataset = "imagenet2012"
  c.model = "vig_ti_224"
  c.method = "pq+aqd+sqd"
  c.w_bits = c.a_bits = 4
  c.batch_size = 256
  c.num_epochs = 30.0
  c.lr = 2e-4
  c.warmup_epochs = 1.0
  c.label_smoothing = 0.1
  c.dtype = "bfloat16"
  c.eval_every_epochs = 1.0
  c.checkpoint_every = 2000
  c.log_every = 100
  return c
