import os

# Two fake CPU devices for the pmap tests; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

# JAX's persistent compilation cache for the tests and every subprocess they start
# (README, "Compilation cache"): the same train step compiled by several tests, or by a
# test's `python -m experiments.run`, is compiled once.
from qgnn_jax import compile_cache  # pylint: disable=g-import-not-at-top,wrong-import-position

os.environ.setdefault(compile_cache.ENV_VAR, compile_cache.default_dir())
compile_cache.enable()
