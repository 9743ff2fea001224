"""Main job: train / quantize a Vision GNN from an ml_collections config.

    python -m experiments.run                                    # quick start (digits)
    python -m experiments.run --config experiments/configs/fashion_mnist_fp.py --workdir runs/fm
"""
import os

from absl import app, flags
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "quickstart.py"), "Config file (get_config()).",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config name>).")


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from qgnn_jax import experiment  # heavy imports after flag parsing
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir or os.path.join(
      "runs", os.path.splitext(os.path.basename(config_flags.get_config_filename(
          flags.FLAGS["config"])))[0])
  experiment.run_pipeline(config, workdir)


if __name__ == "__main__":
  app.run(main)
