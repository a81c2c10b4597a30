"""Orbax checkpoints shared by every stage: async saves, keep-N plus best, preemption, resharding.

A checkpoint step holds items `params`, `opt_state`, `extra` (e.g. a CRD memory bank) and `meta`
(JSON: step, the config fingerprint, the data position). Later stages restore `params` alone
(the teacher in distillation, a student for fine-tuning). Restores take abstract targets with the
wanted shardings, so a run resumes on another mesh or device count.
"""

from __future__ import annotations

import os.path as os_path
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from vidlankd_jax.models import layout
from vidlankd_jax.train_state import TrainState

PyTree = Any


def checkpoint_path(directory: str) -> epath.Path:
  """Orbax wants absolute paths: local directories are resolved, gs:// ones kept."""
  path = epath.Path(directory)
  return path if "://" in str(directory) else epath.Path(os_path.abspath(directory))


class IncompatibleCheckpointError(ValueError):
  """The checkpoint was written by a run with another model or objective configuration."""


class CorruptCheckpointError(ValueError):
  """A finished checkpoint whose files were removed or damaged since it was written."""


# What TensorStore/Orbax say when a file of a checkpoint is missing or cut short.
_DAMAGE_MARKERS = (
    "NOT_FOUND",
    "OUT_OF_RANGE",
    "DATA_LOSS",
    "was not found in the checkpoint",
    "No such file",
    "Error reading",
    "does not exist",
)


def _short(error: Exception) -> str:
  """The first sentence of an Orbax/TensorStore error, without its long JSON spec."""
  return str(error).split(" [tensorstore_spec")[0].strip()[:600]


def fingerprint(config) -> dict:
  """What must match between a checkpoint and the run restoring it (sizes, objectives)."""
  model = config.get("model", {})
  keys = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size")
  out = {"stage": config.get("stage", ""), **{f"model.{k}": model.get(k) for k in keys}}
  for section in ("video", "student"):
    if section in config:
      # embedding_passes changes what the video weights compute (imported released teachers).
      out.update(
          {
              f"{section}.{k}": config[section].get(k)
              for k in keys + ("input_dim", "embedding_passes")
              if k in config[section]
          }
      )
  if "kd" in config:
    out["kd.objectives"] = str(config.kd.get("objectives", ""))
  return out


def check_fingerprint(saved: dict, current: dict, directory: str) -> None:
  diffs = [
      f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}"
      for k in sorted(set(saved) | set(current))
      if saved.get(k) != current.get(k)
  ]
  if diffs:
    raise IncompatibleCheckpointError(
        f"checkpoint in {directory} does not match this config:\n  " + "\n  ".join(diffs)
    )


def to_pure(tree: PyTree) -> PyTree:
  """nnx.State nodes -> plain nested dicts of arrays: the on-disk layout any tool can read."""
  return jax.tree.map(
      lambda x: x.to_pure_dict() if isinstance(x, nnx.State) else x,
      tree,
      is_leaf=lambda x: isinstance(x, nnx.State),
  )


def from_pure(target: PyTree, restored: PyTree, what: str) -> PyTree:
  """Puts restored leaves back into `target`'s structure (nnx.State, optax states...)."""
  leaves = jax.tree.leaves(restored)
  structure = jax.tree.structure(target)
  if len(leaves) != structure.num_leaves:
    raise IncompatibleCheckpointError(
        f"{what}: checkpoint has {len(leaves)} arrays, this run's state has {structure.num_leaves}"
    )
  return jax.tree.unflatten(structure, leaves)


def abstract_like(tree: PyTree) -> PyTree:
  """ShapeDtypeStructs carrying each array's sharding: the target of a sharded restore."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def to_disk(tree: PyTree) -> PyTree:
  """A state's part as it is written: pure dicts, one entry per transformer layer."""
  return layout.per_layer(to_pure(tree))


def disk_target(tree: PyTree) -> PyTree:
  """The restore target of a state's part: what `to_disk` writes, as abstract sharded arrays."""
  return layout.per_layer(abstract_like(to_pure(tree)))


def from_disk(target: PyTree, restored: PyTree, what: str) -> PyTree:
  """Restored per-layer arrays -> `target`'s structure, its layers stacked, on its shardings."""
  shardings = jax.tree.map(lambda x: x.sharding, to_pure(target))
  merged = layout.stacked(restored)
  if jax.tree.structure(merged) == jax.tree.structure(shardings):
    merged = jax.tree.map(jax.device_put, merged, shardings)
  return from_pure(target, merged, what)


class CheckpointManager:
  """Saves and restores `TrainState`s under `<workdir>/checkpoints`.

  Keeps the last `keep` checkpoints plus the best one by `best_metric` (if set). Saves are
  asynchronous: `save` returns once the arrays are copied off the devices.
  """

  def __init__(
      self,
      directory: str,
      *,
      every_steps: int,
      keep: int,
      best_metric: str = "",
      best_mode: str = "max",
      async_save: bool = True,
      fingerprint: dict | None = None,
  ):
    self.directory = checkpoint_path(directory)
    self.fingerprint = fingerprint or {}
    # Saves cut short (a killed process) leave `<step>.orbax-checkpoint-tmp*` folders; process 0
    # deletes them and the newest finished step is used.
    unfinished = (
        sorted(p.name for p in self.directory.iterdir() if ".orbax-checkpoint-tmp" in p.name)
        if self.directory.exists()
        else []
    )
    if unfinished and jax.process_index() == 0:
      print(
          f"discarding unfinished checkpoint save(s) {', '.join(unfinished)} in "
          f"{self.directory}",
          flush=True,
      )
      # Deleted here, before anything else runs, rather than in Orbax's background thread.
      for name in unfinished:
        (self.directory / name).rmtree()
    self.best_metric = best_metric
    policies = [ocp.checkpoint_managers.LatestN(n=keep)]
    if best_metric:
      policies.append(
          ocp.checkpoint_managers.BestN(
              get_metric_fn=lambda m: m[best_metric],
              reverse=best_mode == "max",
              n=1,
              keep_checkpoints_without_metrics=False,
          )
      )
    self.every_steps = int(every_steps)
    options = ocp.CheckpointManagerOptions(
        # The loop decides when to save (`should_save`, preemption) and forces each save.
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(max(self.every_steps, 1)),
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        create=True,
        cleanup_tmp_directories=False,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def should_save(self, step: int) -> bool:
    """Whether `step` is on the save interval (preemption saves are forced by the loop)."""
    return self.every_steps > 0 and step % self.every_steps == 0

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(
      self,
      step: int,
      state: TrainState,
      *,
      metrics: dict | None = None,
      data_position: dict | None = None,
      force: bool = False,
  ) -> bool:
    """Saves if the policy says so at `step` (interval or preemption) or if `force`."""
    items = {
        "params": ocp.args.StandardSave(to_disk(state.params)),
        "opt_state": ocp.args.StandardSave(to_disk(state.opt_state)),
        "meta": ocp.args.JsonSave(
            {
                "step": int(step),
                "fingerprint": self.fingerprint,
                "data_position": data_position or {},
            }
        ),
    }
    if state.extra is not None:
      items["extra"] = ocp.args.StandardSave(to_disk(state.extra))
    if metrics is not None and self.best_metric and self.best_metric not in metrics:
      metrics = None
    metrics = {k: float(v) for k, v in metrics.items()} if metrics else None
    return self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

  def read_meta(self, step: int) -> dict:
    return self._restore_item(step, "meta", ocp.args.JsonRestore())

  def restore(self, target: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
    """Restores onto `target`'s shardings (a live or abstract state); returns (state, meta).

    Uses the newest finished checkpoint unless `step` is given. A checkpoint from an
    incompatible config raises IncompatibleCheckpointError naming what differs; one with
    missing or damaged files CorruptCheckpointError naming the item and the file. Nothing is
    ever partly restored.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    meta = self.read_meta(step)
    check_fingerprint(meta.get("fingerprint", {}), self.fingerprint, str(self.directory))
    names = ["params", "opt_state"] + (["extra"] if target.extra is not None else [])
    restored = {
        name: from_disk(
            getattr(target, name),
            self._restore_item(
                step, name, ocp.args.StandardRestore(disk_target(getattr(target, name)))
            ),
            f"{self.directory}/{step}/{name}",
        )
        for name in names
    }
    state = target.replace(
        step=jax.device_put(jax.numpy.asarray(meta["step"], jax.numpy.int32), target.step.sharding),
        **restored,
    )
    logging.info("restored checkpoint step %d from %s", step, self.directory)
    return state, meta

  def _restore_item(self, step: int, name: str, args) -> PyTree:
    """One item of a step; damaged files and trees of another shape are clear errors."""
    where = f"{self.directory}/{step}/{name}"
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**{name: args}))[name]
    except Exception as e:  # Orbax and TensorStore raise many types; name the item at fault
      if not any(marker in str(e) for marker in _DAMAGE_MARKERS):
        raise IncompatibleCheckpointError(
            f"{where} cannot be restored into this run's state: {_short(e)}"
        ) from e
      older = [s for s in self.all_steps() if s < step]
      hint = f"; delete {self.directory}/{step} to resume from step {max(older)}" if older else ""
      raise CorruptCheckpointError(
          f"checkpoint {where} is damaged or incomplete: {_short(e)}{hint}"
      ) from e

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def restore_params(
    directory: str,
    abstract_params: PyTree,
    step: int | None = None,
    expected_fingerprint: dict | None = None,
) -> PyTree:
  """Only the `params` item of a checkpoint (e.g. the teacher for distillation), read-only."""
  manager = ocp.CheckpointManager(
      checkpoint_path(directory), options=ocp.CheckpointManagerOptions(read_only=True, create=False)
  )
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  if expected_fingerprint:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    saved = meta.get("fingerprint", {})
    check_fingerprint(
        {k: saved.get(k) for k in expected_fingerprint}, expected_fingerprint, directory
    )
  restored = manager.restore(
      step,
      args=ocp.args.Composite(params=ocp.args.StandardRestore(disk_target(abstract_params))),
  )
  manager.close()
  return from_disk(abstract_params, restored["params"], f"{directory}/{step}/params")


class PreemptionWatcher:
  """Tells the loop when to checkpoint and stop: SIGTERM (a Spot/preemptible VM's notice).

  Alone, a SIGTERM sets a flag that the loop reads at the next step boundary. With several
  processes (a pod slice, where preemption may reach one host first) every `check_every` steps
  the processes share their flags (a tiny all-gather) and all stop at that same step if any was
  signalled: one agreed step without a coordination call at every step.
  """

  def __init__(self, check_every: int = 1):
    if check_every < 1:
      raise ValueError(f"config.checkpoint.preemption_check_every must be >= 1, got {check_every}")
    self.check_every = check_every
    self._signalled = threading.Event()
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    logging.warning("SIGTERM received: will checkpoint and stop at the next step boundary")
    self._signalled.set()

  @property
  def signalled(self) -> bool:
    return self._signalled.is_set()

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.signalled
    if step % self.check_every:
      return False
    flags = multihost_utils.process_allgather(np.asarray(self.signalled))
    return bool(np.any(flags))

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def restore_params_numpy(directory: str, step: int | None = None) -> dict:
  """The `params` item of a checkpoint as nested dicts of host numpy arrays, no target needed.

  For tools and later stages that know only part of the tree they want (e.g. the language
  encoder under `params["language"]["bert"]`), whatever mesh the checkpoint was written on.
  """

  manager = ocp.CheckpointManager(
      checkpoint_path(directory), options=ocp.CheckpointManagerOptions(read_only=True, create=False)
  )
  step = manager.latest_step() if step is None else step
  manager.close()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  path = checkpoint_path(directory) / str(step) / "params"
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path).item_metadata
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local), metadata)
  restored = checkpointer.restore(path, target)
  return jax.tree.map(np.asarray, restored)
