"""Convert an official pretrained ViG / Pyramid ViG (PyTorch) into a workdir of this project.

    python -m experiments.convert_official --checkpoint vig_ti_74.5.pth --model vig_ti_224 \
        --workdir runs/vig_ti_official [--dataset imagenet2012] [--data_dir DIR]

The checkpoint is a state dict of github.com/huawei-noah/Efficient-AI-Backbones
(`vig_pytorch/`): `.pth` / `.pt` need PyTorch (`pip install -e ".[torch]"`), `.npz` and
`.safetensors` only numpy. Every tensor is mapped by name and its shape checked
(`qgnn_jax.official`); a file that does not fit the model (another variant, a missing or
unexpected tensor, a wrong shape, a truncated file) exits with status 1 and one line naming
what. The classes come from the file's head (1000 for the official ImageNet weights) and
must be the dataset's. The official input normalisation (mean = std = 0.5) is folded into
the first conv for the dataset's statistics unless --nofold_normalization.

The workdir (config.json with the file's sha256 in `source`, one checkpoint) is an FP run:
`experiments.evaluate --workdir`, `experiments.export --workdir` and
`experiments.run --config.init_from=WORKDIR` (QAT) take it.
"""
from absl import app, flags

from experiments.cli import call_or_fail, set_console

OFFICIAL = ("vig_ti_224", "vig_s_224", "vig_b_224", "pvig_ti_224", "pvig_s_224",
            "pvig_m_224", "pvig_b_224")  # qgnn_jax.official.OFFICIAL_NAMES (no jax import here)

flags.DEFINE_string("checkpoint", None, "The official state dict: .pth / .pt (torch), .npz or "
                    ".safetensors.")
flags.DEFINE_enum("model", None, OFFICIAL, "The variant the file holds.")
flags.DEFINE_string("workdir", None, "Output workdir (must hold no checkpoint yet).")
flags.DEFINE_string("dataset", "imagenet2012", "Dataset of the runs that use the workdir "
                    "(its classes must be the head's).")
flags.DEFINE_string("data_dir", "", "Data folder of that dataset (tfds data dir).")
flags.DEFINE_integer("batch_size", 256, "config.batch_size written to config.json.")
flags.DEFINE_integer("eval_batch_size", 250, "config.eval_batch_size written to config.json.")
flags.DEFINE_bool("fold_normalization", True, "Fold the official input normalisation "
                  "(mean = std = 0.5) into the first conv for the dataset's statistics.")
flags.DEFINE_bool("verbose", False, "Show library INFO logs and full tracebacks of errors.")
flags.mark_flags_as_required(["checkpoint", "model", "workdir"])


def main(argv):
  del argv
  fl = flags.FLAGS
  set_console(fl.verbose)
  from experiments.configs.common import base_config  # pylint: disable=g-import-not-at-top
  from qgnn_jax import official, run_config, workdir  # pylint: disable=g-import-not-at-top
  config = base_config()
  config.dataset, config.data_dir = fl.dataset, fl.data_dir
  config.batch_size, config.eval_batch_size = fl.batch_size, fl.eval_batch_size
  out = call_or_fail(
      lambda: workdir.convert_checkpoint(fl.checkpoint, fl.model, fl.workdir, config,
                                          fold_normalization=fl.fold_normalization),
      (FileNotFoundError, official.ConversionError, ValueError), fl.verbose,
      run_config.ConfigError)
  print(f"{fl.workdir}: {out['model']} from {fl.checkpoint} (sha256 {out['sha256'][:16]}..., "
        f"{out['tensors']} tensors, {out['params']:,} parameters, {out['num_classes']} "
        f"classes) in {out['seconds']:.1f} s")


if __name__ == "__main__":
  app.run(main)
