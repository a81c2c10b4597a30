"""Student: distillation heads (shapes, unit norm, teacher width), voken head, parameter layout."""

import jax
import numpy as np
import pytest
from flax import nnx

from vidlankd_jax import sharding
from vidlankd_jax.models.bert import BertConfig
from vidlankd_jax.models.student import Student
from vidlankd_jax.objectives import FEATURE_OBJECTIVES

STUDENT = BertConfig(vocab_size=96, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
TEACHER_HIDDEN = 48  # wider than the student: the heads project to the teacher's width


def build(objectives, num_vokens=0):
  return sharding.create_sharded(
      lambda: Student(
          STUDENT,
          objectives,
          teacher_hidden_size=TEACHER_HIDDEN,
          num_vokens=num_vokens,
          rngs=nnx.Rngs(0),
      ),
      sharding.single_device_mesh(),
      sharding.DEFAULT_RULES,
  )


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(5, STUDENT.vocab_size, (3, 10)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[0, 6:] = 0
  return ids, mask, np.zeros_like(ids), rng.integers(1, 6, (3, 4)).astype(np.int32)


def test_heads_project_to_the_teacher_width_with_unit_norm(batch):
  ids, mask, types, positions = batch
  model = build(("nst", "crd", "voken"), num_vokens=7)
  hidden, logits, heads = model(ids, mask, types, positions)
  assert hidden.shape == (3, 10, 32) and logits.shape == (3, 4, 96)
  assert set(heads) == {"nst", "crd", "voken"}
  for name in ("nst", "crd"):
    assert heads[name].shape == (3, 10, TEACHER_HIDDEN) and heads[name].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(np.asarray(heads[name]), axis=-1), 1.0, atol=1e-5)
  # Each objective has its own head: same input, different weights, different outputs.
  assert np.abs(np.asarray(heads["nst"]) - np.asarray(heads["crd"])).max() > 1e-3
  assert heads["voken"].shape == (3, 10, 7)


def test_params_live_under_language_and_kd_heads():
  params = nnx.state(build(FEATURE_OBJECTIVES + ("kd",)), nnx.Param).to_pure_dict()
  assert set(params) == {"language", "kd_heads"}
  assert set(params["kd_heads"]) == set(FEATURE_OBJECTIVES)  # soft-label KD has no head
  head = params["kd_heads"]["nst"]
  assert head["transform"]["kernel"].shape == (32, 32)
  assert head["output"]["kernel"].shape == (32, TEACHER_HIDDEN)
  assert "bert" in params["language"] and "mlm" in params["language"]
  # The text-only baseline is a plain BERT: no head at all.
  assert set(nnx.state(build(()), nnx.Param).to_pure_dict()) == {"language"}


def test_dropout_only_with_rngs(batch):
  ids, mask, types, positions = batch
  model = build(("nst",))
  a = model(ids, mask, types, positions)[2]["nst"]
  b = model(ids, mask, types, positions)[2]["nst"]
  c = model(ids, mask, types, positions, rngs=nnx.Rngs(dropout=1))[2]["nst"]
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-4


def test_voken_head_needs_vokens():
  with pytest.raises(ValueError, match="voken objective needs a positive number of vokens"):
    build(("voken",), num_vokens=0)


def test_heads_are_sharded_by_their_logical_axes():
  mesh_cfg = {"data": 2, "fsdp": 2, "tensor": 2, "num_slices": 1}
  mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:8])
  model = sharding.create_sharded(
      lambda: Student(STUDENT, ("nst",), teacher_hidden_size=TEACHER_HIDDEN, rngs=nnx.Rngs(0)),
      mesh,
      sharding.DEFAULT_RULES,
  )
  kernel = model.kd_heads["nst"].output.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
