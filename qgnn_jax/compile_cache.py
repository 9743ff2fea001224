"""JAX's persistent compilation cache: compiled programs kept on disk between processes.

On by default for the command-line jobs (`experiments.run`, `evaluate`, `bench`, `sweep`) and
the tests: a second run of the same program (a restarted run, the teacher and student of a
sweep, a test's subprocess) loads the executable instead of compiling it again. The
directory is, in order of precedence: the `--compilation_cache` flag, the environment
variable QGNN_JAX_COMPILATION_CACHE, JAX's own JAX_COMPILATION_CACHE_DIR,
`$XDG_CACHE_HOME/qgnn_jax/jax_compilation_cache` (XDG_CACHE_HOME defaults to ~/.cache). The value
`off` (flag or variable) disables it. Entries are keyed by the program, the compile options,
the backend and the jax version, so a stale entry is never used for a changed program;
the directory can be deleted at any time.
"""
from __future__ import annotations

import os
from typing import Optional

ENV_VAR = "QGNN_JAX_COMPILATION_CACHE"
OFF = "off"
# Programs that compile faster than this are not written (tiny jits would only add files).
MIN_COMPILE_SECONDS = 0.5


def default_dir() -> str:
  """The cache directory when no flag is given (see the module docstring)."""
  for var in (ENV_VAR, "JAX_COMPILATION_CACHE_DIR"):
    if os.environ.get(var):
      return os.environ[var]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "qgnn_jax", "jax_compilation_cache")


def enable(cache_dir: Optional[str] = None) -> Optional[str]:
  """Turns the persistent cache on in `cache_dir` (default `default_dir()`); `off` disables.

  Returns the absolute directory in use, or None when disabled. Safe to call more than once
  and before or after the backend starts (jax reads the setting at the first compile).
  """
  import jax  # pylint: disable=g-import-not-at-top

  cache_dir = default_dir() if cache_dir is None else cache_dir
  if cache_dir.strip().lower() in (OFF, ""):
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
  os.makedirs(cache_dir, exist_ok=True)
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return cache_dir
