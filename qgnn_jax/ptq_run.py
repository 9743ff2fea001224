"""`python -m experiments.run --config.ptq=true --config.init_from=FP_WORKDIR`: a run that
quantizes a trained full-precision model without training (docs/METHOD.md,
"Post-training quantization").

`experiment.restore_or_init` copies init_from's params and BN statistics into the
quantized model (fresh site state); `quantize(run, start)` then calibrates on
`config.ptq_batches` training batches and searches each site's activation range
(`qgnn_jax.qat.ptq`, `config.ptq_search`), writes the result as the checkpoint of step 0
and `ptq.json` (the choice of every site), and leaves the run with no training steps, so
`experiment.finish` evaluates it and writes results.json. `experiments.evaluate` and
`experiments.export` take the workdir as they take a trained one.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Tuple

import jax
import numpy as np

from qgnn_jax import checkpoint as ckpt
from qgnn_jax import results as results_lib
from qgnn_jax.qat import ptq as ptq_lib

PTQ_FILE = "ptq.json"


def calibration_batches(run, n: int) -> List[np.ndarray]:
  """The first n training batches' images, (B, H, W, C) on the host."""
  it = run.data["train"](0)
  out = []
  try:
    for _ in range(n):
      images = np.asarray(jax.device_get(next(it)["image"]))
      out.append(images.reshape((-1,) + images.shape[-3:]))
  finally:
    if hasattr(it, "close"):
      it.close()
  return out


def quantize(run, start) -> Tuple[Any, Any]:
  """Post-training quantization of a run (module docstring): `experiment.RunSetup` and
  `experiment.Start` -> the same with no training steps and the quantized state; writes
  ptq.json (its dict: which choice each site took) and the checkpoint of step 0."""
  config = run.config
  if not run.method.quantized:
    raise ValueError(f"config.ptq=true needs a quantized method; config.method="
                     f"{config.method!r} is full precision")
  if not config.init_from:
    raise ValueError("config.ptq=true quantizes a trained model: set config.init_from to "
                     "its workdir (or checkpoint directory)")
  run = dataclasses.replace(run, total_steps=0)
  if run.manager.latest_step() is not None:  # done before (resumed): the checkpoint holds it
    return run, start
  batches = calibration_batches(run, int(config.ptq_batches))
  variables, choices = ptq_lib.quantize(run.model, start.state.variables(), batches,
                                        search=config.ptq_search != "none")
  state = start.state.replace(params=variables["params"], quant_stats=variables["quant_stats"])
  report = {"search": config.ptq_search, "batches": len(batches),
            "images": int(sum(len(b) for b in batches)), "summary": ptq_lib.summary(choices),
            "sites": [dataclasses.asdict(c) for c in choices]}
  if run.main:
    results_lib.write_json_atomic(os.path.join(run.workdir, PTQ_FILE), report)
  meta = dataclasses.replace(start.progress, step=0, train_seconds=0.0).meta()
  ckpt.save(run.manager, 0, jax.device_get(state), force=True, meta=meta)
  ckpt.wait(run.manager)
  return run, dataclasses.replace(start, state=state)
