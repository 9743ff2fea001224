"""Evaluate a run's checkpoint without training; prints top-1 and loss, writes eval.json.

    python -m experiments.evaluate --workdir runs/quickstart/qat [--step N] [--split test]
    python -m experiments.evaluate --export model.qgx [--compare] [--limit N]

--export evaluates an export (`experiments.export`) on its dataset's test split with
integer inference; --compare also runs the dequantized path and the fake-quant eval of
the checkpoint it came from and counts the images whose prediction differs
(--json FILE writes the numbers). A corrupt, truncated or mismatched export exits with 1;
a directory given as --export (a run's workdir: use --workdir) with 2.

The model, quantization and data come from the workdir's config.json; the checkpoint is
the newest readable one (a corrupt newest step is skipped with a warning) or --step N.
`<workdir>/eval.json` gets the numbers with the step, the split and provenance. A
config.json with a bad field exits with status 2; a missing workdir or checkpoint with 1.
"""
import os
from typing import Optional

from absl import app, flags

from experiments.cli import (EXIT_CONFIG, call_or_fail, fail, parse_flags, set_console,
                             setup_compilation_cache)

flags.DEFINE_string("workdir", None, "A run's workdir (holds config.json and checkpoints/).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
flags.DEFINE_enum("split", None, ["test", "validation"],
                  "Split to evaluate (default: the one the run evaluates on); validation "
                  "needs a run with val_holdout > 0.")
flags.DEFINE_bool("verbose", False, "Show library INFO logs and full tracebacks of errors.")
flags.DEFINE_string("export", None, "An export file (experiments.export) to evaluate instead "
                    "of a workdir's checkpoint.")
flags.DEFINE_bool("compare", False, "--export: also the dequantized path and the fake-quant "
                  "eval of the source checkpoint, with per-image agreement.")
flags.DEFINE_integer("limit", 0, "--export: the first N test images (0: all).")
flags.DEFINE_string("dataset", None, "--export: dataset (default: the one it was trained on).")
flags.DEFINE_string("data_dir", None, "--export: data folder (IDX files / tfds data dir).")
flags.DEFINE_string("json", None, "--export: write the numbers to this JSON file.")
flags.register_validator("workdir", lambda v: v is not None or flags.FLAGS.export is not None,
                         "give --workdir DIR or --export FILE")


def export_path_error(path: str) -> Optional[str]:
  """Why `--export path` cannot be an export file (a directory; a run's workdir), or None."""
  if not os.path.isdir(path):
    return None
  if os.path.exists(os.path.join(path, "config.json")):
    return (f"--export={path} is a run's workdir, not an export file; this is a run: use "
            f"--workdir={path}, or export it with python -m experiments.export "
            f"--workdir={path} --out=FILE")
  return f"--export={path} is a directory; give the file experiments.export wrote (--out)"


def main_export(fl):
  if (why := export_path_error(fl.export)) is not None:
    fail(why, EXIT_CONFIG)
  from qgnn_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  from qgnn_jax import experiment, export, workdir  # pylint: disable=g-import-not-at-top
  from qgnn_jax.data import DatasetNotFoundError  # pylint: disable=g-import-not-at-top
  out = call_or_fail(
      lambda: workdir.evaluate_export(fl.export, fl.dataset, fl.data_dir, fl.compare, fl.limit),
      (OSError, export.ExportError, ckpt.CheckpointError, DatasetNotFoundError,
       experiment.DataError), fl.verbose)
  print(f"{fl.export} ({out['bytes']:,} bytes, {out['integer_sites']}/{out['sites']} sites "
        f"on integer codes): {out['split']} top-1 {100 * out['top1_integer']:.2f}% "
        f"({out['count']} images)")
  for k, why in out["fallback"].items():
    print(f"  {k}: dequantized ({why})")
  if fl.compare:
    for name in ("integer", "dequantized"):
      c = out[f"{name}_vs_checkpoint"]
      print(f"  {name}: top-1 {100 * out[f'top1_{name}']:.2f}%, "
            f"{c['differing_predictions']} predictions differ from the checkpoint's fake-quant "
            f"eval ({100 * out['top1_checkpoint']:.2f}%), max |logit diff| "
            f"{c['max_abs_logit_diff']:.2e} (logits up to {c['max_abs_logit']:.1f})")
  if fl.json:
    from qgnn_jax import results as results_lib  # pylint: disable=g-import-not-at-top
    results_lib.write_json_atomic(fl.json, out)


def main(argv):
  del argv
  fl = flags.FLAGS
  set_console(fl.verbose)
  setup_compilation_cache()
  if fl.export:
    return main_export(fl)
  from qgnn_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  from qgnn_jax import experiment, run_config, workdir  # pylint: disable=g-import-not-at-top
  out = call_or_fail(lambda: workdir.evaluate_checkpoint(fl.workdir, fl.step, fl.split),
                     (OSError, ckpt.CheckpointError, experiment.DataError),
                     fl.verbose, run_config.ConfigError)
  print(f"{fl.workdir} step {out['step']}: {out['split']} top-1 {100 * out['top1']:.2f}% "
        f"({out['count']} images), loss {out['loss']:.4f}; written to "
        f"{fl.workdir}/eval.json")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
