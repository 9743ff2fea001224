"""Export a run's trained (quantized) model as one file, and report its size.

    python -m experiments.export --workdir runs/quickstart/qat --out runs/quickstart/qat.qgx

The file holds every quantized kernel as packed integer codes with its scales and zero
points, the activation quantizers' parameters, the full-precision parameters and BN
statistics, and the model name and rules (format: `qgnn_jax/export/`, docs/METHOD.md "The export file"). It is written
atomically. Read it back with `qgnn_jax.export.load(FILE)`; evaluate it with
`python -m experiments.evaluate --export FILE`. A missing workdir or checkpoint and a
failed write (a read-only or full file system: one line naming the path) exit with status
1, a bad config.json with 2.
"""
from absl import app, flags

from experiments.cli import call_or_fail, parse_flags, set_console, setup_compilation_cache

flags.DEFINE_string("workdir", None, "A run's workdir (holds config.json and checkpoints/).")
flags.DEFINE_string("out", None, "The export file to write (e.g. model.qgx).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
flags.DEFINE_bool("verbose", False, "Show library INFO logs and full tracebacks of errors.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  del argv
  fl = flags.FLAGS
  set_console(fl.verbose)
  setup_compilation_cache()
  from qgnn_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  from qgnn_jax import export, run_config, workdir  # pylint: disable=g-import-not-at-top
  out = call_or_fail(lambda: workdir.export_workdir(fl.workdir, fl.out, fl.step),
                     (OSError, ckpt.CheckpointError, export.ExportError), fl.verbose,
                     run_config.ConfigError)
  print(f"{fl.out}: {out['bytes']:,} bytes ({out['sites']} quantized sites, step "
        f"{out['step']}); the same model at fp32: {out['bytes_fp32']:,} bytes "
        f"({out['bytes_fp32'] / out['bytes']:.2f}x)")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
