"""Full-size equality of the converted official models: our logits against the official ones.

    python tools/official_equality.py DIR [NAME ...]

DIR holds `NAME_full.npz` files from `tools/make_official_fixture.py --full NAME` (the
official full-size model with random weights, one image, its logits and every Grapher's
k-NN indices). For each, the state dict is converted (`qgnn_jax.official.convert`) into
the registered model NAME and run on the same image twice: with the official k-NN indices
injected (`models.blocks.NEIGHBORS`) and free-running. Prints one JSON line per model:
`rel_injected` / `rel_free` = max |ours - official| / max |official| over the 1000 logits,
`top1_equal`, `knn_lists_equal` (the share of free-running neighbour lists, as sets, equal
to the official ones) and the first block where one differs, `rel_folded_vs_free` (the same
image through this project's imagenet2012 normalisation with the official one folded into
the first conv, against the free-running logits) and `top1_folded_equal`, `convert_s`.
"""
import json
import os
import sys
import time

import jax
import numpy as np


def with_knn(model, variables, x):
  """(logits, [each Grapher's (B, N, k) k-NN indices]) of a free-running forward."""
  from qgnn_jax import graph  # pylint: disable=import-outside-toplevel
  found, search = [], graph.knn_graph

  def recording(*args, **kwargs):
    found.append(search(*args, **kwargs))
    return found[-1]
  graph.knn_graph = recording
  try:
    return model.apply(variables, x), found
  finally:
    graph.knn_graph = search


def main(argv):
  from qgnn_jax import models, official  # pylint: disable=import-outside-toplevel
  from qgnn_jax.data import augment, get_info  # pylint: disable=import-outside-toplevel
  from qgnn_jax.models.blocks import NEIGHBORS  # pylint: disable=import-outside-toplevel
  folder, names = argv[1], argv[2:] or list(official.OFFICIAL_NAMES)
  for name in names:
    path = os.path.join(folder, f"{name}_full.npz")
    if not os.path.exists(path):
      print(json.dumps({"model": name, "skipped": f"no {path}"}))
      continue
    with np.load(path) as z:
      sd = {k[3:]: z[k] for k in z.files if k.startswith("sd/")}
      knn = {k[4:]: z[k] for k in z.files if k.startswith("knn/")}
      images, ref = z["images"], z["logits"]
    x = (images.astype(np.float32) / 255.0 - 0.5) / 0.5
    model = models.create_model(name, official.num_classes_of(sd, path))
    t0 = time.perf_counter()
    variables = official.convert(sd, model, name, path=path)
    convert_s = time.perf_counter() - t0
    f = jax.jit(lambda v, x, model=model: model.apply(v, x))
    neighbors = official.neighbors_variables(model, knn)
    injected = np.asarray(f({**variables, NEIGHBORS: neighbors}, x))
    free, ours = jax.jit(lambda v, x, model=model: with_knn(model, v, x))(variables, x)
    free = np.asarray(free)
    same = [np.all(np.sort(np.asarray(o), -1) == np.sort(neighbors[f"grapher{i}"]["indices"],
                                                          -1), -1) for i, o in enumerate(ours)]
    # The same image through this project's imagenet2012 normalisation, with the official
    # one folded into the first conv (what experiments.convert_official writes).
    info = get_info("imagenet2012")
    folded = official.fold_input_normalization(variables, info.mean, info.std)
    on_ours = np.asarray(f(folded, augment.normalize(images, info)))
    scale = float(np.max(np.abs(ref)))
    print(json.dumps({
        "model": name, "rel_injected": float(np.max(np.abs(injected - ref))) / scale,
        "rel_free": float(np.max(np.abs(free - ref))) / scale,
        "top1_equal": bool(np.array_equal(free.argmax(-1), ref.argmax(-1))),
        "knn_lists_equal": float(np.mean(np.concatenate([s.ravel() for s in same]))),
        "first_block_differing": next((i for i, s in enumerate(same) if not s.all()), None),
        "rel_folded_vs_free": float(np.max(np.abs(on_ours - free))) / scale,
        "top1_folded_equal": bool(np.array_equal(on_ours.argmax(-1), ref.argmax(-1))),
        "max_abs_logit": scale, "convert_s": round(convert_s, 2),
        "relative_pos_checked": sum(k.endswith("relative_pos") for k in sd)}), flush=True)


if __name__ == "__main__":
  main(sys.argv)
