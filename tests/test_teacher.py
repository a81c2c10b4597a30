"""Teacher: video encoder masking, frozen/joint video tower, sharded step, retrieval, resume."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from vidlankd_jax import configlib
from vidlankd_jax import sharding
from vidlankd_jax.evaluation.retrieval import retrieval_metrics
from vidlankd_jax.models.teacher import Teacher
from vidlankd_jax.train import loop
from vidlankd_jax.train import teacher as teacher_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir="", **overrides):
  config = configlib.load("teacher", "size=tiny")
  config.data.data_dir = data_dir
  config.video.input_dim = 64
  config.model.vocab_size = 128
  config.optimizer.warmup_steps = 0  # the first step must move the weights
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def random_batch(config, batch=8, seed=0):
  rng = np.random.default_rng(seed)
  l, p, t = config.data.seq_len, config.data.max_predictions, config.video.max_steps
  mask = np.ones((batch, l), np.int32)
  mask[:, l // 2 :] = 0
  vmask = np.ones((batch, t), np.int32)
  vmask[:, t // 2 :] = 0
  ids = rng.integers(5, config.model.vocab_size, (batch, l)).astype(np.int32) * mask
  return {
      "input_ids": ids,
      "unmasked_ids": ids,
      "attention_mask": mask,
      "token_type_ids": np.zeros_like(ids),
      "mlm_positions": rng.integers(1, l // 2, (batch, p)).astype(np.int32),
      "mlm_targets": rng.integers(5, config.model.vocab_size, (batch, p)).astype(np.int32),
      "mlm_weights": np.ones((batch, p), np.float32),
      "video_features": rng.standard_normal((batch, t, config.video.input_dim)).astype(np.float32),
      "video_mask": vmask,
  }


def test_padding_steps_do_not_change_the_clip_vector():
  config = tiny_config()
  model = sharding.create_sharded(
      lambda: Teacher.from_config(config, rngs=nnx.Rngs(0)),
      sharding.single_device_mesh(),
      config.sharding_rules,
  )
  batch = random_batch(config)
  clip, _ = model.video(batch["video_features"], batch["video_mask"])
  noisy = batch["video_features"].copy()
  noisy[:, config.video.max_steps // 2 :] += 100.0
  clip2, _ = model.video(noisy, batch["video_mask"])
  np.testing.assert_allclose(np.asarray(clip), np.asarray(clip2), atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(clip), axis=-1), 1.0, atol=1e-5)
  with pytest.raises(ValueError, match="width 32"):
    model.video(batch["video_features"][..., :32], batch["video_mask"])


def one_step(config, mesh):
  setup = teacher_train.init(config, mesh)
  before = jax.tree.map(np.asarray, setup.state.params)
  step = loop.jit_train_step(setup.train_step, setup.state, mesh)
  with sharding.mesh_context(mesh, config.sharding_rules):
    state, metrics = step(setup.state, sharding.global_batch(random_batch(config), mesh))
  return before, state, jax.device_get(metrics)


@pytest.fixture(scope="module")
def single_device_step():
  return one_step(tiny_config(), sharding.single_device_mesh())


def test_joint_training_updates_the_video_tower_and_frozen_does_not(single_device_step):
  before, state, metrics = single_device_step
  assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
  video_change = max(
      float(np.abs(np.asarray(a) - b).max())
      for a, b in zip(jax.tree.leaves(state.params["video"]), jax.tree.leaves(before["video"]))
  )
  assert video_change > 0
  frozen_before, frozen_state, _ = one_step(
      tiny_config(**{"video.frozen": True}), sharding.single_device_mesh()
  )
  for a, b in zip(
      jax.tree.leaves(frozen_state.params["video"]), jax.tree.leaves(frozen_before["video"])
  ):
    np.testing.assert_array_equal(np.asarray(a), b)
  language_change = max(
      float(np.abs(np.asarray(a) - b).max())
      for a, b in zip(
          jax.tree.leaves(frozen_state.params["language"]),
          jax.tree.leaves(frozen_before["language"]),
      )
  )
  assert language_change > 0


def test_sharded_teacher_step_equals_single_device(single_device_step):
  _, ref, _ = single_device_step
  mesh_cfg = tiny_config().mesh
  mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = 2, 2, 2
  _, out, _ = one_step(tiny_config(), sharding.make_mesh(mesh_cfg))
  for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(out.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_retrieval_metrics_on_known_rankings():
  sentence = np.eye(4, dtype=np.float32) + 0.1 * np.arange(4, dtype=np.float32)  # no ties
  clip = np.eye(4, dtype=np.float32)[[0, 1, 3, 2]]  # rows 2 and 3 swapped: ranks 1, 1, 2, 2
  m = retrieval_metrics(sentence, clip)
  assert m["recall@1"] == 0.5 and m["recall@5"] == 1.0 and m["median_rank"] == 1.5
  assert m["chance_recall@1"] == 0.25
  # A collapsed model (every clip scored alike) ranks at chance, and NaN scores rank last.
  collapsed = retrieval_metrics(np.ones((5, 3)), np.ones((5, 3)))
  assert collapsed["recall@1"] == 0.0 and collapsed["median_rank"] == 3.0
  broken = retrieval_metrics(np.full((5, 3), np.nan), np.ones((5, 3)))
  assert broken["recall@10"] == 1.0 and broken["median_rank"] == 5.0
