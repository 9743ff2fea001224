"""Make tests/fixtures/official_vig/: the official PyTorch ViG's outputs at reduced size.

    python tools/make_official_fixture.py --vig_pytorch /tmp/peer-vig/vig_pytorch \
        --out tests/fixtures/official_vig

Needs PyTorch and numpy (not jax; e.g. the venv `shared/peer_vig/setup.sh` makes) and a
snapshot of the official code: the `vig_pytorch/` folder of
github.com/huawei-noah/Efficient-AI-Backbones (imported from the path given, never copied
into this project). Deterministic (torch.manual_seed / numpy seeds); writes:

* `vig.npz`, `pvig.npz`: the official isotropic `vig.DeepGCN` and pyramid
  `pyramid_vig.DeepGCN`, built by their own constructors with the official ViG-Ti options but
  reduced width and depth (ARCHS below), random weights rounded to float16 (stored as
  float16: exact, half the bytes), BN statistics and position embeddings random too. Keys:
  `sd/<official state-dict name>` (the state dict; the pyramid's large `relative_pos`
  tables are left out, its last stage's kept so the converter's value check sees official
  numbers), `images_dx`: the images (2, 224, 224, 3) uint8 as differences along the width
  (`np.cumsum(images_dx, axis=2, dtype=np.uint8)` gives them back; smooth images' differences
  compress, their pixels do not), `logits` (2, 10) float32 of the official
  model in eval mode on `(images / 255 - 0.5) / 0.5` (the official mean = std = 0.5),
  `knn/<official Grapher name>` (2, N, k) uint8/uint16: the neighbour indices each Grapher's
  `DenseDilatedKnnGraph` returned (edge_index[0], after dilation).
* `official_shapes.json`: {ours: {official state-dict name: shape}} of the 7 full-size
  official models (vig_ti/s/b_224_gelu, pvig_ti/s/m/b_224_gelu), num_classes 1000.
* `provenance.json`: torch version, the sha256 of each official source file used, ARCHS.

With `--full NAME` (repeatable) it writes instead `<out>/NAME_full.npz` (`sd/...` float32
with every tensor, `images` (1, 224, 224, 3) uint8, `logits` (1, 1000), `knn/...` int32)
and `<out>/NAME_full.pth` / `NAME_full_sd.npz` (the state dict alone, torch.save / numpy)
of the full-size official model
with random weights: the full-size equality (`tools/official_equality.py`) and conversion
timings (too large to commit).

`tests/test_convert_official.py` checks `qgnn_jax.official` against these files.
"""
import argparse
import hashlib
import json
import os
import sys
import types

import numpy as np

ARCHS = {
    # Isotropic: 5 blocks (k 9..18, block 4 dilated by 2), 32 channels (stem 4/8/16/32/32).
    "vig": dict(n_filters=32, n_blocks=5),
    # Pyramid: 4 stages (r = 4, 2, 1, 1), blocks 4 and 5 dilated by 2.
    "pvig": dict(channels=[16, 32, 48, 64], blocks=[1, 1, 3, 1]),
}
NUM_CLASSES = 10
FULL = {  # ours -> official constructor
    "vig_ti_224": ("vig", "vig_ti_224_gelu"), "vig_s_224": ("vig", "vig_s_224_gelu"),
    "vig_b_224": ("vig", "vig_b_224_gelu"), "pvig_ti_224": ("pyramid_vig", "pvig_ti_224_gelu"),
    "pvig_s_224": ("pyramid_vig", "pvig_s_224_gelu"),
    "pvig_m_224": ("pyramid_vig", "pvig_m_224_gelu"),
    "pvig_b_224": ("pyramid_vig", "pvig_b_224_gelu")}


def stub_timm():
  """The few timm names vig_pytorch imports (timm itself is not needed at drop-path 0)."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel

  def mod(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m

  class DropPath(nn.Identity):
    def __init__(self, *a, **k):
      super().__init__()

  mod("timm")
  mod("timm.data", IMAGENET_DEFAULT_MEAN=(0.485, 0.456, 0.406),
      IMAGENET_DEFAULT_STD=(0.229, 0.224, 0.225))
  mod("timm.models")
  mod("timm.models.helpers", load_pretrained=None)
  mod("timm.models.layers", DropPath=DropPath, to_2tuple=lambda x: (x, x),
      trunc_normal_=torch.nn.init.trunc_normal_)
  mod("timm.models.registry", register_model=lambda f: f)


def opt(kind, **over):
  """The official ViG-Ti options (vig_ti_224_gelu / pvig_ti_224_gelu's OptInit), overridden."""
  o = types.SimpleNamespace(k=9, conv="mr", act="gelu", norm="batch", bias=True, dropout=0.0,
                            use_dilation=True, epsilon=0.2, use_stochastic=False, drop_path=0.0,
                            n_classes=NUM_CLASSES)
  if kind == "vig":
    o.n_blocks, o.n_filters = 12, 192
  else:
    o.blocks, o.channels, o.emb_dims = [2, 2, 6, 2], [48, 96, 240, 384], 1024
  o.__dict__.update(over)
  return o


def randomize(model, torch, seed, branch_scale=1.0):
  """Every parameter and BN statistic random, rounded to float16 (exactly representable).

  branch_scale multiplies the scale of the BN that ends each residual branch (Grapher's
  and FFN's fc2.1): 1/sqrt(blocks) keeps a full-size model's activations and logits of
  order 1-100, as in a trained one, instead of growing with depth."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
      if name.endswith("relative_pos") or name.endswith("num_batches_tracked"):
        continue
      if name.endswith("running_var"):
        v = 0.5 + torch.rand(t.shape, generator=g)
      elif t.ndim == 4 and not name.endswith("pos_embed"):  # conv weight: N(0, 1/fan_in)
        v = torch.randn(t.shape, generator=g) / np.sqrt(t[0].numel())
      elif name.endswith("weight"):  # BN scale
        v = 0.5 + torch.rand(t.shape, generator=g)
        if name.endswith(".fc2.1.weight"):
          v = v * branch_scale
      else:  # biases, BN shifts and means, position embedding
        v = 0.1 * torch.randn(t.shape, generator=g)
      t.copy_(v.half().float())


def images(seed):
  """(2, 224, 224, 3) uint8: smooth random colour fields (a 17x17 grid of random colours,
  bilinear to 224 px; smooth, so that they compress)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(2):
    coarse = rng.uniform(0, 255, (17, 17, 3))
    t = np.linspace(0, 16, 224)
    i0 = np.minimum(t.astype(int), 15)
    f = (t - i0)[:, None, None]
    rows = coarse[i0] * (1 - f) + coarse[i0 + 1] * f  # (224, 17, 3)
    f2 = (t - i0)[None, :, None]
    img = rows[:, i0] * (1 - f2) + rows[:, i0 + 1] * f2
    out.append(np.clip(np.round(img), 0, 255).astype(np.uint8))
  return np.stack(out)


def run_official(model, torch, imgs):
  """Official logits and each Grapher's k-NN indices ({grapher name: (B, N, k)})."""
  knn = {}

  def hook(name):
    def fn(_, __, out):
      knn[name] = out[0].numpy()
    return fn

  for name, m in model.named_modules():
    if name.endswith("graph_conv.dilated_knn_graph"):
      m.register_forward_hook(hook(name[:-len(".graph_conv.dilated_knn_graph")]))
  x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()
  x = (x / 255.0 - 0.5) / 0.5
  model.eval()
  with torch.no_grad():
    logits = model(x).numpy()
  return logits, knn


def sha256(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--vig_pytorch", required=True, help="the official vig_pytorch/ folder")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--full", action="append", default=[], choices=sorted(FULL),
                 help="instead: <out>/<name>_full.npz of this full-size official model "
                 "(1000 classes, random float32 weights, every tensor incl. relative_pos; "
                 "one image) and its .pth, for equality at full size (repeatable)")
  a = p.parse_args()
  stub_timm()
  if not hasattr(np, "float"):  # gcn_lib/pos_embed.py uses the alias numpy 1.24 removed
    np.float = float
  sys.path.insert(0, os.path.abspath(a.vig_pytorch))
  import torch  # pylint: disable=import-outside-toplevel
  import pyramid_vig  # pylint: disable=import-outside-toplevel
  import vig  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  torch.set_num_threads(1)
  os.makedirs(a.out, exist_ok=True)
  mods = {"vig": vig, "pyramid_vig": pyramid_vig}
  for ours in a.full:
    module, fn = FULL[ours]
    model = getattr(mods[module], fn)(num_classes=1000)
    seed = 100 + sorted(FULL).index(ours)
    randomize(model, torch, seed, branch_scale=1.0 / np.sqrt(model.n_blocks))
    imgs = images(seed)[:1]
    logits, knn = run_official(model, torch, imgs)
    sd = model.state_dict()
    torch.save(sd, os.path.join(a.out, f"{ours}_full.pth"))
    np.savez(os.path.join(a.out, f"{ours}_full_sd.npz"), **{n: t.numpy() for n, t in sd.items()})
    out = {"images": imgs, "logits": logits.astype(np.float32)}
    out.update({f"sd/{n}": t.numpy() for n, t in sd.items()})
    out.update({f"knn/{n}": idx.astype(np.int32) for n, idx in knn.items()})
    np.savez(os.path.join(a.out, f"{ours}_full.npz"), **out)
    print(ours, "logits[:5]", logits[0, :5].round(4).tolist())
  if a.full:
    return

  for seed, (kind, arch) in enumerate(ARCHS.items()):
    model = (vig if kind == "vig" else pyramid_vig).DeepGCN(opt(kind, **arch))
    randomize(model, torch, seed)
    imgs = images(seed)
    logits, knn = run_official(model, torch, imgs)
    sd = model.state_dict()
    keep_rel = [k for k in sd if k.endswith("relative_pos")][-1:]  # the last (smallest) one
    dx = np.diff(imgs, axis=2, prepend=np.zeros_like(imgs[:, :, :1]))  # uint8, mod 256
    assert np.array_equal(np.cumsum(dx, axis=2, dtype=np.uint8), imgs)
    out = {"images_dx": dx, "logits": logits.astype(np.float32)}
    for k, t in sd.items():
      if k.endswith("relative_pos") and k not in keep_rel:
        continue
      v = t.numpy()
      out[f"sd/{k}"] = v.astype(np.float16) if v.dtype == np.float32 and not k.endswith(
          "relative_pos") else v
    for name, idx in knn.items():
      out[f"knn/{name}"] = idx.astype(np.uint8 if idx.max() < 256 else np.uint16)
    np.savez_compressed(os.path.join(a.out, f"{kind}.npz"), **out)
    print(kind, "logits", logits.round(4).tolist())

  shapes = {}
  for ours, (module, fn) in FULL.items():
    m = getattr(mods[module], fn)(num_classes=1000)
    shapes[ours] = {k: list(t.shape) for k, t in m.state_dict().items()}
  with open(os.path.join(a.out, "official_shapes.json"), "w") as f:
    json.dump(shapes, f, separators=(",", ":"))
  files = ["vig.py", "pyramid_vig.py", "gcn_lib/torch_vertex.py", "gcn_lib/torch_edge.py",
           "gcn_lib/torch_nn.py", "gcn_lib/pos_embed.py"]
  prov = {"torch": torch.__version__, "numpy": np.__version__, "archs": ARCHS,
          "num_classes": NUM_CLASSES,
          "sha256": {f: sha256(os.path.join(a.vig_pytorch, f)) for f in files}}
  with open(os.path.join(a.out, "provenance.json"), "w") as f:
    json.dump(prov, f, indent=1)


if __name__ == "__main__":
  main()
