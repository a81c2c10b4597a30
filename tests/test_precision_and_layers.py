"""Accelerator-first numerics: bf16 compute against f32, scanned layers against unrolled ones,
remat policies, and the one `dtype` switch of a config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vidlankd_jax import configlib
from vidlankd_jax import sharding
from vidlankd_jax import train_state as ts
from vidlankd_jax.models import bert
from vidlankd_jax.models.bert import BertConfig, BertForMaskedLM

SIZES = dict(vocab_size=200, hidden_size=64, num_layers=3, num_heads=2, intermediate_size=128)


def model_and_batch(**overrides):
  cfg = BertConfig(**SIZES, **overrides)
  model = sharding.create_sharded(
      lambda: BertForMaskedLM(cfg, rngs=nnx.Rngs(0)),
      sharding.single_device_mesh(),
      sharding.DEFAULT_RULES,
  )
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 200, (4, 16)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 10:] = 0
  positions = rng.integers(1, 10, (4, 3)).astype(np.int32)
  return model, (ids, mask, np.zeros_like(ids), positions)


def loss_and_grads(model, inputs, key=None):
  """A training-shaped loss (dropout on when `key` is given) and its gradients, float32."""
  graphdef, params, rest = ts.nnx_params(model)

  def loss(params):
    m = nnx.merge(graphdef, params, rest)
    rngs = None if key is None else nnx.Rngs(dropout=key)
    hidden, logits = m(*inputs, rngs=rngs)
    return jnp.mean(jax.nn.logsumexp(logits, -1)) + jnp.mean(jnp.sin(hidden.astype(jnp.float32)))

  return jax.jit(jax.value_and_grad(loss))(params)


def max_relative(a_tree, b_tree) -> float:
  """The largest difference of any leaf relative to that leaf's scale; leaves whose gradient is
  zero but for round-off (attention key biases: softmax ignores them) are scaled by the largest
  gradient of all."""
  pairs = [
      (np.asarray(a, np.float64), np.asarray(b, np.float64))
      for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree), strict=True)
  ]
  floor = 1e-6 * max(float(np.abs(b).max()) for _, b in pairs)
  return max(float(np.abs(a - b).max() / max(np.abs(b).max(), floor)) for a, b in pairs)


KEY = jax.random.key(7)


@pytest.fixture(scope="module")
def unrolled_reference():
  unrolled, inputs = model_and_batch(scan_layers=False)
  return inputs, loss_and_grads(unrolled, inputs, KEY)


@pytest.mark.parametrize("remat", ["none", "dots", "full"])
def test_scanned_layers_equal_unrolled_ones_with_dropout(remat, unrolled_reference):
  """The same function, dropout included: each layer draws its slot of one key split."""
  inputs, (loss_u, grads_u) = unrolled_reference
  scanned, _ = model_and_batch(scan_layers=True, remat=remat)
  loss_s, grads_s = loss_and_grads(scanned, inputs, KEY)
  assert float(loss_s) == pytest.approx(float(loss_u), rel=1e-6)
  assert max_relative(grads_s, grads_u) < 1e-4
  # The parameters keep one module per layer: what checkpoints and HF interop read and write.
  names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(scanned, nnx.Param))}
  assert "bert/encoder/layers/2/attention/query/kernel" in names


def test_bf16_compute_agrees_with_f32_within_bf16_tolerance():
  f32, inputs = model_and_batch(dtype="float32")
  bf16, _ = model_and_batch(dtype="bfloat16")
  hidden32, logits32 = f32(*inputs)
  hidden16, logits16 = bf16(*inputs)
  assert hidden16.dtype == jnp.bfloat16 and logits16.dtype == jnp.float32  # f32 loss inputs
  _, params = ts.nnx_params(bf16)[:2]
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))  # f32 master weights
  np.testing.assert_allclose(np.asarray(hidden16, np.float32), hidden32, atol=0.08)
  loss32, grads32 = loss_and_grads(f32, inputs)
  loss16, grads16 = loss_and_grads(bf16, inputs)
  assert float(loss16) == pytest.approx(float(loss32), rel=2e-2)
  assert max_relative(grads16, grads32) < 0.05


def test_auto_dtype_is_float32_on_cpu_and_one_switch_sets_every_tower():
  assert jax.default_backend() == "cpu" and bert.resolve_dtype("auto") == "float32"
  with pytest.raises(ValueError, match="float16"):
    bert.resolve_dtype("float16")
  from vidlankd_jax.models.teacher import Teacher

  config = configlib.load("teacher", "size=tiny")
  assert config.dtype == "auto"
  config.dtype = "bfloat16"
  teacher = sharding.create_sharded(
      lambda: Teacher.from_config(config, rngs=nnx.Rngs(0)),
      sharding.single_device_mesh(),
      config.sharding_rules,
  )
  assert teacher.language.config.dtype == teacher.video.config.dtype == "bfloat16"
  with pytest.raises(ValueError, match="remat 'some'"):
    BertConfig(remat="some")
  assert BertConfig(remat=True).remat == "full"  # configs written before the policies existed
