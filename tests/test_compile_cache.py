"""qgnn_jax.compile_cache: where the cache goes, that it is written, and that 'off' is off."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from qgnn_jax import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_dir_precedence(monkeypatch, tmp_path):
  monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compile_cache.default_dir() == str(tmp_path / "xdg" / "qgnn_jax" /
                                            "jax_compilation_cache")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
  assert compile_cache.default_dir() == str(tmp_path / "jax")
  monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "ours"))
  assert compile_cache.default_dir() == str(tmp_path / "ours")


def test_second_process_reads_what_the_first_wrote(tmp_path):
  """Two processes compile the same program: the first writes an entry, the second adds none
  (it was served from the cache); with 'off' nothing is written."""
  code = ("import sys, jax, jax.numpy as jnp\n"
          "from qgnn_jax import compile_cache\n"
          "compile_cache.MIN_COMPILE_SECONDS = 0.0\n"
          "print(compile_cache.enable(sys.argv[1]))\n"
          "f = jax.jit(lambda x: jnp.sin(x) @ x.T + 3.0)\n"
          "f(jnp.ones((17, 5))).block_until_ready()\n")
  env = {k: v for k, v in os.environ.items() if k != compile_cache.ENV_VAR}
  run = lambda where: subprocess.run([sys.executable, "-c", code, where], cwd=ROOT, env=env,
                                     check=True, capture_output=True, text=True).stdout
  cache = tmp_path / "cache"
  assert run(str(cache)).strip() == str(cache)
  first = sorted(os.listdir(cache))
  assert any(name.startswith("jit__lambda") for name in first), first
  run(str(cache))
  assert sorted(os.listdir(cache)) == first
  assert run("off").strip() == "None"


def test_off_disables_in_process():
  before = jax.config.jax_enable_compilation_cache
  try:
    assert compile_cache.enable("off") is None
    assert not jax.config.jax_enable_compilation_cache
  finally:
    jax.config.update("jax_enable_compilation_cache", before)
  jnp.zeros(1).block_until_ready()
