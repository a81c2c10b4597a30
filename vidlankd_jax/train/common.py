"""Pieces every training loop shares: optimiser, gradient accumulation, jitted steps, logging.

The pretraining stages run one loop (loop.py); fine-tuning keeps its own. What is here is the
machinery they would otherwise repeat.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import flax.struct
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

Array = jax.Array
PyTree = Any


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then linear decay to 0 at `total_steps`."""
  warmup = int(opt_cfg.warmup_steps)
  peak = float(opt_cfg.learning_rate)
  decay_steps = max(int(total_steps) - warmup, 1)
  return (
      optax.join_schedules(
          [
              optax.linear_schedule(0.0, peak, max(warmup, 1)),
              optax.linear_schedule(peak, 0.0, decay_steps),
          ],
          boundaries=[warmup],
      )
      if warmup > 0
      else optax.linear_schedule(peak, 0.0, decay_steps)
  )


def decay_mask(params: PyTree) -> PyTree:
  """Weight decay on matrices (kernels, embeddings) only: never on biases or LayerNorm."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(opt_cfg, total_steps: int) -> optax.GradientTransformation:
  """AdamW (no decay on biases/LayerNorm) with global-norm clipping and warmup + linear decay."""
  schedule = learning_rate_schedule(opt_cfg, total_steps)
  parts = []
  if opt_cfg.grad_clip_norm and opt_cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(opt_cfg.grad_clip_norm)))
  parts.append(
      optax.adamw(
          schedule,
          b1=float(opt_cfg.b1),
          b2=float(opt_cfg.b2),
          eps=float(opt_cfg.eps),
          weight_decay=float(opt_cfg.weight_decay),
          mask=decay_mask,
      )
  )
  return optax.chain(*parts)


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes, as one pytree (checkpointed whole).

  `params` are trained; `frozen` are used but not trained (e.g. the teacher in distillation or a
  frozen video tower); `extra` holds state updated by the step other than by gradients (e.g. a CRD
  memory bank).
  """

  step: Array
  params: PyTree
  opt_state: PyTree
  frozen: PyTree = None
  extra: PyTree = None


def init_train_state(
    tx: optax.GradientTransformation, params: PyTree, frozen: PyTree = None, extra: PyTree = None
) -> TrainState:
  """Optimiser state created under jit so that it inherits the parameters' shardings.

  Scalars (the step, optimiser counts) are replicated over the parameters' mesh.
  """
  mesh = jax.tree.leaves(params)[0].sharding.mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  with jax.set_mesh(mesh):
    opt_state = jax.jit(tx.init)(params)
  opt_state = jax.tree.map(lambda x: jax.device_put(x, replicated) if x.ndim == 0 else x, opt_state)
  step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
  return TrainState(step=step, params=params, opt_state=opt_state, frozen=frozen, extra=extra)


def split_micro_batches(batch: dict[str, Array], num_micro: int) -> dict[str, Array]:
  """[B, ...] -> [num_micro, B / num_micro, ...] (strided, so each micro-batch spans all shards)."""

  def split(x):
    if x.shape[0] % num_micro:
      raise ValueError(f"batch of {x.shape[0]} is not divisible into {num_micro} micro-batches")
    return jnp.swapaxes(x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]), 0, 1)

  return jax.tree.map(split, batch)


LossFn = Callable[[PyTree, dict, Array], tuple[Array, dict]]


def accumulated_grads(
    loss_fn: LossFn, params: PyTree, batch: dict, rng: Array, num_micro: int
) -> tuple[PyTree, dict]:
  """Gradients of `loss_fn(params, batch, rng) -> (loss, metrics)` averaged over micro-batches.

  With `num_micro == 1` this is a plain `jax.grad`; otherwise a `lax.scan` over micro-batches
  keeps only one micro-batch of activations alive at a time.
  """
  grad_fn = jax.grad(loss_fn, has_aux=True)
  if num_micro == 1:
    return grad_fn(params, batch, rng)
  micro = split_micro_batches(batch, num_micro)

  def body(carry, xs):
    grads_sum, metrics_sum = carry
    micro_batch, i = xs
    grads, metrics = grad_fn(params, micro_batch, jax.random.fold_in(rng, i))
    return (
        jax.tree.map(jnp.add, grads_sum, grads),
        jax.tree.map(jnp.add, metrics_sum, metrics),
    ), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  metric_shapes = jax.eval_shape(
      lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng)[1]
  )
  metric_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
  (grads, metrics), _ = jax.lax.scan(body, (zeros, metric_zeros), (micro, jnp.arange(num_micro)))
  scale = lambda t: jax.tree.map(lambda x: x / num_micro, t)
  return scale(grads), scale(metrics)


def apply_gradients(
    tx: optax.GradientTransformation, state: TrainState, grads: PyTree, **replace
) -> tuple[TrainState, dict]:
  """One optimiser update; also returns the gradient norm and the finite-ness of the update."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.global_norm(grads)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, **replace)
  return new_state, {"grad_norm": grad_norm}


def step_rng(seed: int, step: Array) -> Array:
  """The dropout/sampling key of a step: a pure function of (seed, step), so resumes are exact."""
  return jax.random.fold_in(jax.random.key(seed), step)


def nnx_params(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, trainable params, everything else) of an nnx module."""
  return nnx.split(model, nnx.Param, ...)


class MetricsWriter:
  """Writes scalar metrics to `<workdir>/metrics.jsonl` and TensorBoard, and prints a line.

  Only process 0 writes; the JSON lines are what tools/plot_metrics.py and the demo read.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.path = epath.Path(workdir) / "metrics.jsonl"  # local or gs://
    self._tb = None
    if self.active:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if tensorboard:
        import tensorflow as tf  # deferred: only the writer needs it

        self._tf = tf
        self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict[str, Any], *, echo: bool = True) -> None:
    if not self.active:
      return
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
    with self.path.open("a") as f:
      f.write(json.dumps({"step": int(step), **scalars}) + "\n")
    if self._tb is not None:
      with self._tb.as_default():
        for name, value in scalars.items():
          self._tf.summary.scalar(name, value, step=int(step))
      self._tb.flush()
    if echo:
      shown = "  ".join(f"{k}={v:.4g}" for k, v in scalars.items())
      print(f"[step {int(step)}] {shown}", flush=True)

  def rewind(self, step: int) -> None:
    """Drops the JSON lines logged after `step`, and a last line cut short by a crash: a run
    killed between logging a step and checkpointing it would otherwise log that step twice."""
    if not self.active or not self.path.exists():
      return
    lines = self.path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
    if len(kept) < len(lines):
      self.path.write_text("".join(kept))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class ProgressMeter:
  """Step rate, examples per second and time left since the first timed step."""

  def __init__(self, total_steps: int, examples_per_step: int, first_step: int = 0):
    self.total_steps = total_steps
    self.examples_per_step = examples_per_step
    self.start_step = first_step
    self.start_time = None

  def update(self, step: int) -> dict[str, float]:
    """Call after `step` finished; the first call (the compile step) starts the clock."""
    now = time.perf_counter()
    if self.start_time is None:
      self.start_time, self.start_step = now, step
      return {}
    steps = step - self.start_step
    rate = steps / max(now - self.start_time, 1e-9)
    return {
        "steps_per_second": rate,
        "examples_per_second": rate * self.examples_per_step,
        "minutes_left": (self.total_steps - step) / max(rate, 1e-9) / 60.0,
    }


def data_iterator(
    data_cfg,
    mesh,
    split: str,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    repeat: bool = True,
    shuffle: bool = True,
):
  """This host's shard of `data_cfg.task` as numpy batches (host-local part of the global batch)."""
  from vidlankd_jax import sharding as sharding_lib
  from vidlankd_jax.data import tasks  # deferred: TensorFlow is only needed once data is read

  shard_index, num_shards = sharding_lib.host_data_shard(mesh, global_batch_size)
  ds = tasks.make_dataset(
      data_cfg,
      split,
      batch_size=global_batch_size // num_shards,
      shard_index=shard_index,
      num_shards=num_shards,
      seed=seed,
      start_step=start_step,
      repeat=repeat,
      shuffle=shuffle,
  )
  if repeat or jax.process_count() == 1:
    return ds.as_numpy_iterator()
  return in_lockstep(ds.as_numpy_iterator())


def in_lockstep(batches):
  """One pass over each host's shard, the same number of batches on every host.

  Hosts' shards of a split may differ by a batch; each jitted step is a collective that every
  process must join, so a host whose shard is done yields all-zero batches (zero masks and
  weights: padding to evaluation) until every host's is done.
  """
  from jax.experimental import multihost_utils

  last = None
  while True:
    batch = next(batches, None)
    more = multihost_utils.process_allgather(np.asarray(batch is not None))
    if not np.any(more):
      return
    if batch is None and last is None:
      raise ValueError(f"process {jax.process_index()} has no data in its shard of this split")
    last = batch if batch is not None else last
    yield batch if batch is not None else jax.tree.map(np.zeros_like, last)


def resolve_vocab(config) -> str:
  """The vocab file the config names (default: bert-base-uncased), checked against the model."""
  from vidlankd_jax.data import vocab as vocab_lib

  path = config.data.vocab_file or vocab_lib.default_vocab_file()
  size = len(vocab_lib.read_vocab_file(path))
  if size > config.model.vocab_size:
    raise ValueError(
        f"vocabulary {path} has {size} entries but config.model.vocab_size is "
        f"{config.model.vocab_size}: set --config.model.vocab_size={size}"
    )
  return path


def all_finite(*trees) -> Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for t in trees for x in jax.tree.leaves(t)]))


def keep_if_finite(finite: Array, new: PyTree, old: PyTree) -> PyTree:
  """`new` where the step was finite, else `old` (the step is skipped, nothing is corrupted)."""
  return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)


class NonFiniteError(FloatingPointError):
  """A loss or gradient was NaN/inf; the message names the step and the losses."""


def check_finite(step: int, metrics: dict, policy: str) -> bool:
  """Host-side: raises NonFiniteError (policy "stop") or returns False to report a skip."""
  if bool(metrics.get("finite", True)):
    return True
  shown = ", ".join(f"{k}={float(v):.4g}" for k, v in metrics.items() if k != "finite")
  if policy == "stop":
    raise NonFiniteError(
        f"non-finite loss or gradient at step {step}: {shown}; the last good "
        "checkpoint is kept (set config.train.on_nonfinite='skip' to skip such steps)"
    )
  print(f"[step {step}] skipped: non-finite loss or gradient ({shown})", flush=True)
  return False
