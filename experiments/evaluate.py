"""Evaluate a run's checkpoint without training; prints top-1 and loss, writes eval.json.

    python -m experiments.evaluate --workdir runs/quickstart/qat [--step N] [--split test]

The model, quantization and data come from the workdir's config.json; the checkpoint is
the newest readable one (a corrupt newest step is skipped with a warning) or --step N.
`<workdir>/eval.json` gets the numbers with the step, the split and provenance. A
config.json with a bad field exits with status 2; a missing workdir or checkpoint with 1.
"""
from absl import app, flags

from experiments.cli import EXIT_CONFIG, EXIT_ERROR, fail, set_console, setup_compilation_cache

flags.DEFINE_string("workdir", None, "A run's workdir (holds config.json and checkpoints/).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
flags.DEFINE_enum("split", None, ["test", "validation"],
                  "Split to evaluate (default: the one the run evaluates on); validation "
                  "needs a run with val_holdout > 0.")
flags.DEFINE_bool("verbose", False, "Show library INFO logs and full tracebacks of errors.")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  fl = flags.FLAGS
  set_console(fl.verbose)
  setup_compilation_cache()
  from qgnn_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  from qgnn_jax import experiment, run_config  # pylint: disable=g-import-not-at-top
  try:
    out = experiment.evaluate_checkpoint(fl.workdir, fl.step, fl.split)
  except run_config.ConfigError as e:
    fail(str(e), EXIT_CONFIG)
  except (FileNotFoundError, ckpt.CheckpointError, experiment.DataError) as e:
    if fl.verbose:
      raise
    fail(str(e), EXIT_ERROR)
  print(f"{fl.workdir} step {out['step']}: {out['split']} top-1 {100 * out['top1']:.2f}% "
        f"({out['count']} images), loss {out['loss']:.4f}; written to "
        f"{fl.workdir}/eval.json")


if __name__ == "__main__":
  app.run(main)
