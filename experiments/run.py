"""Main job: train / quantize a Vision GNN from an ml_collections config.

    python -m experiments.run                                    # quick start (digits)
    python -m experiments.run --config experiments/configs/fashion_mnist_fp.py --workdir runs/fm

Multi-process (README, "Several processes and hosts"): every process runs the same command
with the same workdir (shared file system) plus, when launched by hand,

    --coordinator_address HOST:PORT --num_processes N --process_id I

(under SLURM `srun`, Open MPI `mpirun` or on a TPU pod slice JAX finds these itself).

Restarting with a workdir that holds a run resumes it; a config that changes the run is
refused (exit status 1, the differing fields listed) unless --allow_config_change. A bad
flag, config file or config field exits with status 2 and one line naming it, before
anything is written; a workdir another run holds (README, "Runs"), missing or bad data, a
corrupt or diverged run and a failed write exit with 1, Ctrl-C with 130 (saying which step
the same command resumes from). --verbose shows the tracebacks and the library INFO logs
(absl, orbax).
"""
import os

from absl import app, flags
from ml_collections import config_flags

from experiments import cli
from experiments.cli import EXIT_CONFIG, EXIT_ERROR, fail, set_console, setup_compilation_cache

_HERE = os.path.dirname(os.path.abspath(__file__))
flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config name>).")
flags.DEFINE_string("coordinator_address", None,
                    "Multi-process: HOST:PORT of process 0's coordinator (all processes pass "
                    "the same).")
flags.DEFINE_integer("num_processes", None, "Multi-process: the number of processes N.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's id in [0, N).")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "auto: join JAX's distributed runtime when the three flags above are given "
                  "or SLURM / Open MPI / a TPU pod slice runs several processes; on: always "
                  "(JAX detects the cluster); off: never.")
flags.DEFINE_integer("heartbeat_timeout_s", 100,
                     "Multi-process: seconds without a heartbeat before a process counts as "
                     "dead and the others stop.")
flags.DEFINE_integer("distributed_init_timeout_s", 300,
                     "Multi-process: seconds to wait for every process to join.")
flags.DEFINE_bool("allow_config_change", False,
                  "Continue a workdir whose config.json differs from this config in fields "
                  "that change the run (the new values apply from the restored step on).")
flags.DEFINE_bool("verbose", False,
                  "Show library INFO logs (absl, orbax) and full tracebacks of errors.")

def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  fl = flags.FLAGS
  set_console(fl.verbose)
  setup_compilation_cache()
  from qgnn_jax import distributed  # pylint: disable=g-import-not-at-top
  try:
    distributed.initialize(fl.distributed, fl.coordinator_address, fl.num_processes,
                           fl.process_id, heartbeat_timeout_s=fl.heartbeat_timeout_s,
                           init_timeout_s=fl.distributed_init_timeout_s)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  from qgnn_jax import checkpoint as ckpt  # heavy imports after flag parsing
  from qgnn_jax import experiment, run_config, workdir_lock  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir or os.path.join(
      "runs", os.path.splitext(os.path.basename(config_flags.get_config_filename(
          flags.FLAGS["config"])))[0])
  try:
    experiment.run_pipeline(config, workdir, allow_config_change=fl.allow_config_change)
  except run_config.ConfigError as e:
    fail(str(e), EXIT_CONFIG)
  except experiment.Interrupted as e:
    fail(str(e), cli.EXIT_INTERRUPTED)
  except (run_config.ConfigMismatchError, ckpt.CheckpointError, ckpt.NonFiniteStateError,
          experiment.DataError, workdir_lock.WorkdirLockedError, OSError) as e:
    distributed.exit_on_error(e, verbose=fl.verbose)  # multi-process: one message, exit 1
    if fl.verbose:
      raise
    fail(cli.error_line(e), EXIT_ERROR)
  except Exception as e:  # pylint: disable=broad-except
    distributed.exit_on_error(e, verbose=fl.verbose)
    raise


if __name__ == "__main__":
  cli.define_config_flag("config", os.path.join(_HERE, "configs", "quickstart.py"),
                         "Config file (get_config()).")
  app.run(main, flags_parser=cli.parse_flags)
