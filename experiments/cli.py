"""What the command-line entry points share: console verbosity, one-line errors, exit codes,
and flag parsing that answers a bad flag, override or config file in one line."""
import errno
import logging as py_logging
import os
import re
import sys

from absl import flags, logging

from qgnn_jax import compile_cache

flags.DEFINE_string(
    "compilation_cache", None,
    "Directory of JAX's persistent compilation cache (default: $QGNN_JAX_COMPILATION_CACHE, "
    "else ~/.cache/qgnn_jax/jax_compilation_cache); 'off' disables it.")

# Exit statuses: a bad config field or flag (nothing was written); any other error that
# stops a run (a refused restart, a diverged or corrupt run, missing data, I/O); Ctrl-C
# (128 + SIGINT, as a shell reports a process it interrupted).
EXIT_CONFIG, EXIT_ERROR, EXIT_INTERRUPTED = 2, 1, 130


def set_console(verbose: bool) -> None:
  """absl INFO lines hidden unless verbose (warnings and errors always shown); orbax's own
  lines and the asyncio noise of its failed writer threads only when verbose: what they
  report reaches the console as qgnn_jax's one-line errors and warnings (a corrupt step
  skipped, a failed save), and orbax's cleaning of an interrupted save's folder at start-up
  ("Removing existing directory since it is not finalized") is no news to the user."""
  logging.set_verbosity(logging.INFO if verbose else logging.WARNING)
  py_logging.getLogger().setLevel(py_logging.INFO if verbose else py_logging.WARNING)
  if not verbose:
    logging.get_absl_logger().addFilter(_not_orbax)
    sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)


def _not_orbax(record: py_logging.LogRecord) -> bool:
  """Logging filter: False for orbax's records."""
  return f"{os.sep}orbax{os.sep}" not in (record.pathname or "")


def _quiet_unraisable(hook):
  """sys.unraisablehook that drops "Event loop is closed" (TensorStore's callbacks into the
  event loop of an orbax writer that already stopped after an error) and passes the rest on."""
  def quiet(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and "Event loop is closed" in str(unraisable.exc_value)):
      hook(unraisable)
  return quiet


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
    fail(error_line(e), EXIT_ERROR)


def error_line(e: BaseException) -> str:
  """The one line an error exits with: our own errors' messages as they are; an operating
  system error (a full disk, a read-only file system, a missing folder) as what failed on
  which path, and what to do."""
  if not isinstance(e, OSError) or e.errno is None:
    return str(e)
  path = e.filename or "?"
  line = f"{path}: {e.strerror or e}"
  if e.errno == errno.ENOSPC:
    line += (f" ({_free_bytes(path):,} bytes free there); free some space and run the same "
             f"command again: it resumes from the newest complete checkpoint")
  elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
    line += "; write to another place (e.g. another --workdir / --out)"
  return line


def _free_bytes(path: str) -> int:
  """Bytes available on the file system holding `path` (its nearest existing parent)."""
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  try:
    st = os.statvfs(path)
  except OSError:
    return 0
  return st.f_bavail * st.f_frsize


def fail(message: str, status: int) -> None:
  """`error: <message>` on stderr, then exit with `status`."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


# ----------------------------------------------------------------------------- flag parsing


def _override_field(name: str, argv) -> str:
  """The first `--<name>.<field>=...` override of argv whose field no run config has."""
  from qgnn_jax import run_config  # pylint: disable=g-import-not-at-top
  for arg in argv:
    m = re.match(rf"--{re.escape(name)}\.([^=]+)", arg)
    if m and m.group(1).split(".")[0] not in run_config.FIELD_CHECKS:
      return m.group(1)
  return "?"


def define_config_flag(name: str, default: str, help_string: str) -> None:
  """`--<name>` as an ml_collections config file flag (locked), for the __main__ block.

  ml_collections reads the `--<name>.field=value` overrides while defining the flag (it
  types them from the default config); a field the config does not have exits 2 with one
  line naming it and the closest valid field.
  """
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  try:
    config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)
  except (AttributeError, KeyError):
    from qgnn_jax import run_config  # pylint: disable=g-import-not-at-top
    fail(str(run_config.unknown_field_error(_override_field(name, sys.argv))), EXIT_CONFIG)


def config_file_error(path: str, e: BaseException) -> str:
  """One line for a config file that cannot be used: missing, a syntax error (with its
  line), no get_config(), or get_config() raising."""
  if isinstance(e, SyntaxError):
    return (f"config file {e.filename or path}, line {e.lineno}: syntax error: {e.msg}"
            f"{': ' + e.text.strip() if e.text else ''}")
  if path and not os.path.isfile(path.split(":")[0]):
    return f"config file {path} not found (--config takes a .py file defining get_config())"
  if isinstance(e, AttributeError) and "get_config" in str(e):
    return f"config file {path} defines no get_config()"
  return f"config file {path}: get_config() failed: {type(e).__name__}: {e}"


def parse_flags(argv):
  """app.run's flags_parser: absl's parsing, with every failure one line and exit 2 (absl
  itself exits 1 with a usage dump); config file flags are loaded here, so a missing or
  broken config file is reported before anything runs."""
  fl = flags.FLAGS
  try:
    rest = fl(argv)
  except flags.Error as e:
    fail(f"{e} (--helpfull lists the flags)", EXIT_CONFIG)
  except Exception as e:  # pylint: disable=broad-except
    # A config file that does not parse raises from inside absl's parsing.
    fail(config_file_error(_config_path(fl), e), EXIT_CONFIG)
  for name in fl:
    if type(fl[name]).__name__ == "_ConfigFlag":
      try:
        # A missing file gives a placeholder that raises on first use: use it here.
        getattr(getattr(fl, name), "items")
      except Exception as e:  # pylint: disable=broad-except
        fail(config_file_error(_config_path(fl, name), e), EXIT_CONFIG)
  return rest


def _config_path(fl, name: str = "config") -> str:
  try:
    from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
    return config_flags.get_config_filename(fl[name]) or ""
  except Exception:  # pylint: disable=broad-except
    return ""
