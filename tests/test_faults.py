"""Faults a long run meets: non-finite steps, damaged checkpoints, checkpoints of another config.

The non-finite cases run the teacher's real loop (`loop.fit` with the teacher's step) on real
batches, one of which is poisoned with NaN video features, as a corrupt input file would be.
"""

import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vidlankd_jax import configlib
from vidlankd_jax import checkpoint as ckpt_lib
from vidlankd_jax import sharding
from vidlankd_jax.data import synthetic
from vidlankd_jax import train_state as common
from vidlankd_jax.train import loop
from vidlankd_jax.train import teacher as teacher_train

from support import multihost_worker as worker

BAD_STEP = 3
pytestmark = pytest.mark.slow  # training loops run to their fault


def loop_config(data_dir, policy, steps):
  config = configlib.load("teacher", "size=tiny")
  config.data.data_dir = data_dir
  config.train.steps = steps
  config.train.log_every = 1
  config.train.on_nonfinite = policy
  config.eval.every_steps = steps
  config.eval.batches = 1
  config.eval.retrieval_clips = 16
  config.checkpoint.every_steps = 1
  config.checkpoint.keep = 10
  return config


def poisoned(train_step_fn, bad_step):
  """The step, fed NaN video features at step `bad_step` (1-based, like the logged steps)."""

  def step_fn(state, batch):
    bad = state.step + 1 == bad_step
    return train_step_fn(
        state, dict(batch, video_features=jnp.where(bad, jnp.nan, batch["video_features"]))
    )

  return step_fn


def fit_poisoned(config, workdir):
  mesh = sharding.make_mesh(config.mesh)
  program = teacher_train.build(config, mesh)
  program.train_step = poisoned(program.train_step, BAD_STEP)
  return loop.fit(program, config, workdir, mesh)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("faults")
  synthetic.prepare_video_text(str(root / "data"), log=lambda *_: None)
  return str(root / "data")


@pytest.fixture(scope="module")
def stopped_run(data_dir, tmp_path_factory):
  """A run whose step 3 is non-finite, under the default policy (stop); checkpoints 1 and 2."""
  workdir = str(tmp_path_factory.mktemp("stopped"))
  with pytest.raises(loop.NonFiniteError) as error:
    fit_poisoned(loop_config(data_dir, "stop", 5), workdir)
  return workdir, str(error.value)


def test_nonfinite_step_stops_naming_the_step_and_losses_and_keeps_the_checkpoint(stopped_run):
  workdir, message = stopped_run
  assert f"at step {BAD_STEP}:" in message and "loss=nan" in message
  assert "contrastive_loss=nan" in message and "on_nonfinite='skip'" in message
  assert worker.checkpoint_steps(workdir) == ([1, 2], [])
  assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(worker.final_params(workdir)))
  assert [m["step"] for m in worker.read_metrics(workdir)] == [1, 2]


def test_skip_policy_skips_the_step_and_training_goes_on(data_dir, tmp_path, capsys):
  workdir = str(tmp_path)
  metrics = fit_poisoned(loop_config(data_dir, "skip", 4), workdir)
  assert np.isfinite(metrics["eval/mlm_loss"])
  assert f"[step {BAD_STEP}] skipped: non-finite loss or gradient" in capsys.readouterr().out
  directory = os.path.join(workdir, "checkpoints")
  params = {s: ckpt_lib.restore_params_numpy(directory, s) for s in (2, 3, 4)}
  for before, skipped in zip(jax.tree.leaves(params[2]), jax.tree.leaves(params[3]), strict=True):
    np.testing.assert_array_equal(before, skipped)  # the bad step changed nothing
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(params[3]), jax.tree.leaves(params[4])))
  losses = {m["step"]: m["train/loss"] for m in worker.read_metrics(workdir) if "train/loss" in m}
  assert np.isnan(losses[BAD_STEP]) and all(np.isfinite(losses[s]) for s in (1, 2, 4))


@pytest.mark.parametrize("damage", ["removed", "truncated"])
def test_damaged_checkpoint_is_an_error_naming_the_item(stopped_run, data_dir, tmp_path, damage):
  workdir = str(tmp_path / "run")
  shutil.copytree(stopped_run[0], workdir)
  files = glob.glob(
      os.path.join(workdir, "checkpoints", "2", "params", "**", "d", "*"), recursive=True
  )
  assert files
  for path in files:
    if damage == "removed":
      os.remove(path)
    else:
      with open(path, "r+b") as f:
        f.truncate(8)
  config = loop_config(data_dir, "stop", 5)
  mesh = sharding.make_mesh(config.mesh)
  program = teacher_train.build(config, mesh)
  with pytest.raises(
      ckpt_lib.CorruptCheckpointError,
      match=r"checkpoints/2/params is damaged or incomplete: .*"
      r"delete .*checkpoints/2 .*to resume from step 1",
  ):
    loop.fit(program, config, workdir, mesh)


def test_checkpoint_of_another_model_size_is_an_error_naming_the_difference(stopped_run, data_dir):
  config = loop_config(data_dir, "stop", 5)
  config.model.hidden_size = 128
  config.model.num_heads = 4
  record = os.path.join(stopped_run[0], "config.json")
  before = open(record).read()
  with pytest.raises(
      ckpt_lib.IncompatibleCheckpointError, match="model.hidden_size: checkpoint 64 vs config 128"
  ):
    teacher_train.train_and_evaluate(config, stopped_run[0])
  assert (
      open(record).read() == before
  )  # the rejected rerun leaves the record describing the weights


def test_checkpoint_of_another_objective_set_is_an_error_naming_the_difference(tmp_path):
  mesh = sharding.single_device_mesh()
  params = {"w": jax.device_put(jnp.ones((2, 2)), sharding.replicated(mesh))}
  state = common.init_train_state(
      common.make_optimizer(configlib.load("distill", "size=tiny").optimizer, 10), params
  )
  nst = configlib.load("distill", "size=tiny,objectives=nst")
  crd = configlib.load("distill", "size=tiny,objectives=nst+crd")
  manager = loop.checkpoint_manager(nst, str(tmp_path), ckpt_lib.fingerprint(nst))
  manager.save(1, state, force=True)
  manager.close()
  manager = loop.checkpoint_manager(crd, str(tmp_path), ckpt_lib.fingerprint(crd))
  with pytest.raises(
      ckpt_lib.IncompatibleCheckpointError,
      match="kd.objectives: checkpoint 'nst' vs config 'nst\\+crd'",
  ):
    manager.restore(state)
  manager.close()
