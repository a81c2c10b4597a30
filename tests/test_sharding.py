"""Mesh construction, logical-axis rules, sharded BERT forward and train step vs one device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from vidlankd_jax import configlib as common
from vidlankd_jax import sharding
from vidlankd_jax.models.bert import BertConfig, BertForMaskedLM
from vidlankd_jax import train_state as train_common

CFG = BertConfig(
    vocab_size=128,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    max_position_embeddings=32,
    hidden_dropout=0.0,
    attention_dropout=0.0,
)
RULES = common.logical_axis_rules()


def mesh_of(data, fsdp, tensor):
  cfg = common.mesh_config()
  cfg.data, cfg.fsdp, cfg.tensor = data, fsdp, tensor
  return sharding.make_mesh(cfg)


def build(mesh):
  return sharding.create_sharded(lambda: BertForMaskedLM(CFG, rngs=nnx.Rngs(0)), mesh, RULES)


def make_batch(batch=8, length=16, preds=4):
  rng = np.random.default_rng(0)
  mask = np.ones((batch, length), np.int32)
  mask[1, 10:] = 0
  mask[5, 3:] = 0
  return {
      "input_ids": rng.integers(5, CFG.vocab_size, (batch, length)).astype(np.int32) * mask,
      "attention_mask": mask,
      "token_type_ids": np.zeros((batch, length), np.int32),
      "mlm_positions": rng.integers(0, 3, (batch, preds)).astype(np.int32),
      "mlm_targets": rng.integers(5, CFG.vocab_size, (batch, preds)).astype(np.int32),
      "mlm_weights": np.ones((batch, preds), np.float32),
  }


def test_mesh_shape_fills_minus_one_and_rejects_bad_sizes():
  cfg = common.mesh_config()
  cfg.fsdp, cfg.tensor = 2, 2
  assert sharding.mesh_shape(cfg, 8) == (2, 2, 2)
  cfg.tensor = 3
  with pytest.raises(ValueError, match="not divisible"):
    sharding.mesh_shape(cfg, 8)
  cfg.data, cfg.fsdp, cfg.tensor = 2, 2, 1
  with pytest.raises(ValueError, match="needs 4 devices"):
    sharding.mesh_shape(cfg, 8)


def test_mesh_has_auto_axes_and_the_three_named_axes():
  mesh = mesh_of(2, 2, 2)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_parameters_carry_the_shardings_the_rules_say():
  mesh = mesh_of(2, 2, 2)
  model = build(mesh)
  spec = lambda v: v.get_value().sharding.spec
  assert spec(model.bert.embeddings.word_embeddings.embedding) == P("tensor", "fsdp")
  layers = model.bert.encoder.layers  # stacked: a leading, unsharded layer axis
  assert spec(layers.attention.query.kernel) == P(None, "fsdp", "tensor")
  assert spec(layers.attention.output.kernel) == P(None, "tensor", "fsdp")
  assert spec(layers.intermediate.kernel) == P(None, "fsdp", "tensor")
  assert spec(layers.output.kernel) == P(None, "tensor", "fsdp")
  assert all(axis is None for axis in spec(layers.layer_norm.scale))  # replicated
  # Changing a rule changes the placement: replicate the MLP dimension instead.
  rules = tuple((k, None) if k == "mlp" else (k, v) for k, v in RULES)
  model2 = sharding.create_sharded(lambda: BertForMaskedLM(CFG, rngs=nnx.Rngs(0)), mesh, rules)
  assert spec(model2.bert.encoder.layers.intermediate.kernel) in (
      P(None, "fsdp"),
      P(None, "fsdp", None),
  )
  table = sharding.describe_shardings(nnx.state(model, nnx.Param))
  row = next(
      r for r in table.splitlines() if r.startswith("bert/encoder/layers/attention/query/kernel")
  )
  assert f"({CFG.num_layers}, 32, 32)" in row and "P(None, 'fsdp', 'tensor')" in row


forward = nnx.jit(
    lambda m, b: m(b["input_ids"], b["attention_mask"], b["token_type_ids"], b["mlm_positions"])
)


@pytest.fixture(scope="module")
def single_device_forward():
  batch = make_batch()
  return batch, forward(build(sharding.single_device_mesh()), batch)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_forward_equals_single_device(shape, single_device_forward):
  batch, (ref_hidden, ref_logits) = single_device_forward
  mesh = mesh_of(*shape)
  model = build(mesh)
  with sharding.mesh_context(mesh, RULES):
    hidden, logits = forward(model, sharding.global_batch(batch, mesh))
  assert len(hidden.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(hidden), np.asarray(ref_hidden), atol=1e-5)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5)


def mlm_loss(params, graphdef, rest, batch):
  model = nnx.merge(graphdef, params, rest)
  _, logits = model(
      batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], batch["mlm_positions"]
  )
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["mlm_targets"])
  return jnp.sum(ce * batch["mlm_weights"]) / jnp.sum(batch["mlm_weights"])


def one_train_step(mesh, batch, accum=1):
  model = build(mesh)
  graphdef, params, rest = train_common.nnx_params(model)
  opt_cfg = common.optimizer_config(1e-3, warmup_steps=0)
  tx = train_common.make_optimizer(opt_cfg, total_steps=10)
  state = train_common.init_train_state(tx, params)

  def step(state, batch):
    def loss_fn(p, b, r):
      loss = mlm_loss(p, graphdef, rest, b)
      return loss, ({"loss": loss}, {})

    return train_common.guarded_update(
        tx, state, loss_fn, batch, jax.random.key(0), num_micro=accum
    )[0]

  shardings = sharding.state_shardings(state)
  jitted = jax.jit(
      step, in_shardings=(shardings, sharding.batch_sharding(mesh)), out_shardings=shardings
  )
  with sharding.mesh_context(mesh, RULES):
    new_state = jitted(state, sharding.global_batch(batch, mesh))
  return new_state


@pytest.fixture(scope="module")
def single_device_step():
  return one_train_step(sharding.single_device_mesh(), make_batch())


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_sharded_train_step_equals_single_device(shape, single_device_step):
  ref = single_device_step
  out = one_train_step(mesh_of(*shape), make_batch())
  assert int(out.step) == 1
  for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(out.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  # Parameters moved (the step did something) and kept their shardings.
  kernel = out.params["bert"]["encoder"]["layers"]["intermediate"]["kernel"]
  assert kernel.get_value().sharding.spec == P(None, "fsdp", "tensor") or shape == (8, 1, 1)


def test_gradient_accumulation_equals_the_full_batch_step(single_device_step):
  full = single_device_step
  accum = one_train_step(mesh_of(2, 2, 2), make_batch(), accum=2)
  # Equal weights per micro-batch make the mean of micro-batch means the full-batch mean.
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(accum.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_host_data_shard_and_global_batch_on_one_process():
  mesh = mesh_of(2, 2, 2)
  assert sharding.host_data_shard(mesh, 16) == (0, 1)
  batch = {"x": np.arange(16 * 3, dtype=np.int32).reshape(16, 3)}
  g = sharding.global_batch(batch, mesh)["x"]
  assert g.shape == (16, 3) and g.sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(np.asarray(g), batch["x"])


def test_weight_decay_mask_skips_biases_and_layer_norms():
  model = build(sharding.single_device_mesh())
  _, params, _ = train_common.nnx_params(model)
  mask = train_common.decay_mask(params)
  layer = mask["bert"]["encoder"]["layers"]  # stacked: [layers, ...] matrices and vectors
  assert layer["intermediate"]["kernel"].get_value() is True
  assert layer["intermediate"]["bias"].get_value() is False
  assert layer["layer_norm"]["scale"].get_value() is False
