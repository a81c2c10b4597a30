"""The KD objective registry: a new objective is one declaration that every reader picks up."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vidlankd_jax import configlib
from vidlankd_jax import errors
from vidlankd_jax import objectives
from vidlankd_jax import sharding
from vidlankd_jax.models.bert import BertConfig
from vidlankd_jax.models.student import Student
from vidlankd_jax.train import distill


def _l1(x: objectives.TermInputs) -> objectives.Term:
  gap = jnp.sum(jnp.abs(x.head - x.targets), axis=-1) * x.settings["l1_scale"]
  return objectives.Term(jnp.mean(gap))


def _check_l1(config):
  if config.kd.l1_scale <= 0:
    raise errors.ConfigError("not positive", "config.kd.l1_scale", "use a positive scale")


NEW = objectives.Objective(
    name="l1",
    summary="a test objective: L1 distance per token",
    term=_l1,
    weight_derivation="a mean over the tokens",
    weight=0.5,
    settings={"l1_scale": 2.0},
    check=_check_l1,
)


@pytest.fixture
def registered(monkeypatch):
  monkeypatch.setitem(objectives.OBJECTIVES, NEW.name, NEW)


def test_a_new_objective_is_one_declaration(registered):
  config = configlib.load("distill", "size=tiny,objectives=nst+l1")
  assert config.kd.weights.l1 == 0.5 and config.kd.l1_scale == 2.0  # configs/distill.py
  configlib.validate(config, 1)  # the entry point's checks
  kd = distill.KDSpec.from_config(config)
  assert kd.objectives == ("nst", "l1") and kd.weights["l1"] == 0.5
  config.kd.l1_scale = -1.0
  with pytest.raises(errors.ConfigError, match=r"\(config\.kd\.l1_scale\)"):
    configlib.validate(config, 1)
  cfg = BertConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
  student = sharding.create_sharded(
      lambda: Student(cfg, kd.objectives, teacher_hidden_size=8, rngs=nnx.Rngs(0)),
      sharding.single_device_mesh(),
      sharding.DEFAULT_RULES,
  )
  assert set(student.kd_heads) == {"nst", "l1"}  # the head it declares
  rng = np.random.default_rng(0)
  heads = {n: rng.standard_normal((2, 4, 8)).astype(np.float32) for n in kd.objectives}
  targets = rng.standard_normal((2, 4, 8)).astype(np.float32)
  batch = {"attention_mask": np.ones((2, 4), np.int32)}
  terms, _, _ = distill.objective_terms(kd, heads, targets, batch, None, None)
  expected = 2.0 * np.mean(np.sum(np.abs(heads["l1"] - targets), -1))
  assert float(terms["l1"]) == pytest.approx(expected, rel=1e-6)  # the step's dispatch
  assert "`kd.weights.l1 = 0.5`, `kd.l1_scale = 2.0`" in objectives.recipe_table()  # the docs


def test_teacher_outputs_and_heads_follow_the_declarations():
  assert objectives.teacher_outputs(("kd",)) == {"states", "logits"}
  assert objectives.teacher_outputs(("voken",)) == {"unmasked_states"}
  assert objectives.FEATURE_OBJECTIVES == ("nst", "ntxent", "crd", "mse", "cos")
  assert objectives.VOKEN_OBJECTIVE == "voken"


def test_released_weights_follow_the_shapes_and_equal_the_defaults_at_the_released_ones():
  base = configlib.load("distill", "size=base,objectives=nst")
  assert objectives.released_weights(base) == objectives.default_weights()
  tiny = configlib.load("distill", "size=tiny,objectives=nst")  # L = 32, groups of 8
  assert objectives.released_weights(tiny) == {
      **objectives.default_weights(),
      "nst": 1.0,
      "ntxent": 1 / 16,
  }
  assert dict(tiny.kd.weights) == objectives.released_weights(tiny)
