"""Dynamic patch graphs: k-NN construction, jraph GraphsTuples, max-relative aggregation.

All functions are pure. Shapes use B = images in the batch, N = nodes (patches)
per image, M = candidate neighbour nodes per image (M == N unless the keys are
pooled, as in the pyramid ViG), C = channels, K = neighbours per node.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import jraph


def _check_knn_args(n_keys: int, k: int, dilation: int) -> None:
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"k must be an int >= 1, got {k!r}")
  if not isinstance(dilation, int) or dilation < 1:
    raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")
  if k * dilation > n_keys:
    raise ValueError(
        f"k * dilation = {k} * {dilation} = {k * dilation} exceeds the "
        f"{n_keys} candidate nodes per image; need k * dilation <= {n_keys}")


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||_2, eps) along `axis` (as torch.nn.functional.normalize)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def pairwise_sq_distance(x: jax.Array, y: jax.Array) -> jax.Array:
  """Squared L2 distances. x: (B, N, C), y: (B, M, C) -> (B, N, M), float32."""
  x = x.astype(jnp.float32)
  y = y.astype(jnp.float32)
  inner = jnp.einsum("bnc,bmc->bnm", x, y)
  x2 = jnp.sum(x * x, axis=-1)[:, :, None]
  y2 = jnp.sum(y * y, axis=-1)[:, None, :]
  return x2 - 2.0 * inner + y2


def knn_graph(features: jax.Array, k: int, dilation: int = 1,
              keys: Optional[jax.Array] = None,
              relative_pos: Optional[jax.Array] = None) -> jax.Array:
  """Dilated k-nearest-neighbour lists of every node, per image.

  Features are L2-normalised over channels; the k·d nearest candidates (the
  node itself included, at distance 0, as in the official ViG) are found and
  every d-th of them is kept. Not differentiable: the selection is computed
  under `stop_gradient` and returns integers.

  Args:
    features: (B, N, C) node features (any float dtype).
    k: neighbours kept per node, int >= 1.
    dilation: d >= 1; k * d must not exceed M.
    keys: optional (B, M, C) candidate nodes (default: `features`, M = N).
    relative_pos: optional (N, M) float term added to the distances (pyramid
      ViG's relative position bias).
  Returns:
    (B, N, k) int32 neighbour indices into the M candidates of the same image.
  """
  if features.ndim != 3:
    raise ValueError(f"features must be (B, N, C), got shape {features.shape}")
  keys = features if keys is None else keys
  _check_knn_args(keys.shape[1], k, dilation)
  x = l2_normalize(jax.lax.stop_gradient(features).astype(jnp.float32))
  y = x if keys is features else l2_normalize(
      jax.lax.stop_gradient(keys).astype(jnp.float32))
  dist = pairwise_sq_distance(x, y)
  if relative_pos is not None:
    dist = dist + jax.lax.stop_gradient(relative_pos).astype(jnp.float32)
  _, idx = jax.lax.top_k(-dist, k * dilation)
  return idx[:, :, ::dilation].astype(jnp.int32)


def neighbors_to_graphs_tuple(nodes: jax.Array, neighbors: jax.Array) -> jraph.GraphsTuple:
  """Batch of fixed-degree neighbour lists -> one jraph.GraphsTuple.

  Edge e of node i in image b goes sender = b*M + neighbors[b, i, e] ->
  receiver = b*N + i, so messages flow from neighbour to centre and the edges
  of image b only touch nodes of image b.

  Args:
    nodes: (B, N, C) receiver-node features.
    neighbors: (B, N, K) int indices into each image's M sender nodes (M == N
      for an ordinary k-NN graph).
  Returns:
    GraphsTuple with nodes (B*N, C), senders/receivers (B*N*K,) int32,
    n_node = [N]*B, n_edge = [N*K]*B, edges = globals = None.
  """
  b, n, c = nodes.shape
  if neighbors.shape[:2] != (b, n):
    raise ValueError(f"neighbors {neighbors.shape} must be (B, N, K) = ({b}, {n}, K)")
  kk = neighbors.shape[2]
  m = n  # senders index the same node set; pooled keys are handled by the caller
  offsets = (jnp.arange(b, dtype=jnp.int32) * m)[:, None, None]
  senders = (neighbors.astype(jnp.int32) + offsets).reshape(-1)
  receivers = jnp.repeat(jnp.arange(b * n, dtype=jnp.int32), kk)
  return jraph.GraphsTuple(
      nodes=nodes.reshape(b * n, c), edges=None, globals=None,
      senders=senders, receivers=receivers,
      n_node=jnp.full((b,), n, jnp.int32), n_edge=jnp.full((b,), n * kk, jnp.int32))


def graphs_tuple_to_neighbors(graph: jraph.GraphsTuple, batch: int,
                              num_nodes: int) -> Tuple[jax.Array, jax.Array]:
  """Inverse of `neighbors_to_graphs_tuple` for a fixed-degree batch.

  Args:
    graph: GraphsTuple from `neighbors_to_graphs_tuple` (receivers sorted,
      K edges per node).
    batch: B (static). num_nodes: N per image (static).
  Returns:
    nodes (B, N, C) and neighbors (B, N, K) int32 local indices.
  """
  total_edges = graph.senders.shape[0]
  if total_edges % (batch * num_nodes):
    raise ValueError(f"{total_edges} edges is not a multiple of B*N = {batch * num_nodes}")
  kk = total_edges // (batch * num_nodes)
  nodes = graph.nodes.reshape(batch, num_nodes, -1)
  offsets = (jnp.arange(batch, dtype=jnp.int32) * num_nodes)[:, None, None]
  neighbors = graph.senders.reshape(batch, num_nodes, kk) - offsets
  return nodes, neighbors


def max_relative_segment(graph: jraph.GraphsTuple,
                         sender_nodes: Optional[jax.Array] = None) -> jax.Array:
  """Max-relative aggregation max_{j->i} (x_j - x_i) with jraph segment ops.

  Args:
    graph: GraphsTuple with nodes (T, C) (T = B*N receivers).
    sender_nodes: optional (S, C) features the senders index (default
      graph.nodes).
  Returns:
    (T, C) aggregated messages, graph.nodes' dtype. Differentiable w.r.t. node
    features (the gradient goes to the arg-max sender and, negated, to the
    receiver).
  """
  x = graph.nodes
  src = x if sender_nodes is None else sender_nodes
  messages = src[graph.senders] - x[graph.receivers]
  return jraph.segment_max(messages, graph.receivers, num_segments=x.shape[0],
                           indices_are_sorted=True)


def gather_max(src: jax.Array, neighbors: jax.Array) -> jax.Array:
  """max_k src[b, neighbors[b, n, k], c]: the channel-wise max over each node's neighbours.

  Args:
    src: (B, M, C) sender features (any float dtype); neighbors: (B, N, K) int indices
      into M.
  Returns:
    (B, N, C), src's dtype. Differentiable w.r.t. `src`: the gradient of each output goes
    to the one neighbour that attains the max (the first of them on a tie, as torch.max's
    backward in the official ViG), scattered straight into (B, M, C). The backward saves
    the (B, N, C) int32 arg-max sender instead of the (B, N, K, C) float mask and count
    that JAX's generic `reduce_max` derivative materialises.
  """
  return _gather_max(src, neighbors, src.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _gather_max(src, neighbors, num_senders):
  del num_senders  # the backward's scatter size (static)
  return jnp.max(_gather(src, neighbors), axis=2)


def _gather(src, neighbors):
  return jax.vmap(lambda s, idx: s[idx])(src, neighbors)  # (B, N, K, C)


def _gather_max_fwd(src, neighbors, num_senders):
  del num_senders
  gathered = _gather(src, neighbors)
  arg = jnp.argmax(gathered, axis=2)  # (B, N, C): first maximum along K
  out = jnp.max(gathered, axis=2)
  sender = jnp.take_along_axis(neighbors.astype(jnp.int32), arg.astype(jnp.int32), axis=2)
  return out, sender


def _gather_max_bwd(m, sender, g):
  b, _, c = g.shape
  # Flat index of (b, sender, c) in the (B, M, C) cotangent; a 1-D scatter-add of B*N*C.
  flat = (jnp.arange(b, dtype=jnp.int32)[:, None, None] * m + sender) * c + jnp.arange(
      c, dtype=jnp.int32)
  d_src = jnp.zeros((b * m * c,), g.dtype).at[flat.reshape(-1)].add(g.reshape(-1))
  return d_src.reshape(b, m, c), None


_gather_max.defvjp(_gather_max_fwd, _gather_max_bwd)


def max_relative_dense(x: jax.Array, neighbors: jax.Array,
                       keys: Optional[jax.Array] = None) -> jax.Array:
  """Max-relative aggregation for fixed-degree graphs by a dense gather.

  max_j (x_j - x_i) = max_j x_j - x_i, so the subtraction happens once per node
  instead of once per edge.

  Args:
    x: (B, N, C) node features; neighbors: (B, N, K) int indices into keys.
    keys: optional (B, M, C) sender features (default x).
  Returns:
    (B, N, C), the same values as `max_relative_segment` on the equivalent GraphsTuple,
    and the same gradients where the max is unique; on ties the gradient goes to the first
    arg-max neighbour (torch.max's rule) where jraph's segment_max splits it (`gather_max`).
  """
  return gather_max(x if keys is None else keys, neighbors) - x


# The implementations of max_relative (the models' and run configs' `graph_impl`).
GRAPH_IMPLS = ("dense", "segment")


def max_relative(x: jax.Array, neighbors: jax.Array, keys: Optional[jax.Array] = None,
                 impl: str = "dense") -> jax.Array:
  """Dispatch to the dense or the jraph path (one of GRAPH_IMPLS). x: (B, N, C) -> (B, N, C)."""
  if impl == "dense":
    return max_relative_dense(x, neighbors, keys)
  if impl == "segment":
    b, n, c = x.shape
    if keys is None:
      graph = neighbors_to_graphs_tuple(x, neighbors)
      return max_relative_segment(graph).reshape(b, n, c)
    m = keys.shape[1]
    graph = neighbors_to_graphs_tuple(x, neighbors)
    # Senders index the pooled key set: re-offset them by M per image.
    senders = (neighbors.astype(jnp.int32)
               + (jnp.arange(b, dtype=jnp.int32) * m)[:, None, None]).reshape(-1)
    graph = graph._replace(senders=senders)
    return max_relative_segment(graph, keys.reshape(b * m, c)).reshape(b, n, c)
  raise ValueError(f"impl={impl!r}; valid: {GRAPH_IMPLS}")
