"""Fine-tuning heads: output shapes, per-choice independence, padding, losses, shardings."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from vidlankd_jax import configlib as common
from vidlankd_jax import sharding
from vidlankd_jax.models import heads
from vidlankd_jax.models.bert import BertConfig

CFG = BertConfig(
    vocab_size=100,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    max_position_embeddings=32,
)
RULES = common.logical_axis_rules()
B, C, L = 4, 3, 12


def build(kind, num_labels=3, mesh=None):
  return sharding.create_sharded(
      lambda: heads.build_head(kind, CFG, num_labels, rngs=nnx.Rngs(0)),
      mesh or sharding.single_device_mesh(),
      RULES,
  )


def rows(shape, seed=0, lengths=None):
  """Token ids, attention mask and token types of `shape` [..., L], padded after `lengths`."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, CFG.vocab_size, shape).astype(np.int32)
  length = np.full(shape[:-1], shape[-1]) if lengths is None else np.asarray(lengths)
  mask = (np.arange(shape[-1]) < length[..., None]).astype(np.int32)
  return ids * mask, mask, np.zeros(shape, np.int32)


@nnx.jit
def run(model, ids, mask, types, rngs=None):
  return model(ids, mask, types, rngs=rngs)


@pytest.fixture(scope="module")
def models():
  return {kind: build(kind) for kind in heads.KINDS}


def test_output_shapes_of_every_kind(models):
  ids, mask, types = rows((B, L))
  assert run(models["classification"], ids, mask, types)["logits"].shape == (B, 3)
  assert run(models["regression"], ids, mask, types)["logits"].shape == (B, 1)
  span = run(models["span"], ids, mask, types)
  assert span["start_logits"].shape == span["end_logits"].shape == (B, L)
  assert all(v.dtype == jnp.float32 for v in span.values())
  ids, mask, types = rows((B, C, L))
  assert run(models["multiple_choice"], ids, mask, types)["logits"].shape == (B, C)


def test_a_choice_score_depends_only_on_its_own_row(models):
  model = models["multiple_choice"]
  ids, mask, types = rows((B, C, L), lengths=np.full((B, C), L - 4))
  before = np.asarray(run(model, ids, mask, types)["logits"])
  changed = ids.copy()
  changed[:, 2, : L - 4] = np.random.default_rng(1).integers(5, CFG.vocab_size, (B, L - 4))
  after = np.asarray(run(model, changed, mask, types)["logits"])
  np.testing.assert_allclose(after[:, :2], before[:, :2], rtol=1e-6, atol=1e-6)
  assert not np.allclose(after[:, 2], before[:, 2])
  # Tokens behind choice 1's own padding mask do not count either.
  padded = ids.copy()
  padded[:, 1, L - 4 :] = 7
  np.testing.assert_allclose(
      np.asarray(run(model, padded, mask, types)["logits"]), before, rtol=1e-6, atol=1e-6
  )


def test_span_logits_of_padding_are_excluded(models):
  ids, mask, types = rows((B, L), lengths=[L, 8, 5, 1])
  out = run(models["span"], ids, mask, types)
  for name in ("start_logits", "end_logits"):
    logits = np.asarray(out[name])
    assert np.all(logits[mask == 0] <= -1e8)
    assert np.all(np.abs(logits[mask == 1]) < 1e3)


def test_dropout_is_active_only_with_rngs(models):
  model = models["classification"]
  ids, mask, types = rows((B, L))
  a = np.asarray(run(model, ids, mask, types)["logits"])
  np.testing.assert_array_equal(a, np.asarray(run(model, ids, mask, types)["logits"]))
  b = np.asarray(run(model, ids, mask, types, nnx.Rngs(dropout=1))["logits"])
  assert not np.allclose(a, b)


def log_softmax_np(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_classification_and_choice_losses_are_weighted_cross_entropy():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((6, 4)).astype(np.float32)
  labels = np.array([0, 1, 2, 3, 1, 0], np.int32)
  weights = np.array([1, 1, 1, 1, 0, 0], np.float32)  # the last two rows are batch padding
  expected = -np.mean(log_softmax_np(logits)[np.arange(4), labels[:4]])
  accuracy = np.mean(logits[:4].argmax(-1) == labels[:4])
  for fn in (heads.classification_loss, heads.multiple_choice_loss):
    loss, aux = fn(logits, labels, weights)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(aux["accuracy"], accuracy)
  # Garbage in padding rows changes nothing.
  junk = logits.copy()
  junk[4:] = 1e4
  np.testing.assert_allclose(
      heads.classification_loss(junk, labels, weights)[0], expected, rtol=1e-5
  )


def test_regression_loss_is_weighted_mse():
  scores = np.array([[1.0], [2.0], [5.0]], np.float32)
  targets = np.array([0.0, 2.5, -9.0], np.float32)
  loss, aux = heads.regression_loss(scores, targets, np.array([1, 1, 0], np.float32))
  np.testing.assert_allclose(loss, (1.0 + 0.25) / 2, rtol=1e-6)
  np.testing.assert_allclose(aux["mse"], loss)


def test_span_loss_is_the_mean_of_start_and_end_cross_entropy():
  rng = np.random.default_rng(0)
  start, end = rng.standard_normal((2, 3, 10)).astype(np.float32)
  s_pos, e_pos = np.array([2, 0, 4]), np.array([3, 0, 9])
  weights = np.ones(3, np.float32)
  loss, aux = heads.span_loss(start, end, s_pos, e_pos, weights)
  ce = lambda z, y: -np.mean(log_softmax_np(z)[np.arange(3), y])
  np.testing.assert_allclose(aux["start_loss"], ce(start, s_pos), rtol=1e-5)
  np.testing.assert_allclose(aux["end_loss"], ce(end, e_pos), rtol=1e-5)
  np.testing.assert_allclose(loss, (ce(start, s_pos) + ce(end, e_pos)) / 2, rtol=1e-5)
  exact = np.mean((start.argmax(-1) == s_pos) & (end.argmax(-1) == e_pos))
  np.testing.assert_allclose(aux["span_accuracy"], exact)


def test_task_loss_dispatches_on_the_kind_and_rejects_unknown_kinds():
  batch = {"label": np.array([1, 0]), "valid": np.array([1, 1])}
  logits = np.array([[0.0, 3.0], [3.0, 0.0]], np.float32)
  loss, aux = heads.task_loss("classification", {"logits": logits}, batch)
  np.testing.assert_allclose(aux["accuracy"], 1.0)
  with pytest.raises(ValueError, match="unknown task kind 'ranking'"):
    heads.task_loss("ranking", {"logits": logits}, batch)
  with pytest.raises(ValueError, match="unknown task kind"):
    heads.build_head("ranking", CFG, 2, rngs=nnx.Rngs(0))


def test_heads_carry_logical_shardings():
  cfg = common.mesh_config()
  cfg.data, cfg.fsdp, cfg.tensor = 2, 2, 2
  mesh = sharding.make_mesh(cfg)
  model = build("multiple_choice", mesh=mesh)
  assert model.classifier.kernel.get_value().sharding.spec == P("fsdp", None)
  assert model.bert.encoder.layers.attention.query.kernel.get_value().sharding.spec == P(
      None, "fsdp", "tensor"
  )
  span = build("span", mesh=mesh)
  assert span.qa_outputs.kernel.get_value().sharding.spec == P("fsdp", None)


def test_a_few_steps_fit_a_separable_classification_batch():
  model = build("classification", num_labels=2)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  ids, mask, types = rows((8, L), seed=3)
  labels = np.array([0, 1] * 4, np.int32)
  ids[:, 1] = np.where(labels == 1, 11, 12)  # the label is written in the second token
  batch = {"label": labels, "valid": np.ones(8, np.int32)}
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      out = nnx.merge(graphdef, p, rest)(ids, mask, types)
      return heads.task_loss("classification", out, batch)[0]

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  first = None
  for _ in range(30):
    params, opt_state, loss = step(params, opt_state)
    first = loss if first is None else first
  assert float(loss) < 0.1 < float(first)
