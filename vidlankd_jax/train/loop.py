"""The training loop every pretraining stage shares: resume, logging, evaluation, checkpoints,
numerical faults and preemption.

A stage (teacher.py, distill.py) builds its state and its pure step functions; `fit` runs them.
Resumes are exact: the data restarts at the batch the checkpoint's step would read, each step's
randomness is a function of (seed, step), so a run stopped and started again ends with the same
parameters and metrics as one that was never stopped.
"""

from __future__ import annotations

import os

import jax

from vidlankd_jax import checkpoint as ckpt_lib
from vidlankd_jax import sharding
from vidlankd_jax.train import common

NONFINITE_POLICIES = ("stop", "skip")


def checkpoint_manager(config, workdir: str) -> ckpt_lib.CheckpointManager:
  """The run's checkpoints under `<workdir>/checkpoints`, fingerprinted with its config."""
  return ckpt_lib.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      every_steps=config.checkpoint.every_steps,
      keep=config.checkpoint.keep,
      best_metric=config.checkpoint.best_metric,
      best_mode=config.checkpoint.best_mode,
      async_save=config.checkpoint.async_save,
      fingerprint=ckpt_lib.fingerprint(config),
  )


def fit(
    config, workdir: str, mesh, state, train_step_fn, eval_step_fn, evaluate_fn
) -> dict[str, float]:
  """Runs `train_step_fn(state, batch) -> (state, metrics)` to `config.train.steps`.

  The state is restored from `<workdir>/checkpoints` when a checkpoint is there (its `frozen`
  part is never saved nor restored) and `metrics.jsonl` is cut back to that step; data resumes
  at the exact batch. Both steps are jitted with the state's shardings;
  `evaluate_fn(state, jitted_eval, config, mesh)` returns the `eval/...` metrics, written and
  used for the best checkpoint. A non-finite step (the step function leaves the state as it
  was and reports `finite`) stops the run (`config.train.on_nonfinite="stop"`, the last
  checkpoint is kept) or is skipped ("skip"). SIGTERM, or a pod's preemption notice, saves a
  checkpoint at the next step boundary and returns.
  """
  policy = config.train.on_nonfinite
  if policy not in NONFINITE_POLICIES:
    raise ValueError(f"config.train.on_nonfinite {policy!r} is not one of {NONFINITE_POLICIES}")
  total = int(config.train.steps)
  ckpt = checkpoint_manager(config, workdir)
  writer = common.MetricsWriter(workdir)
  watcher = ckpt_lib.PreemptionWatcher()  # from here on, SIGTERM waits for a step boundary
  eval_metrics: dict[str, float] = {}
  try:
    if ckpt.latest_step() is not None:
      state, _ = ckpt.restore(state)
      writer.rewind(int(state.step))
      print(f"resuming from checkpoint step {int(state.step)} in {ckpt.directory}", flush=True)
    start_step = int(state.step)

    state_sh = sharding.state_shardings(state)
    batch_sh = sharding.batch_sharding(mesh)
    step_fn = jax.jit(
        train_step_fn,
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, None),
        donate_argnums=0,
    )
    eval_fn = jax.jit(eval_step_fn, in_shardings=(state_sh, batch_sh))
    meter = common.ProgressMeter(total, config.train.batch_size, start_step)
    host_batches = common.data_iterator(
        config.data,
        mesh,
        "train",
        seed=config.seed,
        global_batch_size=config.train.batch_size,
        start_step=start_step,
    )
    batches = (sharding.global_batch(b, mesh) for b in host_batches)
    batch = next(batches, None)
    if start_step < total:  # compiled before the hosts line up for the first step
      step_fn = step_fn.lower(state, batch).compile()
      sharding.wait_for_all_processes(f"train step compiled, step {start_step}")
    for step in range(start_step, total):
      batch = batch if step == start_step else next(batches)
      state, metrics = step_fn(state, batch)
      done = step + 1
      log = done % config.train.log_every == 0 or done == total
      if policy == "stop" or log:  # "stop" reads every step's flag: no bad step goes unseen
        metrics = jax.device_get(metrics)
        common.check_finite(done, metrics, policy)
      if log:
        writer.write(
            done,
            {f"train/{k}": v for k, v in metrics.items()}
            | {f"train/{k}": v for k, v in meter.update(done).items()},
        )
      elif step == start_step:
        meter.update(done)
      stop = watcher.should_stop(done) and done < total
      evaluate = done % config.eval.every_steps == 0 or done == total
      if evaluate:
        sharding.wait_for_all_processes(f"evaluation at step {done}")
        eval_metrics = evaluate_fn(state, eval_fn, config, mesh)
        writer.write(done, eval_metrics)
      ckpt.save(done, state, metrics=eval_metrics if evaluate else None, force=evaluate or stop)
      if stop:
        print(f"stopped at step {done} on request; checkpoint saved, rerun to resume", flush=True)
        break
  finally:
    ckpt.close()
    writer.close()
    watcher.close()
  return eval_metrics
