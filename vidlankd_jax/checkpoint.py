"""Orbax checkpoints shared by every stage: async saves, keep-N plus best, preemption, resharding.

A checkpoint step holds items `params`, `opt_state`, `extra` (e.g. a CRD memory bank) and `meta`
(JSON: step, the config fingerprint, the data position). Later stages restore `params` alone
(the teacher in distillation, a student for fine-tuning). Restores take abstract targets with the
wanted shardings, so a run resumes on another mesh or device count.
"""

from __future__ import annotations

import os
import re
import os.path as os_path
import signal
import sys
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from vidlankd_jax import console
from vidlankd_jax import errors
from vidlankd_jax import sharding
from vidlankd_jax.models import layout
from vidlankd_jax.train_state import TrainState

PyTree = Any


def checkpoint_path(directory: str) -> epath.Path:
  """Orbax wants absolute paths: local directories are resolved, gs:// ones kept."""
  path = epath.Path(directory)
  return path if "://" in str(directory) else epath.Path(os_path.abspath(directory))


class IncompatibleCheckpointError(errors.DataError):
  """The checkpoint was written by a run with another model or objective configuration."""


class CorruptCheckpointError(errors.DataError):
  """A finished checkpoint whose files were removed or damaged since it was written."""


class CheckpointSaveError(errors.StorageError):
  """A checkpoint could not be written (a full, read-only or unreachable disk)."""


def writable_problem(directory) -> str:
  """ "" if a file can be created in `directory` (created if missing), else why not (one line)."""
  path = epath.Path(directory)
  probe = path / f".write-probe-{jax.process_index()}"
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    return f"{type(e).__name__}: {e.strerror or e}"
  return ""


def _short(error: Exception) -> str:
  """An Orbax/TensorStore error on one line, without its source locations and JSON spec
  (TensorStore appends hundreds of characters of each)."""
  text = re.split(r"\s*\[(?:tensorstore_spec|source locations)=|\s*\{\"", errors.one_line(error))[0]
  return text.strip()[:600]


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


# Content digests. Orbax 0.12 verifies no array data on restore (zarr3 checksums only a shard's
# index; the default zarr2+zstd nothing): a flipped bit restores silently. Each save therefore
# records, in its `meta` item (committed atomically with the arrays), a 32-bit digest of every
# array's bits; a restore recomputes them and compares before the state is used.
_DIGEST_MULTIPLIER = 2654435761  # Knuth's multiplicative hash constant (odd)


def _path_name(path) -> str:
  """A tree path as `a/b/0/c`, equal for the int and str layer keys Orbax may hand back."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _as_uint32(x, xp):
  """An array's bits as uint32 (float16/bfloat16 and 8/16-bit ints widened, bools as 0/1)."""
  width = x.dtype.itemsize
  if x.dtype == bool:
    return x.astype(xp.uint32)
  unsigned = {1: xp.uint8, 2: xp.uint16, 4: xp.uint32}[width]
  bits = x.view(unsigned) if xp is np else jax.lax.bitcast_convert_type(x, unsigned)
  return bits.astype(xp.uint32)


def _digest_jax(x):
  bits = _as_uint32(x, jax.numpy).reshape(-1)
  weights = jax.numpy.arange(bits.size, dtype=jax.numpy.uint32) * np.uint32(_DIGEST_MULTIPLIER)
  return jax.numpy.sum(bits * (weights | np.uint32(1)), dtype=jax.numpy.uint32)


def _digest_numpy(x: np.ndarray, chunk: int = 1 << 20) -> int:
  """`_digest_jax` on the host, in chunks (bounded memory; uint32 arithmetic wraps the same)."""
  bits = _as_uint32(np.asarray(x), np).reshape(-1)
  total = 0
  for start in range(0, bits.size, chunk):
    index = np.arange(start, min(start + chunk, bits.size), dtype=np.uint32)
    weights = index * np.uint32(_DIGEST_MULTIPLIER) | np.uint32(1)
    total += int(np.sum(bits[start : start + chunk] * weights, dtype=np.uint32))
  return total % 2**32


@jax.jit
def _digests_and_finite(tree):
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  digests = {_path_name(path): _digest_jax(x) for path, x in leaves}
  finite = {
      _path_name(path): jax.numpy.all(jax.numpy.isfinite(x))
      for path, x in leaves
      if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)
  }
  return digests, finite


def content_digests(disk_tree: PyTree) -> tuple[dict[str, int], list[str]]:
  """({array path: uint32 digest of its bits}, [paths of arrays holding NaN or inf]) of a tree
  in the on-disk layout (every process gets the same answer: the digests are global sums)."""
  digests, finite = jax.device_get(_digests_and_finite(disk_tree))
  return {k: int(v) for k, v in digests.items()}, sorted(k for k, ok in finite.items() if not ok)


def content_digests_numpy(tree: PyTree) -> tuple[dict[str, int], list[str]]:
  """`content_digests` of host numpy arrays (tools reading a checkpoint without devices)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  digests = {_path_name(path): _digest_numpy(x) for path, x in leaves}
  nonfinite = [
      _path_name(path)
      for path, x in leaves
      if np.issubdtype(np.asarray(x).dtype, np.inexact) and not np.all(np.isfinite(x))
  ]
  return digests, sorted(nonfinite)


def verify_content(where: str, saved: dict | None, found: tuple[dict, list], *, hint: str = ""):
  """CorruptCheckpointError unless the restored arrays hold what was saved, all finite."""
  digests, nonfinite = found
  if saved:  # checkpoints written before digests existed are not verified
    changed = sorted(k for k, v in digests.items() if saved.get(k) != v)
    if changed:
      more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
      raise CorruptCheckpointError(
          f"checkpoint {where} is damaged: array {changed[0]}{more} differs from the digest "
          f"recorded when it was saved{hint}"
      )
  if nonfinite:
    more = f" and {len(nonfinite) - 1} more" if len(nonfinite) > 1 else ""
    raise CorruptCheckpointError(
        f"checkpoint {where} holds NaN or inf values in {nonfinite[0]}{more}{hint}"
    )


def check_item_shapes(where: str, metadata: PyTree, target: PyTree) -> None:
  """IncompatibleCheckpointError unless the saved item has the target's arrays and shapes: the
  check that tells a checkpoint of another model from a damaged one, before anything is read."""
  saved = {
      _path_name(p): tuple(m.shape)
      for p, m in jax.tree_util.tree_flatten_with_path(metadata)[0]
      if hasattr(m, "shape")
  }
  wanted = {
      _path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(target)[0]
  }
  diffs = [f"{k}: missing in the checkpoint" for k in sorted(set(wanted) - set(saved))]
  diffs += [f"{k}: not in this run's state" for k in sorted(set(saved) - set(wanted))]
  diffs += [
      f"{k}: checkpoint {saved[k]} vs this run {wanted[k]}"
      for k in sorted(set(saved) & set(wanted))
      if saved[k] != wanted[k]
  ]
  if diffs:
    more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
    raise IncompatibleCheckpointError(
        f"{where} cannot be restored into this run's state: " + "; ".join(diffs[:3]) + more
    )


def _drop_closed_loop_noise() -> None:
  """Orbax reading a damaged item leaves TensorStore callbacks aimed at an asyncio loop it has
  closed: each prints an 'Event loop is closed' traceback (80 of them per item) that buries the
  real error. Only those are dropped; every other unraisable exception is shown as before."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_noise", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
      previous(unraisable)

  hook.drops_closed_loop_noise = True
  sys.unraisablehook = hook


def item_metadata(path: epath.Path, hint: str = "") -> PyTree:
  """The saved arrays' shapes and dtypes of one item folder; CorruptCheckpointError if unreadable."""
  _drop_closed_loop_noise()
  checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())  # synchronous: no threads
  try:
    metadata = checkpointer.metadata(path).item_metadata
  except Exception as e:  # a missing or garbled _METADATA: whatever Orbax raises, it is damage
    raise CorruptCheckpointError(
        f"checkpoint {path} is damaged or incomplete: its metadata cannot be read ({_short(e)}){hint}"
    ) from e
  finally:
    checkpointer.close()
  if not jax.tree.leaves(metadata):  # Orbax logs and returns nothing when its files are gone
    raise CorruptCheckpointError(
        f"checkpoint {path} is damaged or incomplete: its array metadata or data files are missing{hint}"
    )
  return metadata


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
      console.info(
          f"discarding unfinished checkpoint save(s) {', '.join(unfinished)} in "
          f"{self.directory}"
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
    self._unconfirmed: int | None = None  # the newest save not yet seen committed

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
      force: bool = False,
  ) -> bool:
    """Saves if the policy says so at `step` (interval or preemption) or if `force`.

    The `meta` item records a digest of every array saved (`content_digests`), checked on
    restore. The data position needs no record: the input pipeline starts at the batch of the
    restored step (`data.pipeline.host_batches(start_step=...)`). A save that failed in the
    background is raised here or by `check_saves`.
    """
    self.check_saves()
    disk = {"params": to_disk(state.params), "opt_state": to_disk(state.opt_state)}
    if state.extra is not None:
      disk["extra"] = to_disk(state.extra)
    digests = {name: content_digests(tree)[0] for name, tree in disk.items()}
    items = {name: ocp.args.StandardSave(tree) for name, tree in disk.items()}
    items["meta"] = ocp.args.JsonSave(
        {
            "step": int(step),
            "fingerprint": self.fingerprint,
            "digests": digests,
        }
    )
    if metrics is not None and self.best_metric and self.best_metric not in metrics:
      metrics = None
    metrics = {k: float(v) for k, v in metrics.items()} if metrics else None
    saved = self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)
    if saved:
      self._unconfirmed = int(step)
    return saved

  def check_saves(self) -> None:
    """Raises CheckpointSaveError once the newest background save has ended without its step
    being committed (a full or read-only disk): cheap enough to call every step."""
    step = self._unconfirmed
    if step is None or self._manager.is_saving_in_progress():
      return
    self._unconfirmed = None
    if (self.directory / str(step)).exists():
      return
    try:  # Orbax keeps the background error for the first thread that waits: this one
      self._manager.wait_until_finished()
      cause = writable_problem(self.directory) or "see the log above"
    except Exception as e:  # whatever the storage raised; the message names it
      cause = _short(e)
    finished = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
    raise CheckpointSaveError(
        f"saving checkpoint step {step} to {self.directory} failed in the background ({cause}): "
        "free space or fix the folder's permissions and rerun; the last checkpoint is "
        f"{finished[-1] if finished else 'none'}"
    )

  def read_meta(self, step: int) -> dict:
    return self._restore_item(step, "meta", ocp.args.JsonRestore())

  def restore(self, target: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
    """Restores onto `target`'s shardings (a live or abstract state); returns (state, meta).

    Uses the newest finished checkpoint unless `step` is given. A checkpoint from an
    incompatible config raises IncompatibleCheckpointError naming what differs (its fingerprint,
    then its arrays' names and shapes); one with missing, damaged or non-finite contents
    CorruptCheckpointError naming the item and the array or file. Nothing is ever partly
    restored.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise errors.MissingFileError(f"no checkpoint in {self.directory}")
    older = [s for s in self.all_steps() if s < step]
    hint = (
        f"; delete {self.directory}/{step} (or set config.checkpoint.on_corrupt='previous') to "
        f"resume from step {max(older)}"
        if older
        else ""
    )
    try:
      meta = self.read_meta(step)
    except Exception as e:  # unreadable JSON or a missing file: damage, whatever Orbax raised
      raise CorruptCheckpointError(
          f"checkpoint {self.directory}/{step}/meta is damaged or incomplete: {_short(e)}{hint}"
      ) from e
    check_fingerprint(meta.get("fingerprint", {}), self.fingerprint, str(self.directory))
    names = ["params", "opt_state"] + (["extra"] if target.extra is not None else [])
    restored = {}
    for name in names:
      where = f"{self.directory}/{step}/{name}"
      wanted = disk_target(getattr(target, name))
      check_item_shapes(where, item_metadata(self.directory / str(step) / name, hint), wanted)
      disk = self._restore_item(step, name, ocp.args.StandardRestore(wanted), hint)
      found = content_digests(disk)
      if name != "params":  # optimiser moments of a skipped step may be anything finite or not
        found = (found[0], [])
      verify_content(where, meta.get("digests", {}).get(name), found, hint=hint)
      restored[name] = from_disk(getattr(target, name), disk, where)
    state = target.replace(
        step=jax.device_put(jax.numpy.asarray(meta["step"], jax.numpy.int32), target.step.sharding),
        **restored,
    )
    console.debug("restored checkpoint step %d from %s", step, self.directory)
    return state, meta

  def restore_newest_good(self, target: TrainState, *, fall_back: bool) -> tuple[TrainState, dict]:
    """`restore` of the newest step; with `fall_back`, a damaged step is moved aside to
    `corrupt-<step>` (kept for inspection, never read again) and the next older one tried."""
    while True:
      step = self.latest_step()
      try:
        return self.restore(target, step)
      except CorruptCheckpointError as error:
        if not fall_back or not [s for s in self.all_steps() if s < step]:
          raise
        aside = self.directory / f"corrupt-{step}"
        console.info(f"{error}; moved aside to {aside}, trying the previous step")
        if jax.process_index() == 0:
          (self.directory / str(step)).rename(aside)
        sharding.wait_for_all_processes(f"vidlankd/corrupt_checkpoint/{step}")
        self._manager.reload()

  def _restore_item(self, step: int, name: str, args, hint: str = "") -> PyTree:
    """One item of a step whose metadata matched the target: a failure to read it is damage."""
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**{name: args}))[name]
    except Exception as e:  # Orbax and TensorStore raise many types; name the item at fault
      raise CorruptCheckpointError(
          f"checkpoint {self.directory}/{step}/{name} is damaged or incomplete: {_short(e)}{hint}"
      ) from e

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the last save; one that failed is a CheckpointSaveError (one line)."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # whatever the storage raised in the background
      self._manager.close()
      raise CheckpointSaveError(
          f"the last checkpoint save in {self.directory} failed ({_short(e)}): free space or fix "
          "the folder's permissions and rerun"
      ) from e
    self._manager.close()


def read_meta(directory: str, step: int | None = None) -> dict | None:
  """The `meta` item (step, fingerprint, digests) of a checkpoint, newest by default; None when
  the folder has no checkpoint."""
  if not checkpoint_path(directory).is_dir():
    return None
  manager = ocp.CheckpointManager(
      checkpoint_path(directory), options=ocp.CheckpointManagerOptions(read_only=True, create=False)
  )
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      return None
    try:
      return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except (ValueError, OSError) as e:  # garbled JSON: json's message names no file
      raise CorruptCheckpointError(
          f"checkpoint {checkpoint_path(directory) / str(step) / 'meta'} is damaged: its JSON "
          f"cannot be read ({_short(e)}); restore it from a copy or rerun the run that wrote it"
      ) from e
  finally:
    manager.close()


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
    raise errors.MissingFileError(f"no checkpoint in {directory}")
  if expected_fingerprint:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    saved = meta.get("fingerprint", {})
    check_fingerprint(
        {k: saved.get(k) for k in expected_fingerprint}, expected_fingerprint, directory
    )
  where = checkpoint_path(directory) / str(step) / "params"
  wanted = disk_target(abstract_params)
  check_item_shapes(str(where), item_metadata(where), wanted)
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    restored = manager.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(wanted))
    )["params"]
  except Exception as e:  # shapes matched: a failure to read is damage
    raise CorruptCheckpointError(f"checkpoint {where} is damaged or incomplete: {_short(e)}") from e
  finally:
    manager.close()
  verify_content(str(where), meta.get("digests", {}).get("params"), content_digests(restored))
  return from_disk(abstract_params, restored, str(where))


class PreemptionWatcher:
  """Tells the loop when to checkpoint and stop: SIGTERM (a Spot/preemptible VM's notice).

  Alone, a SIGTERM sets a flag that the loop reads at the next step boundary (or while it waits
  for input); a second SIGTERM exits at once (status 143), leaving the last checkpoint. With several
  processes (a pod slice, where preemption may reach one host first) every `check_every` steps
  the processes share their flags (a tiny all-gather) and all stop at that same step if any was
  signalled: one agreed step without a coordination call at every step.
  """

  def __init__(self, check_every: int = 1):
    if check_every < 1:
      raise errors.ConfigError(
          f"config.checkpoint.preemption_check_every must be >= 1, got {check_every}"
      )
    self.check_every = check_every
    self._signalled = threading.Event()
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    if self._signalled.is_set():  # a second notice: the operator will not wait for a boundary
      print(
          "second SIGTERM: exiting at once; the last checkpoint is kept, rerun the same command "
          f"to resume from it (exit {errors.STOPPED_EXIT})",
          file=sys.stderr,
          flush=True,
      )
      os._exit(errors.STOPPED_EXIT)
    print(
        "SIGTERM received: will checkpoint and stop at the next step boundary "
        "(send it again to exit at once)",
        file=sys.stderr,
        flush=True,
    )
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
  if step is None:
    manager.close()
    raise errors.MissingFileError(f"no checkpoint in {directory}")
  path = checkpoint_path(directory) / str(step) / "params"
  checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())  # synchronous: no threads
  metadata = item_metadata(path)
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local), metadata)
  try:
    restored = jax.tree.map(np.asarray, checkpointer.restore(path, target))
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # the metadata was read: a failure to read the arrays is damage
    raise CorruptCheckpointError(f"checkpoint {path} is damaged or incomplete: {_short(e)}") from e
  finally:
    checkpointer.close()
    manager.close()
  verify_content(str(path), meta.get("digests", {}).get("params"), content_digests_numpy(restored))
  return restored
