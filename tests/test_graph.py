"""Tests for qgnn_jax.graph: k-NN graphs, GraphsTuple conversion, max-relative aggregation."""
import functools

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest

from helpers import host_variables
from qgnn_jax import graph
from qgnn_jax.models.blocks import Grapher


def _randn(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _np_knn(x, k, d, keys=None, rel=None):
  """Brute-force dilated k-NN in float64: (B, N, k) indices and the (B, N, M) distances."""
  x = np.asarray(x, np.float64)
  y = x if keys is None else np.asarray(keys, np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  y = y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-12)
  dist = np.sum((x[:, :, None, :] - y[:, None, :, :]) ** 2, axis=-1)
  if rel is not None:
    dist = dist + np.asarray(rel, np.float64)
  order = np.argsort(dist, axis=-1, kind="stable")
  return order[:, :, :k * d:d], dist


def _check_knn(idx, x, k, d, keys=None, rel=None):
  ref, dist = _np_knn(x, k, d, keys, rel)
  idx = np.asarray(idx)
  assert idx.shape == ref.shape and idx.dtype == np.int32
  # The chosen neighbours are as near as the brute-force ones (ties aside) ...
  got_d = np.take_along_axis(dist, idx, -1)
  want_d = np.take_along_axis(dist, ref, -1)
  np.testing.assert_allclose(got_d, want_d, atol=1e-5)
  # ... and are the same nodes wherever the ranking is unambiguous.
  srt = np.sort(dist, axis=-1)[:, :, :k * d + 1]
  gaps = np.diff(srt, axis=-1)
  ranks = np.arange(0, k * d, d)
  clear = np.minimum(gaps[:, :, ranks], np.where(ranks > 0, gaps[:, :, ranks - 1], np.inf))
  clear = clear > 1e-5
  assert clear.mean() > 0.9
  np.testing.assert_array_equal(idx[clear], ref[clear])


@pytest.mark.parametrize("k,d", [(1, 1), (3, 1), (4, 2), (5, 3), (2, 6)])
def test_knn_graph_matches_numpy(k, d):
  x = _randn(k * 10 + d, (3, 24, 8))
  idx = jax.jit(graph.knn_graph, static_argnums=(1, 2))(x, k, d)
  _check_knn(idx, x, k, d)
  # Every node is its own nearest neighbour (distance 0), as in the official ViG.
  np.testing.assert_array_equal(np.asarray(idx)[:, :, 0], np.broadcast_to(np.arange(24), (3, 24)))


@pytest.mark.parametrize("k,d", [(3, 1), (2, 2)])
def test_knn_graph_pooled_keys_and_relative_pos(k, d):
  x, keys = _randn(7, (2, 16, 6)), _randn(8, (2, 6, 6))
  rel = -np.random.default_rng(9).uniform(size=(16, 6)).astype(np.float32)
  knn = jax.jit(graph.knn_graph, static_argnums=(1, 2))
  _check_knn(knn(x, k, d, keys), x, k, d, keys)
  _check_knn(knn(x, k, d, keys, rel), x, k, d, keys, rel)


def test_knn_graph_bfloat16_and_jit():
  x = _randn(3, (2, 20, 8))
  a = jax.jit(functools.partial(graph.knn_graph, k=4, dilation=2))(x)
  b = jax.jit(functools.partial(graph.knn_graph, k=4, dilation=2))(x.astype(jnp.bfloat16))
  assert a.shape == b.shape == (2, 20, 4)
  _check_knn(a, x, 4, 2)


def test_knn_graph_rejects_bad_arguments():
  x = jnp.zeros((2, 10, 4))
  with pytest.raises(ValueError, match="exceeds"):
    graph.knn_graph(x, 4, 3)
  with pytest.raises(ValueError, match="k must be"):
    graph.knn_graph(x, 0)
  with pytest.raises(ValueError, match="dilation"):
    graph.knn_graph(x, 2, 0)
  with pytest.raises(ValueError, match=r"\(B, N, C\)"):
    graph.knn_graph(jnp.zeros((10, 4)), 2)


def test_graphs_tuple_round_trip():
  b, n, c, k = 3, 12, 5, 4
  x = _randn(0, (b, n, c))
  nbrs = jax.jit(graph.knn_graph, static_argnums=(1, 2))(x, k, 2)
  g = jax.jit(graph.neighbors_to_graphs_tuple)(x, nbrs)
  assert isinstance(g, jraph.GraphsTuple)
  np.testing.assert_array_equal(g.n_node, [n] * b)
  np.testing.assert_array_equal(g.n_edge, [n * k] * b)
  assert g.nodes.shape == (b * n, c) and g.senders.shape == g.receivers.shape == (b * n * k,)
  senders, receivers = np.asarray(g.senders), np.asarray(g.receivers)
  # Edges of image i only connect nodes of image i.
  np.testing.assert_array_equal(senders // n, receivers // n)
  np.testing.assert_array_equal(receivers // n, np.repeat(np.arange(b), n * k))
  assert np.all(np.diff(receivers) >= 0)
  # Each receiver has exactly its k neighbours, themselves included.
  np.testing.assert_array_equal(np.bincount(receivers, minlength=b * n), [k] * (b * n))
  nodes2, nbrs2 = graph.graphs_tuple_to_neighbors(g, b, n)
  np.testing.assert_array_equal(nodes2, x)
  np.testing.assert_array_equal(nbrs2, nbrs)
  # jraph's own unbatching sees B graphs of N nodes with local indices.
  parts = jraph.unbatch(g)
  assert len(parts) == b
  for i, p in enumerate(parts):
    assert int(p.n_node[0]) == n and int(p.n_edge[0]) == n * k
    np.testing.assert_array_equal(p.nodes, x[i])
    np.testing.assert_array_equal(np.asarray(p.senders).reshape(n, k), nbrs[i])


def test_graphs_tuple_rejects_mismatch():
  with pytest.raises(ValueError):
    graph.neighbors_to_graphs_tuple(jnp.zeros((2, 5, 3)), jnp.zeros((2, 4, 2), jnp.int32))
  g = graph.neighbors_to_graphs_tuple(jnp.zeros((2, 5, 3)), jnp.zeros((2, 5, 2), jnp.int32))
  with pytest.raises(ValueError):
    graph.graphs_tuple_to_neighbors(g, 3, 5)


@pytest.mark.parametrize("pooled", [False, True])
def test_segment_path_equals_dense_path(pooled):
  b, n, m, c, k = 2, 16, 6, 7, 3
  x = _randn(11, (b, n, c))
  keys = _randn(12, (b, m, c)) if pooled else None
  w = _randn(13, (b, n, c))
  nbrs = jax.jit(graph.knn_graph, static_argnums=(1, 2))(x, k, 1 if pooled else 2, keys)

  def loss(impl, x, keys):
    return jnp.sum(w * graph.max_relative(x, nbrs, keys, impl=impl))

  dense = jax.jit(functools.partial(graph.max_relative, impl="dense"))(x, nbrs, keys)
  seg = jax.jit(functools.partial(graph.max_relative, impl="segment"))(x, nbrs, keys)
  np.testing.assert_allclose(seg, dense, rtol=1e-6, atol=1e-6)
  # Direct check of the value: max_j (x_j - x_i).
  src = np.asarray(x if keys is None else keys)
  want = np.stack([src[i][np.asarray(nbrs[i])].max(1) for i in range(b)]) - np.asarray(x)
  np.testing.assert_allclose(dense, want, rtol=1e-6, atol=1e-6)

  argnums = (0, 1) if pooled else 0
  gd = jax.jit(jax.grad(functools.partial(loss, "dense"), argnums=argnums))(x, keys)
  gs = jax.jit(jax.grad(functools.partial(loss, "segment"), argnums=argnums))(x, keys)
  for a, bb in zip(jax.tree_util.tree_leaves(gd), jax.tree_util.tree_leaves(gs)):
    np.testing.assert_allclose(a, bb, rtol=1e-6, atol=1e-6)
  # The segment path on an explicit GraphsTuple gives the same numbers.
  if not pooled:
    g = graph.neighbors_to_graphs_tuple(x, nbrs)
    seg_g = jax.jit(graph.max_relative_segment)(g)
    np.testing.assert_allclose(seg_g.reshape(b, n, c), dense,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gather_max_equals_autodiff_of_reduce_max(dtype):
  """The hand-written backward (scatter to the arg-max sender) equals JAX's reduce_max
  derivative where every max is unique (random inputs), in values and gradients."""
  b, n, m, c, k = 3, 10, 7, 5, 4
  src = _randn(21, (b, m, c)).astype(dtype)
  nbrs = jax.random.randint(jax.random.key(22), (b, n, k), 0, m)
  # Neighbour lists without repeats, as k-NN gives (a repeat is a tie by construction).
  nbrs = jnp.argsort(jax.random.uniform(jax.random.key(23), (b, n, m)), axis=-1)[..., :k]
  w = _randn(24, (b, n, c)).astype(dtype)
  ref = lambda s: jnp.max(jax.vmap(lambda a, i: a[i])(s, nbrs), axis=2)
  np.testing.assert_array_equal(jax.jit(graph.gather_max)(src, nbrs), ref(src))
  g_new = jax.jit(jax.grad(lambda s: jnp.sum(w * graph.gather_max(s, nbrs)).astype(
      jnp.float32)))(src)
  g_ref = jax.jit(jax.grad(lambda s: jnp.sum(w * ref(s)).astype(jnp.float32)))(src)
  assert g_new.dtype == dtype
  np.testing.assert_allclose(np.asarray(g_new, np.float32), np.asarray(g_ref, np.float32),
                             rtol=1e-6, atol=1e-6)


def test_gather_max_gives_a_tie_to_the_first_neighbour():
  """Two neighbours with equal features: torch.max's rule (all to the first in the list),
  where reduce_max's derivative would split it in halves."""
  src = jnp.array([[[1.0, 5.0], [2.0, 5.0], [2.0, 0.0]]])  # (1, 3, 2): senders 1 and 2 tie
  nbrs = jnp.array([[[2, 1, 0]]])  # (1, 1, 3): sender 2 comes first
  g = jax.grad(lambda s: jnp.sum(graph.gather_max(s, nbrs)))(src)
  np.testing.assert_array_equal(g[0], [[0.0, 0.0], [0.0, 1.0], [1.0, 0.0]])


def test_max_relative_rejects_unknown_impl():
  with pytest.raises(ValueError, match="impl"):
    graph.max_relative(jnp.zeros((1, 4, 2)), jnp.zeros((1, 4, 2), jnp.int32), impl="sparse")


# ----------------------------------------------------------------------------
# The Grapher block: permutation equivariance, jraph path == dense path.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("train", [False, True])
def test_grapher_is_permutation_equivariant(train):
  b, h, w, c = 2, 4, 5, 8
  block = Grapher(k=4, dilation=2, r=1)
  x = _randn(0, (b, h, w, c))
  variables = host_variables(block, x)
  perm = np.random.default_rng(1).permutation(h * w)

  @jax.jit
  def run(x):
    return block.apply(variables, x, train=train, mutable=["batch_stats"])

  y, stats = run(x)
  xp = x.reshape(b, h * w, c)[:, perm].reshape(b, h, w, c)
  yp, stats_p = run(xp)
  np.testing.assert_allclose(yp.reshape(b, h * w, c), y.reshape(b, h * w, c)[:, perm],
                             rtol=1e-5, atol=1e-5)
  # BN batch statistics (train mode) are invariant to the node order too.
  for a, bb in zip(jax.tree_util.tree_leaves(stats), jax.tree_util.tree_leaves(stats_p)):
    np.testing.assert_allclose(a, bb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("r", [2])
def test_grapher_segment_equals_dense(r):
  x = _randn(5, (2, 4, 4, 8))
  dense = Grapher(k=3, r=r, graph_impl="dense")
  seg = Grapher(k=3, r=r, graph_impl="segment")
  variables = host_variables(dense, x)

  def loss(block, x):
    return jnp.sum(jnp.sin(block.apply(variables, x)))

  vd, gd = jax.jit(jax.value_and_grad(functools.partial(loss, dense)))(x)
  vs, gs = jax.jit(jax.value_and_grad(functools.partial(loss, seg)))(x)
  np.testing.assert_allclose(vs, vd, rtol=1e-5)
  np.testing.assert_allclose(gs, gd, rtol=1e-5, atol=1e-6)
