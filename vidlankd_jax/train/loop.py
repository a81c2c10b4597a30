"""The one training loop of every stage: resume, logging, evaluation, checkpoints, numerical
faults and preemption.

Every stage module (teacher.py, distill.py, finetune.py, registered in stages.py) offers the same
contract: `init(config, mesh, *, abstract=False) -> Setup` (the fresh state and its pure step
functions; abstract: shapes and shardings only), `example_batch(config)` (the global training
batch as `jax.ShapeDtypeStruct`s) and `build(config, mesh) -> Program` (adds the data and the
evaluation). `fit` runs a Program; `jit_train_step` is the one place a train step is jitted (the
loop, the benchmarks, the tests and the pod plan compile the same program). Resumes are exact: the data restarts at
the batch the checkpoint's step would read and each step's randomness is a function of
(seed, step), so a run stopped and started again ends with the same parameters and metrics as
one that was never stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Iterator, NamedTuple

import jax
import numpy as np
from etils import epath

from vidlankd_jax import console
from vidlankd_jax import errors
from vidlankd_jax import checkpoint as ckpt_lib
from vidlankd_jax import configlib
from vidlankd_jax import runs
from vidlankd_jax import sharding
from vidlankd_jax.data import pipeline
from vidlankd_jax.train_state import TrainState

NONFINITE_POLICIES = configlib.NONFINITE_POLICIES


class Setup(NamedTuple):
  """What every stage's `init` returns: the fresh state (`jax.ShapeDtypeStruct`s when abstract)
  and its pure `train_step(state, batch) -> (state, metrics)` and `eval_step(state, batch)`."""

  state: TrainState
  train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
  eval_step: Callable[[TrainState, dict], Any]


def jit_train_step(train_step: Callable, state, mesh) -> Callable:
  """`train_step` jitted as the loop runs it: the state keeps its shardings and is donated, the
  batch is split over the mesh's batch axes. `state` may be abstract (the shardings are read)."""
  state_sh = sharding.state_shardings(state)
  return jax.jit(
      train_step,
      in_shardings=(state_sh, sharding.batch_sharding(mesh)),
      out_shardings=(state_sh, None),
      donate_argnums=0,
  )


def jit_eval_step(eval_step: Callable, state, mesh) -> Callable:
  """`eval_step` jitted with the state's shardings and the batch split over the batch axes."""
  return jax.jit(
      eval_step, in_shardings=(sharding.state_shardings(state), sharding.batch_sharding(mesh))
  )


@dataclasses.dataclass
class Program:
  """What a stage hands the loop.

  `train_step(state, batch) -> (state, metrics)` and `eval_step(state, batch)` are pure and
  jitted here with the state's shardings; `evaluate(state, jitted_eval_step)` returns the
  `eval/...` metrics; `train_batches(start_step)` yields this host's part of each global batch
  from `start_step` on; `fingerprint` is what a checkpoint must match to be resumed.
  """

  state: TrainState
  train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
  eval_step: Callable[[TrainState, dict], Any]
  evaluate: Callable[[TrainState, Callable], dict[str, float]]
  train_batches: Callable[[int], Iterator[dict]]
  steps: int
  batch_size: int
  fingerprint: dict


def pretraining_program(
    config, mesh, spec, *, state, train_step, eval_step, evaluate, fingerprint
) -> Program:
  """A Program whose training data is `spec`'s train split (a pretraining `InputSpec`) in global
  batches of `config.train.batch_size`, for `config.train.steps` steps; shuffled unless
  `config.data.shuffle` is False (then read in the corpus's order)."""
  return Program(
      state=state,
      train_step=train_step,
      eval_step=eval_step,
      evaluate=evaluate,
      train_batches=functools.partial(
          pipeline.host_batches,
          spec,
          mesh,
          "train",
          global_batch_size=config.train.batch_size,
          seed=config.seed,
          shuffle=bool(config.data.get("shuffle", True)),
      ),
      steps=config.train.steps,
      batch_size=config.train.batch_size,
      fingerprint=fingerprint,
  )


class Preempted(errors.Stopped):
  """The run stopped on request (SIGTERM, a pod's preemption notice) after saving a checkpoint;
  running the same command again resumes it."""


class NonFiniteError(errors.UserError, FloatingPointError):
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
  console.info(f"[step {step}] skipped: non-finite loss or gradient ({shown})")
  return False


class SkipCounter:
  """Counts skipped (non-finite) steps; too many in a row means the run diverged: an error."""

  def __init__(self, limit: int):
    self.limit = int(limit)
    self.in_a_row = 0
    self.total = 0

  def record(self, step: int, finite: bool) -> None:
    if finite:
      self.in_a_row = 0
      return
    self.in_a_row += 1
    self.total += 1
    console.info(f"[step {step}] {self.in_a_row} skipped in a row, {self.total} in this run")
    if self.limit > 0 and self.in_a_row >= self.limit:
      raise NonFiniteError(
          f"{self.in_a_row} non-finite steps in a row (steps {step - self.in_a_row + 1}-{step}, "
          f"config.train.max_skips_in_a_row={self.limit}): the run diverged; the last good "
          "checkpoint is kept (lower the learning rate or check the data, then rerun)"
      )


def _json_line(line: str) -> dict | None:
  """A whole JSON line of metrics.jsonl, or None (cut short by a crash, or garbled)."""
  if not line.endswith("\n"):
    return None
  try:
    record = json.loads(line)
  except ValueError:
    return None
  return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


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
      console.info(f"[step {int(step)}] {shown}")

  def rewind(self, step: int) -> None:
    """Drops the JSON lines logged after `step`, lines cut short or garbled by a crash, and
    repeated lines: a run killed between logging a step and checkpointing it (or before its
    first checkpoint) would otherwise log that step twice. The file is replaced atomically."""
    if not self.active or not self.path.exists():
      return
    lines = self.path.read_text().splitlines(keepends=True)
    kept, seen = [], set()
    for line in lines:
      record = _json_line(line)
      if record is None or record.get("step", step + 1) > step:
        continue
      key = (record["step"], tuple(sorted(record)))  # a step's train and eval lines differ
      if key not in seen:
        seen.add(key)
        kept.append(line)
    if len(kept) < len(lines):
      tmp = self.path.parent / (self.path.name + ".tmp")
      tmp.write_text("".join(kept))
      tmp.replace(self.path)  # atomic: a crash now leaves the old or the new record, whole

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


class StepProfiler:
  """A `jax.profiler` trace of the steps that take the state from step `start` to `stop`
  (`config.train.profile_steps`), written to `<workdir>/profile` for TensorBoard's profile
  plugin. A run resumed inside the window traces what is left of it; a run that ends inside it
  closes the trace."""

  def __init__(self, window: tuple[int, int] | None, workdir: str):
    self.window = window
    self.directory = os.path.join(workdir, "profile")
    self.first = None  # the first step traced, while tracing

  def before(self, step: int) -> None:
    """Call before dispatching the step that starts from state step `step`."""
    if self.window and self.first is None and self.window[0] <= step < self.window[1]:
      jax.profiler.start_trace(self.directory)
      self.first = step

  def after(self, done: int, state) -> None:
    """Call after dispatching the step that ends at state step `done`."""
    if self.first is not None and done >= self.window[1]:
      jax.block_until_ready(state)  # the trace holds the last step's device work
      self.stop(done)

  def stop(self, done: int) -> None:
    if self.first is not None:
      first, self.first = self.first, None
      jax.profiler.stop_trace()
      console.info(f"profile of steps {first + 1}-{done} written to {self.directory}")


def checkpoint_manager(config, workdir: str, fingerprint: dict) -> ckpt_lib.CheckpointManager:
  """The run's checkpoints under `<workdir>/checkpoints`."""
  ckpt = config.checkpoint
  return ckpt_lib.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      every_steps=ckpt.every_steps,
      keep=ckpt.keep,
      best_metric=ckpt.best_metric,
      best_mode=ckpt.best_mode,
      async_save=ckpt.async_save,
      fingerprint=fingerprint,
  )


class ShapeCompiled:
  """A jitted step compiled ahead once per batch shape (video batches come in a few lengths)."""

  def __init__(self, jitted):
    self.jitted = jitted
    self.programs = {}

  def compile(self, state, batch):
    key = tuple(sorted((name, value.shape) for name, value in batch.items()))
    if key not in self.programs:
      self.programs[key] = self.jitted.lower(state, batch).compile()
    return self.programs[key]

  def __call__(self, state, batch):
    return self.compile(state, batch)(state, batch)


def check_writable(workdir: str) -> None:
  """The run's folders take a file now, not at the first checkpoint (one line naming them)."""
  for folder in (workdir, os.path.join(workdir, "checkpoints")):
    problem = ckpt_lib.writable_problem(folder)
    if problem:
      raise ckpt_lib.CheckpointSaveError(
          f"cannot write to {folder} ({problem}): choose another --workdir or fix its "
          "permissions or free space"
      )


def next_batch(batches: pipeline.DevicePrefetch, step: int, on_interrupt) -> dict:
  """The batch of `step`; a SIGTERM during the wait saves what can be saved and stops."""
  try:
    return next(batches)
  except pipeline.InputWaitInterrupted:
    if on_interrupt is not None:
      on_interrupt(step)
    raise Preempted(
        f"stopped at step {step} on request while waiting for input; rerun the same command to "
        f"resume (exit {errors.STOPPED_EXIT})"
    ) from None


def is_due(step: int, every: int, total: int) -> bool:
  """Whether a periodic event (log, evaluation) falls on `step`; `every` <= 0: only at the end."""
  return step == total or (every > 0 and step % every == 0)


def fit(program: Program, config, workdir: str, mesh, *, config_dir: str | None = None) -> dict:
  """Runs `program` to `program.steps`, resuming from `<workdir>/checkpoints`; returns the last
  evaluation's metrics.

  The checkpoint (when there is one) is restored and `metrics.jsonl` cut back to its step before
  `config.json` is written to `config_dir` (default `workdir`), so a run that a checkpoint
  rejects leaves the record as it was. A non-finite step (the step leaves the state as it was and
  reports `finite`) stops the run (`config.train.on_nonfinite="stop"`, the last checkpoint is
  kept) or is skipped ("skip"). SIGTERM, or a pod's preemption notice, saves a checkpoint at the
  next step boundary and raises `Preempted`. A run that finished earlier is evaluated again.

  The host never waits for a step it does not need: the next batches are prepared and sent to
  the devices while a step runs (`DevicePrefetch`), and a step's finite flag is read after the
  next step has been dispatched. Only logging, evaluation and checkpoints read a step's values
  at once, and no checkpoint is written before its step's flag has been read.
  """
  policy = config.train.on_nonfinite
  if policy not in NONFINITE_POLICIES:
    raise errors.ConfigError(
        f"config.train.on_nonfinite {policy!r} is not one of {NONFINITE_POLICIES}"
    )
  check_writable(workdir)
  total = int(program.steps)
  state = program.state
  ckpt = checkpoint_manager(config, workdir, program.fingerprint)
  skips = SkipCounter(config.train.get("max_skips_in_a_row", 0))
  writer = MetricsWriter(workdir)
  # From here on, SIGTERM waits for a step boundary.
  watcher = ckpt_lib.PreemptionWatcher(config.checkpoint.preemption_check_every)
  eval_metrics: dict[str, float] = {}
  batches, failing = None, False
  profiler = StepProfiler(configlib.profile_window(config.train.get("profile_steps", "")), workdir)
  done = 0
  try:
    if ckpt.latest_step() is not None:
      fall_back = config.checkpoint.get("on_corrupt", "stop") == "previous"
      state, _ = ckpt.restore_newest_good(state, fall_back=fall_back)
      console.info(f"resuming from checkpoint step {int(state.step)} in {ckpt.directory}")
    start_step = int(state.step)
    writer.rewind(start_step)
    runs.write_config(config, config_dir or workdir)

    step_fn = ShapeCompiled(jit_train_step(program.train_step, state, mesh))
    eval_fn = jit_eval_step(program.eval_step, state, mesh)
    meter = ProgressMeter(total, program.batch_size, start_step)
    if start_step < total:
      batches = pipeline.DevicePrefetch(
          program.train_batches(start_step=start_step),
          mesh,
          timeout_s=config.train.get("input_timeout_s", 0),
          # Several processes stop together at an agreed step (the watcher), never alone here.
          interrupted=(lambda: watcher.signalled) if jax.process_count() == 1 else None,
      )
      batch = next_batch(batches, start_step, None)  # compiled before the hosts line up
      step_fn.compile(state, batch)
      sharding.wait_for_all_processes(f"train step compiled, step {start_step}")
    pending = None  # (step, metrics) of a dispatched step whose finite flag is not read yet
    saved_step = start_step

    def settle():
      """Reads the pending step's metrics (waiting for it) and applies the non-finite policy."""
      nonlocal pending
      done, values = pending[0], jax.device_get(pending[1])
      pending = None
      skips.record(done, check_finite(done, values, policy))
      return values

    def save_and_stop_while_waiting(step):
      """SIGTERM while waiting for a batch (one process): no step is running, so save the last
      one and stop."""
      if pending is not None:
        settle()
      if step > saved_step:
        ckpt.save(step, state, force=True)

    for step in range(start_step, total):
      ckpt.check_saves()  # a failed background save ends the run now, not at the next save
      if step != start_step:
        batch = next_batch(batches, step, save_and_stop_while_waiting)
      profiler.before(step)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = step_fn(state, batch)
      done = step + 1
      profiler.after(done, state)
      if pending is not None:
        settle()  # the previous step, finished or nearly: this one is already queued behind it
      pending = (done, metrics)
      if step == start_step:
        settle()  # the clock starts once the first (compiling) step is done
        meter.update(done)
        pending = None
      log = is_due(done, config.train.log_every, total)
      evaluate = is_due(done, config.eval.every_steps, total)
      values = None
      if pending is not None and (log or evaluate or ckpt.should_save(done)):
        values = settle()
      if log:
        values = jax.device_get(metrics) if values is None else values
        writer.write(
            done,
            {f"train/{k}": v for k, v in values.items()}
            | {f"train/{k}": v for k, v in meter.update(done).items()},
        )
      stop = watcher.should_stop(done) and done < total
      if stop and pending is not None:
        settle()  # a checkpoint follows: its step must be known to be finite
      save = evaluate or stop or ckpt.should_save(done)
      if evaluate:
        sharding.wait_for_all_processes(f"evaluation at step {done}")
        eval_metrics = program.evaluate(state, eval_fn)
        writer.write(done, eval_metrics)
      if save:
        ckpt.save(done, state, metrics=eval_metrics if evaluate else None, force=True)
        saved_step = done
      if stop:
        raise Preempted(
            f"stopped at step {done} on request, checkpoint saved in {ckpt.directory}; rerun the "
            f"same command to resume (exit {errors.STOPPED_EXIT})"
        )
    if pending is not None:
      settle()
    if start_step >= total:  # finished earlier: its final metrics, not logged a second time
      console.info(f"run already finished at step {start_step} in {ckpt.directory}")
      eval_metrics = program.evaluate(state, eval_fn)
  except BaseException:
    failing = True
    raise
  finally:
    profiler.stop(done)
    if batches is not None:
      batches.close()
    try:
      ckpt.close()
    except ckpt_lib.CheckpointSaveError:
      if not failing:  # else the error already raised is the one to report
        raise
    finally:
      writer.close()
      watcher.close()
  return eval_metrics
