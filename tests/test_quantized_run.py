"""A quantized (QAT) run end to end: init_from copies the FP run's weights into the
quantized model (every FP leaf, exactly; the quantizers' state added), and a QAT run
stopped at a checkpoint and resumed ends bit-identical to one that ran through."""
import jax
import numpy as np

import helpers
from qgnn_jax import checkpoint as ckpt
from qgnn_jax import experiment


_config = helpers.tiny_fp_config  # the tiny FP run every run test shares


def test_init_from_copies_the_fp_weights_and_a_resumed_qat_run_is_bit_identical(tmp_path):
  fp_dir = str(tmp_path / "fp")
  experiment.train_and_evaluate(_config(), fp_dir)
  fp = ckpt.flatten_with_paths(ckpt.restore_from(fp_dir))
  qat = _config(method="pq", init_from=fp_dir)

  # What a fresh QAT run starts from: the FP run's params and BN statistics, leaf by leaf.
  run = experiment.setup(qat, str(tmp_path / "init"))
  try:
    begun = experiment.restore_or_init(run)
  finally:
    run.manager.close()
  start = ckpt.flatten_with_paths(jax.device_get(begun.state))
  copied = [p for p in start if p[0] in ("params", "batch_stats") and p in fp]
  assert len(copied) > 20 and begun.progress.fp_top1 is not None
  for p in copied:
    np.testing.assert_array_equal(start[p], fp[p], err_msg="/".join(p))
  assert any(p not in fp for p in start if p[0] == "quant_stats")  # the sites' ranges

  # Stopped at step 2 and resumed == straight through (state, metrics, results).
  whole = experiment.train_and_evaluate(qat, str(tmp_path / "whole"))
  parts = str(tmp_path / "parts")
  assert experiment.train_and_evaluate(_config(method="pq", init_from=fp_dir, stop_at_step=2),
                                       parts) == {}
  resumed = experiment.train_and_evaluate(qat, parts)
  assert resumed["top1"] == whole["top1"] and resumed["eval_loss"] == whole["eval_loss"]
  a = ckpt.flatten_with_paths(ckpt.restore_from(str(tmp_path / "whole")))
  b = ckpt.flatten_with_paths(ckpt.restore_from(parts))
  assert a.keys() == b.keys()
  for p in a:
    np.testing.assert_array_equal(a[p], b[p], err_msg="/".join(p))
