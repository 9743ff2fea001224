import os

# Two fake CPU devices for the pmap tests; must be set before jax is imported. Appended to
# a user's own XLA_FLAGS (a setdefault would skip every 2-device test silently), unless
# they set a device count themselves.
_DEVICES_FLAG = "--xla_force_host_platform_device_count"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}=2".strip()

# JAX's persistent compilation cache for the tests and every subprocess they start
# (README, "Compilation cache"): the same train step compiled by several tests, or by a
# test's `python -m experiments.run`, is compiled once.
from qgnn_jax import compile_cache  # pylint: disable=g-import-not-at-top,wrong-import-position

os.environ.setdefault(compile_cache.ENV_VAR, compile_cache.default_dir())
compile_cache.enable()


import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
  """A test worker runs file after file in one process, and every file's compiled programs
  stayed in JAX's in-memory caches: a worker reached 6 GB and was OOM-killed on a 23 GB
  machine (issue 24's suite run). A finished file's programs are dropped; the persistent
  cache keeps them on disk for the next test that compiles the same one."""
  yield
  jax.clear_caches()
