"""The training state every stage checkpoints, its optimiser, and the one guarded update.

A stage's step is `loss_fn` plus `guarded_update`: gradients (accumulated over micro-batches),
one AdamW update, and a finite check that leaves the state as it was when the loss or the
gradient is NaN/inf, so a bad batch never corrupts the parameters.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vidlankd_jax.models import layout

Array = jax.Array
PyTree = Any


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then linear decay to 0 at `decay_horizon` x
  `total_steps` (1: the run's end; 10: the run stops with 90% of the peak left)."""
  warmup = int(opt_cfg.warmup_steps)
  peak = float(opt_cfg.learning_rate)
  horizon = int(round(float(opt_cfg.get("decay_horizon", 1.0)) * int(total_steps)))
  decay_steps = max(horizon - warmup, 1)
  if warmup <= 0:
    return optax.linear_schedule(peak, 0.0, decay_steps)
  return optax.join_schedules(
      [
          optax.linear_schedule(0.0, peak, warmup),
          optax.linear_schedule(peak, 0.0, decay_steps),
      ],
      boundaries=[warmup],
  )


# The student's KD heads (models/student.py): the released code decays their LayerNorm
# weights, whose names ("layer_norm.weight") its no-decay list ("LayerNorm.weight") misses.
KD_HEADS = "kd_heads"


def decay_mask(params: PyTree, head_layer_norms: bool = False) -> PyTree:
  """Weight decay on matrices (kernels, embeddings) only: never on biases or LayerNorm, except
  with `head_layer_norms` the KD heads' LayerNorm scales (as the release). A weight of stacked
  transformer layers has one more axis (the layer) than the layer's own."""

  def decays(path, p):
    keys = [getattr(k, "key", None) for k in path]
    if head_layer_norms and KD_HEADS in keys and keys[-2:] == ["layer_norm", "scale"]:
      return True
    return p.ndim - int(layout.LAYERS in keys) >= 2

  return jax.tree_util.tree_map_with_path(decays, params)


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
          mask=functools.partial(
              decay_mask, head_layer_norms=bool(opt_cfg.get("decay_head_layer_norms", False))
          ),
      )
  )
  return optax.chain(*parts)


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes, as one pytree (checkpointed whole but `frozen`).

  `params` are trained; `frozen` are used but not trained (the teacher in distillation);
  `extra` holds state updated by the step other than by gradients (a CRD memory bank).
  """

  step: Array
  params: PyTree
  opt_state: PyTree
  frozen: PyTree = None
  extra: PyTree = None


def optimizer_shardings(tx: optax.GradientTransformation, params: PyTree) -> PyTree:
  """The optimiser state's shardings: each per-parameter buffer (Adam's moments) like its
  parameter, the rest (counts) replicated over the parameters' mesh."""
  mesh = jax.tree.leaves(params)[0].sharding.mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  masked = lambda x: isinstance(x, optax.MaskedNode)  # a frozen part's empty state
  return optax.tree_map_params(
      tx,
      lambda state, p: state if masked(state) else p.sharding,
      jax.eval_shape(tx.init, params),
      params,
      transform_non_params=lambda _: replicated,
      is_leaf=masked,
  )


def init_train_state(
    tx: optax.GradientTransformation,
    params: PyTree,
    frozen: PyTree = None,
    extra: PyTree = None,
    *,
    abstract: bool = False,
) -> TrainState:
  """The optimiser state, sharded like the parameters; the step replicated.

  `abstract`: `params` (and `frozen`, `extra`) are `jax.ShapeDtypeStruct`s with shardings, and so
  is the state returned: nothing is allocated (ahead-of-time compilation for a pod).
  """
  shardings = optimizer_shardings(tx, params)
  mesh = jax.tree.leaves(params)[0].sharding.mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if abstract:
    opt_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(tx.init, params),
        shardings,
    )
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  else:
    with jax.set_mesh(mesh):
      opt_state = jax.jit(tx.init, out_shardings=shardings)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
  return TrainState(step=step, params=params, opt_state=opt_state, frozen=frozen, extra=extra)


def nnx_params(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, trainable params, everything else) of an nnx module."""
  return nnx.split(model, nnx.Param, ...)


def step_rng(seed: int | Array, step: Array) -> Array:
  """The dropout/sampling key of a step: a pure function of (seed, step), so resumes are exact."""
  return jax.random.fold_in(jax.random.key(seed), step)


def split_micro_batches(batch: dict[str, Array], num_micro: int) -> dict[str, Array]:
  """[B, ...] -> [num_micro, B / num_micro, ...] (strided, so each micro-batch spans all shards)."""

  def split(x):
    if x.shape[0] % num_micro:
      raise ValueError(f"batch of {x.shape[0]} is not divisible into {num_micro} micro-batches")
    return jnp.swapaxes(x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]), 0, 1)

  return jax.tree.map(split, batch)


# loss_fn(params, batch, rng) -> (loss, (metrics, extra_updates))
LossFn = Callable[[PyTree, dict, Array], tuple[Array, tuple[dict, dict]]]


def accumulated_grads(
    loss_fn: LossFn, params: PyTree, batch: dict, rng: Array, num_micro: int
) -> tuple[PyTree, tuple[dict, dict]]:
  """Gradients of `loss_fn` and its (metrics, extra updates), averaged over micro-batches.

  With `num_micro == 1` this is a plain `jax.grad`; otherwise a `lax.scan` over micro-batches
  keeps only one micro-batch of activations alive at a time. Metrics must be per-example means
  (so that their average over equal micro-batches is the batch's); extra updates are taken only
  without accumulation.
  """
  grad_fn = jax.grad(loss_fn, has_aux=True)
  if num_micro == 1:
    return grad_fn(params, batch, rng)
  micro = split_micro_batches(batch, num_micro)

  def body(carry, xs):
    grads_sum, metrics_sum = carry
    micro_batch, i = xs
    grads, (metrics, updates) = grad_fn(params, micro_batch, jax.random.fold_in(rng, i))
    if updates:
      raise ValueError("state updates (a CRD memory) need the whole batch: no accumulation")
    return (
        jax.tree.map(jnp.add, grads_sum, grads),
        jax.tree.map(jnp.add, metrics_sum, metrics),
    ), None

  first = jax.tree.map(lambda x: x[0], micro)
  metric_shapes = jax.eval_shape(lambda: grad_fn(params, first, rng)[1][0])
  zeros = (
      jax.tree.map(jnp.zeros_like, params),
      jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes),
  )
  (grads, metrics), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(num_micro)))
  mean = lambda tree: jax.tree.map(lambda x: x / num_micro, tree)
  return mean(grads), (mean(metrics), {})


def all_finite(*trees) -> Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for t in trees for x in jax.tree.leaves(t)]))


def keep_if_finite(finite: Array, new: PyTree, old: PyTree) -> PyTree:
  """`new` where the step was finite, else `old` (the step is skipped, nothing is corrupted)."""
  return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)


def guarded_update(
    tx: optax.GradientTransformation,
    state: TrainState,
    loss_fn: LossFn,
    batch: dict,
    rng: Array,
    *,
    num_micro: int = 1,
    schedule: optax.Schedule | None = None,
) -> tuple[TrainState, dict]:
  """One optimiser step of `loss_fn` on `batch`; the end of every stage's train step.

  Returns the new state and the metrics: the loss function's, `grad_norm`, `learning_rate` (of
  this step) and `finite`. A non-finite loss or gradient leaves params, optimiser state and
  extra state as they were (only the step advances); the loop decides to stop or go on.
  """
  grads, (metrics, updates) = accumulated_grads(loss_fn, state.params, batch, rng, num_micro)
  param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
  extra = {**state.extra, **updates} if updates else state.extra
  new_state = state.replace(
      step=state.step + 1,
      params=optax.apply_updates(state.params, param_updates),
      opt_state=opt_state,
      extra=extra,
  )
  grad_norm = optax.global_norm(grads)
  finite = all_finite(metrics["loss"], grad_norm)
  new_state = keep_if_finite(finite, new_state, state.replace(step=state.step + 1))
  metrics = {**metrics, "grad_norm": grad_norm, "finite": finite}
  if schedule is not None:
    metrics["learning_rate"] = schedule(state.step)
  return new_state, metrics
