"""Two layouts of a transformer's layers: stacked in the model, one entry per layer on disk.

In memory a `TransformerStack` holds its layers stacked (every weight of the layers in one array
with a leading layer axis), which a `lax.scan` runs and the optimiser updates as one array each:
the compiled step does not grow with the depth. Checkpoints, tools and weight import/export use
the per-layer layout `.../layers/<i>/...`, as BERT checkpoints always have. These functions move a
pure tree (nested dicts, tuples, lists) between the two at every `layers` node.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LAYERS = "layers"
PyTree = Any


def is_per_layer(node: dict) -> bool:
  """A `layers` node of the on-disk layout: its keys are the layer indices."""
  return bool(node) and all(str(k).isdigit() for k in node)


def _map_layers_nodes(tree: PyTree, fn) -> PyTree:
  """`fn(node)` applied to every dict under a `layers` key, the rest rebuilt as it was."""
  if isinstance(tree, dict):
    return {
        k: fn(v) if k == LAYERS and isinstance(v, dict) else _map_layers_nodes(v, fn)
        for k, v in tree.items()
    }
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # named tuples (optimiser states)
    return type(tree)(*(_map_layers_nodes(v, fn) for v in tree))
  if isinstance(tree, (tuple, list)):
    return type(tree)(_map_layers_nodes(v, fn) for v in tree)
  return tree


def _layer_slice(x, i: int):
  """Layer `i` of a stacked array, or of an abstract one (its sharding without the layer axis)."""
  if isinstance(x, jax.ShapeDtypeStruct):
    sharding = x.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
      sharding = jax.sharding.NamedSharding(
          sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:])
      )
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)
  return x[i]


def per_layer(tree: PyTree) -> PyTree:
  """Stacked `layers` nodes -> `{0: ..., 1: ..., ...}` (arrays, numpy or abstract arrays)."""

  def split(node):
    if is_per_layer(node):
      return {k: per_layer(v) for k, v in node.items()}
    leaves = jax.tree.leaves(node)
    if not leaves:
      return node
    count = leaves[0].shape[0]
    return {i: per_layer(jax.tree.map(lambda x: _layer_slice(x, i), node)) for i in range(count)}

  return _map_layers_nodes(tree, split)


def stacked(tree: PyTree) -> PyTree:
  """`{0: ..., 1: ..., ...}` `layers` nodes -> one stacked array per weight."""

  def stack(node):
    if not is_per_layer(node):
      return {k: stacked(v) for k, v in node.items()}
    layers = [stacked(node[k]) for k in sorted(node, key=int)]
    stack_fn = np.stack if isinstance(jax.tree.leaves(layers[0])[0], np.ndarray) else jnp.stack
    return jax.tree.map(lambda *xs: stack_fn(xs), *layers)

  return _map_layers_nodes(tree, stack)


def flat_per_layer_keys(path: str, num_layers: int) -> list[str] | None:
  """The on-disk keys of stacked weight `path` ("a/layers/b/c" -> ["a/layers/0/b/c", ...]), or
  None when `path` is not under a `layers` node."""
  parts = path.split("/")
  if LAYERS not in parts:
    return None
  at = parts.index(LAYERS) + 1
  return ["/".join(parts[:at] + [str(i)] + parts[at:]) for i in range(num_layers)]
