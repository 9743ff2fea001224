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
