"""Defaults shared by every config: the library's (`qgnn_jax.run_config.defaults`, where
each field is explained); each config file overrides what it needs."""
import ml_collections

from qgnn_jax import run_config


def base_config() -> ml_collections.ConfigDict:
  """A fresh copy of every run field at its default (`qgnn_jax.run_config.defaults`)."""
  return run_config.defaults()
