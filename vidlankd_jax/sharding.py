"""Device mesh, logical-axis sharding, host-local batches -> global arrays.

The mesh has three axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and
optimiser state sharded) and `tensor` (model parallel inside layers). Models annotate weights
with logical axis names; `logical_axis_rules` in the config binds them to mesh axes, so the same
model runs unchanged on one CPU, a GPU or a pod slice.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from vidlankd_jax import errors

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical parameter/activation axis name -> mesh axes (MaxText style). Configs carry a copy
# (`config.sharding_rules`) that users may change per run.
DEFAULT_RULES = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("length", None),
    ("memory", BATCH_AXES),
)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Resolves the config's (data, fsdp, tensor) sizes; one -1 takes the remaining devices."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
          f"mesh: {num_devices} devices are not divisible by the fixed axes "
          f"{dict(zip(MESH_AXES, sizes))}"
      )
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
        f"{num_devices} are available"
    )
  return tuple(sizes)


def torus_shape(devices: list) -> tuple[int, ...] | None:
  """The physical (x, y, z) extent of one slice's chips (TPU devices carry coordinates), or
  None for devices without coordinates."""
  coords = [getattr(d, "coords", None) for d in devices]
  if any(c is None for c in coords):
    return None
  slices = {getattr(d, "slice_index", 0) for d in devices}
  first = [c for d, c in zip(devices, coords) if getattr(d, "slice_index", 0) == min(slices)]
  return tuple(max(c[i] for c in first) - min(c[i] for c in first) + 1 for i in range(3))


def torus_sizes(torus: tuple[int, ...]) -> list[int]:
  """The axis sizes a torus can hold whole: products of some of its dimensions."""
  sizes = {1}
  for dim in torus:
    sizes |= {s * dim for s in sizes}
  return sorted(sizes)


def misfit_error(shape: tuple[int, int, int], devices: list, num_slices: int) -> errors.ConfigError:
  """One line naming the mesh axis the torus cannot hold and the setting that fixes it."""
  torus = torus_shape(devices)
  where = "x".join(map(str, torus)) if torus else f"{len(devices) // num_slices} devices"
  fits = torus_sizes(torus) if torus else []
  axis = next(
      (a for a, s in zip(MESH_AXES, shape) if s > 1 and s not in fits),
      MESH_AXES[int(shape[0] == 1)],
  )
  size = dict(zip(MESH_AXES, shape))[axis]
  per_slice = " (per slice)" if num_slices > 1 else ""
  return errors.ConfigError(
      f"mesh: {axis} {size}{per_slice} of data x fsdp x tensor {'x'.join(map(str, shape))} cannot "
      f"be laid out on the {where} torus of the {devices[0].device_kind} slice: set "
      f"config.mesh.{axis} (and the other axes to match) to sizes the torus holds whole, "
      f"e.g. {', '.join(map(str, fits))}"
  )


def device_array(shape: tuple[int, int, int], devices: list, num_slices: int) -> np.ndarray:
  """The devices in mesh order, as a TPU or GPU host lays them out (`mesh_utils`): the
  physical torus for a whole platform or a topology's devices, slices along the data axis."""
  if num_slices > 1:
    if shape[0] % num_slices:
      raise ValueError(f"mesh: data axis {shape[0]} is not divisible by num_slices {num_slices}")
    ici = (shape[0] // num_slices, shape[1], shape[2])
    try:
      return mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices)
    except (NotImplementedError, AssertionError, ValueError) as e:
      raise misfit_error(ici, devices, num_slices) from e
  whole = len(devices) == jax.device_count() or devices[0] not in jax.devices()
  if devices[0].platform in ("tpu", "gpu") and whole:
    try:
      return mesh_utils.create_device_mesh(shape, devices)
    except (NotImplementedError, AssertionError, ValueError) as e:
      raise misfit_error(shape, devices, 1) from e
  return np.asarray(devices).reshape(shape)


def make_mesh(mesh_cfg, devices: list | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axis types, over `devices` (default: this process's
  platform's; a TPU topology's devices for ahead-of-time compilation).

  With `num_slices > 1` (multi-slice pods) the devices are laid out by
  `create_hybrid_device_mesh`, the data axis spanning slices over the slower DCN network. A
  shape the physical torus cannot hold is a ConfigError naming the axis and the setting.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  array = device_array(shape, devices, int(mesh_cfg.get("num_slices", 1)))
  return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def single_device_mesh(device=None) -> Mesh:
  """A 1x1x1 mesh: what unit tests and single-device tools build models under."""
  device = device or jax.devices()[0]
  return Mesh(
      np.asarray([device]).reshape(1, 1, 1), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES)
  )


def rules_from_config(rules) -> tuple:
  """ml-collections turns tuples into lists: back to a tuple of (name, axes) pairs."""

  def axes(a):
    return tuple(a) if isinstance(a, (list, tuple)) else a

  return tuple((str(name), axes(a)) for name, a in rules)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules) -> Iterator[None]:
  """Makes `mesh` current and binds the logical axis rules (models must be built inside)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules_from_config(rules)):
    yield


def create_sharded(ctor: Callable[[], Any], mesh: Mesh, rules, *, abstract: bool = False) -> Any:
  """Builds an nnx module (or any nnx object) with every annotated weight sharded on `mesh`.

  `abstract`: the module's shapes, dtypes and shardings only (`nnx.eval_shape`), no weights
  made: what ahead-of-time compilation for a pod needs. The mesh is set outside the trace.
  """
  with mesh_context(mesh, rules):
    return nnx.eval_shape(ctor) if abstract else ctor()


def on_mesh(tree: Any, mesh: Mesh) -> Any:
  """Abstract arrays (`jax.ShapeDtypeStruct`) with their NamedShardings moved onto `mesh` (the
  concrete mesh jit's shardings need; `nnx.eval_shape` gives the abstract mesh's)."""

  def place(x):
    spec = getattr(getattr(x, "sharding", None), "spec", P())
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

  return jax.tree.map(place, tree)


def logical_to_sharding(logical: tuple, mesh: Mesh, rules) -> NamedSharding:
  """A NamedSharding for an array whose axes have the given logical names."""
  table = dict(rules_from_config(rules))
  return NamedSharding(mesh, P(*(table.get(name) if name else None for name in logical)))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_shardings(tree: Any) -> Any:
  """The current shardings of a pytree of arrays (for jit's in/out_shardings)."""
  return jax.tree.map(lambda x: x.sharding, tree)


def host_data_shard(mesh: Mesh, global_batch_size: int) -> tuple[int, int]:
  """(shard_index, num_shards) of the input data this process must read.

  Derived from which rows of the global batch this process's devices hold under
  `batch_sharding`, not from `process_index`: with tensor parallelism across hosts several hosts
  hold the same rows and must read the same shard.
  """
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
  ranges = sorted(
      {(idx[0].start or 0, idx[0].stop or global_batch_size) for idx in index_map.values()}
  )
  if any(prev[1] != nxt[0] for prev, nxt in zip(ranges, ranges[1:])):
    raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows {ranges}")
  first, last = ranges[0][0], ranges[-1][1]
  local_rows = last - first
  if global_batch_size % local_rows or first % local_rows:
    raise ValueError(
        f"global batch {global_batch_size} cannot be split into host shards of "
        f"{local_rows} rows"
    )
  return first // local_rows, global_batch_size // local_rows


def host_local_batch_size(mesh: Mesh, global_batch_size: int) -> int:
  _, num_shards = host_data_shard(mesh, global_batch_size)
  return global_batch_size // num_shards


def global_batch(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each host's local batch into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {
      k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
      for k, v in host_batch.items()
  }


def wait_for_all_processes(name: str, timeout_s: int = 3600) -> None:
  """A barrier of JAX's coordination service (not a device collective); no-op on one process.

  Hosts reach a program's first collective at different times (compiling, restoring); a CPU
  (gloo) collective gives up after 30 s, so the loop lines the hosts up first. `name` must be
  unique per barrier.
  """
  if jax.process_count() > 1:
    from orbax.checkpoint import multihost  # the coordination-service barrier Orbax uses

    multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


def agreed_maximum(key: str, value: int, *, forget: str | None = None, timeout_s: int = 600) -> int:
  """The largest `value` over all processes, exchanged through the coordination service's
  key-value store: host-side only (no device collective), so it is safe from any thread and
  never queues behind a running step. `key` is unique per exchange; `forget` names an earlier
  exchange whose entry of this process may go."""
  if jax.process_count() == 1:
    return int(value)
  # JAX has no public API for the coordination service's key-value store (`jax.distributed`
  # exports initialize/is_initialized/shutdown); its public exchanges (`multihost_utils`) are
  # device collectives, which from the prefetch thread could reach the devices in a different
  # order than the step's on each host. Orbax's barriers read the same client.
  from jax._src import distributed

  client = distributed.global_state.client
  client.key_value_set(f"{key}/{jax.process_index()}", str(int(value)))
  values = [
      int(client.blocking_key_value_get(f"{key}/{i}", timeout_s * 1000))
      for i in range(jax.process_count())
  ]
  if forget is not None:
    client.key_value_delete(f"{forget}/{jax.process_index()}")
  return max(values)


def describe_shardings(tree: Any) -> str:
  """One line per array: path, shape, dtype and partition spec (what a user checks on a pod)."""
  rows = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if isinstance(leaf, nnx.Variable):
      leaf = leaf.get_value()
    if not hasattr(leaf, "shape"):
      continue
    spec = getattr(getattr(leaf, "sharding", None), "spec", None)
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
    name = name.removesuffix("/value")
    rows.append((name, str(tuple(leaf.shape)), str(leaf.dtype), str(spec)))
  if not rows:
    return "(no arrays)"
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
