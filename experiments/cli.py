"""What the command-line entry points share: console verbosity, one-line errors, exit codes."""
import logging as py_logging
import sys

from absl import flags, logging

from qgnn_jax import compile_cache

flags.DEFINE_string(
    "compilation_cache", None,
    "Directory of JAX's persistent compilation cache (default: $QGNN_JAX_COMPILATION_CACHE, "
    "else ~/.cache/qgnn_jax/jax_compilation_cache); 'off' disables it.")

# Exit statuses: a bad config field or flag (nothing was written); any other error that
# stops a run (a refused restart, a diverged or corrupt run, missing data).
EXIT_CONFIG, EXIT_ERROR = 2, 1


def set_console(verbose: bool) -> None:
  """absl / orbax INFO lines hidden unless verbose (warnings and errors always shown)."""
  logging.set_verbosity(logging.INFO if verbose else logging.WARNING)
  py_logging.getLogger().setLevel(py_logging.INFO if verbose else py_logging.WARNING)


def setup_compilation_cache() -> None:
  """Turns JAX's persistent compilation cache on as --compilation_cache says."""
  compile_cache.enable(flags.FLAGS.compilation_cache)


def call_or_fail(fn, errors, verbose: bool, config_errors=()):
  """fn(); a `config_errors` exception exits 2, an `errors` one exits 1, each as one line
  (`errors` re-raised with its traceback when verbose). Other exceptions propagate."""
  try:
    return fn()
  except config_errors as e:
    fail(str(e), EXIT_CONFIG)
  except errors as e:
    if verbose:
      raise
    fail(str(e), EXIT_ERROR)


def fail(message: str, status: int) -> None:
  """`error: <message>` on stderr, then exit with `status`."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)
