"""Input-pipeline throughput: images/s of the training iterator alone (no model).

    python -m experiments.input_bench --dataset fashion_mnist --batch 128 --repeats 7

Times `qgnn_jax.data.train_batches` (grain: sampler, crop + flip, normalisation, worker
threads, prefetch) with and without the copy to the local devices, medians over
repeats after one warm-up batch. It must stay well above what the model trains at.
"""
import json
import statistics
import time

from absl import app, flags

flags.DEFINE_string("dataset", "fashion_mnist", "An in-memory dataset (qgnn_jax.data.DATASETS).")
flags.DEFINE_integer("batch", 128, "Global batch size.")
flags.DEFINE_integer("steps", 200, "Batches timed per repeat.")
flags.DEFINE_integer("repeats", 7, "Repeats (a new iterator and seed each); the median is reported.")
flags.DEFINE_list("threads", ["0", "2"], "Worker-thread counts to time.")
flags.DEFINE_bool("augment", True, "Random crop + flip.")
flags.DEFINE_string("json", "", "Write the numbers to this file.")


def time_iterator(make, batch: int, steps: int) -> float:
  """img/s of `steps` batches from `make()` after one warm-up batch."""
  it = make()
  b = next(it)
  t = time.perf_counter()
  for _ in range(steps):
    b = next(it)
  if hasattr(b["image"], "block_until_ready"):
    b["image"].block_until_ready()
  rate = batch * steps / (time.perf_counter() - t)
  if hasattr(it, "close"):
    it.close()
  return rate


def main(argv):
  del argv
  from qgnn_jax import data  # pylint: disable=g-import-not-at-top
  fl = flags.FLAGS
  x, y, info = data.load_arrays(fl.dataset, "train")
  out = {"dataset": fl.dataset, "batch": fl.batch, "steps": fl.steps, "augment": fl.augment,
         "img_per_s": {}}
  for device_put in (False, True):
    for threads in (int(t) for t in fl.threads):
      rates = [time_iterator(lambda r=r: data.train_batches(
          x, y, info, fl.batch, seed=r, augment=fl.augment, num_threads=threads,
          device_put=device_put), fl.batch, fl.steps) for r in range(fl.repeats)]
      key = f"threads={threads},device_put={device_put}"
      out["img_per_s"][key] = {"median": statistics.median(rates), "all": rates}
      print(f"{key}: {statistics.median(rates):,.0f} img/s (median of {fl.repeats})")
  if fl.json:
    with open(fl.json, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  app.run(main)
