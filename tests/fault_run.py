"""`python tests/fault_run.py POINT:STEP[:INT] [experiments.run flags]`: `experiments.run`
with a fault injected: at the run's fault point POINT ("mid_step", "save", "eval";
`qgnn_jax.experiment.OnEvent`) of step STEP the process sends itself SIGKILL, or SIGINT
(as Ctrl-C) with ":INT". The library has no test hook of its own: this script passes the
callback (`kill_at`) to `experiment.run_pipeline`.
"""
import functools
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kill_at(spec: str):
  """on_event(point, step) that signals this process when f"{point}:{step}" is `spec`
  (SIGKILL), or `spec` is that plus ":INT" (SIGINT)."""
  def on_event(point: str, step: int) -> None:
    if spec in (f"{point}:{step}", f"{point}:{step}:INT"):
      sys.stdout.flush()
      sys.stderr.flush()
      os.kill(os.getpid(), signal.SIGINT if spec.endswith(":INT") else signal.SIGKILL)
  return on_event


def main() -> None:
  spec = sys.argv.pop(1)
  sys.path.insert(0, ROOT)
  from absl import app  # pylint: disable=g-import-not-at-top
  from experiments import cli, run  # pylint: disable=g-import-not-at-top
  from qgnn_jax import experiment  # pylint: disable=g-import-not-at-top
  experiment.run_pipeline = functools.partial(experiment.run_pipeline, on_event=kill_at(spec))
  cli.define_config_flag("config", os.path.join(ROOT, "experiments", "configs", "quickstart.py"),
                         "Config file (get_config()).")
  app.run(run.main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  main()
