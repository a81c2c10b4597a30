"""Every loss against a slow float64 numpy loop of its formula, plus gradients and sharding."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from vidlankd_jax import losses  # noqa: E402

L_, H_, V_ = 6, 8, 11  # sequence length, hidden size, vocabulary size of the test inputs
RTOL, ATOL = 2e-5, 2e-6


# --------------------------------------------------------------------------- inputs and helpers


def _rng(seed):
  return np.random.default_rng(seed)


def _f32(x):
  """float32-rounded values, as float64 for the numpy references."""
  return np.asarray(x, np.float32).astype(np.float64)


def _np_normalize(x, axis=-1):
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def _mask(rng, batch, seq_len=L_):
  """Random lengths in [1, L], with one full-length sequence."""
  lengths = rng.integers(1, seq_len + 1, size=batch)
  lengths[0] = seq_len
  return (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.float64)


def _states(rng, *shape, normalize=True):
  x = rng.normal(size=shape)
  return _f32(_np_normalize(x) if normalize else x)


def _close(value, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(value, np.float64), expected, rtol=rtol, atol=atol)


def _np_log_softmax(z):
  z = z - z.max()
  return z - np.log(np.exp(z).sum())


def _assert_useful_gradient(fn, x):
  grad = np.asarray(jax.grad(fn)(jnp.asarray(x, jnp.float32)))
  assert np.all(np.isfinite(grad))
  assert np.abs(grad).max() > 0


# --------------------------------------------------------------------------- classification


def _np_weighted_ce(logits, labels, weights):
  total, count, correct = 0.0, 0.0, 0.0
  for b in range(logits.shape[0]):
    for p in range(logits.shape[1]):
      if weights[b, p] == 0:
        continue
      log_probs = _np_log_softmax(logits[b, p])
      total += -weights[b, p] * log_probs[labels[b, p]]
      correct += weights[b, p] * float(np.argmax(logits[b, p]) == labels[b, p])
      count += weights[b, p]
  return (total / count, correct / count) if count else (0.0, 0.0)


@pytest.mark.parametrize("batch", [3, 4])
def test_mlm_loss_matches_loop(batch):
  rng = _rng(batch)
  logits = _f32(rng.normal(size=(batch, L_, V_)) * 3)
  labels = rng.integers(0, V_, size=(batch, L_))
  weights = _mask(rng, batch)
  labels = np.where(weights > 0, labels, -100)  # ignored slots may hold any id
  loss, accuracy = losses.mlm_loss(logits, labels, weights)
  expected_loss, expected_accuracy = _np_weighted_ce(logits, labels, weights)
  _close(loss, expected_loss)
  _close(accuracy, expected_accuracy)
  zero_loss, zero_accuracy = losses.mlm_loss(logits, labels, np.zeros_like(weights))
  assert float(zero_loss) == 0.0 and float(zero_accuracy) == 0.0
  _assert_useful_gradient(lambda z: losses.mlm_loss(z, labels, weights)[0], logits)


def test_voken_classification_loss_matches_loop():
  rng = _rng(7)
  logits = _f32(rng.normal(size=(5, L_, 13)))
  vokens = rng.integers(0, 13, size=(5, L_))
  weights = _mask(rng, 5) * rng.uniform(0.5, 2.0, size=(5, L_))
  _close(
      losses.voken_classification_loss(logits, vokens, weights),
      _np_weighted_ce(logits, vokens, weights)[0],
  )


def test_bf16_inputs_accumulate_in_float32():
  rng = _rng(8)
  logits = rng.normal(size=(4, L_, V_)).astype(np.float32)
  labels = rng.integers(0, V_, size=(4, L_))
  weights = _mask(rng, 4)
  loss16, _ = losses.mlm_loss(jnp.asarray(logits, jnp.bfloat16), labels, weights)
  loss32, _ = losses.mlm_loss(logits, labels, weights)
  assert loss16.dtype == jnp.float32
  _close(loss16, float(loss32), rtol=2e-2)


# --------------------------------------------------------------------------- teacher contrastive


def _np_paired_hinge(lang, visn, mask, margin):
  """The reference: pad an odd batch with its last sample, split in halves, loop over pairs."""
  if lang.shape[0] % 2:
    lang, visn, mask = (np.concatenate([a, a[-1:]]) for a in (lang, visn, mask))
  half = lang.shape[0] // 2
  total = 0.0
  for i in range(half):
    for anchor, negative in ((i, i + half), (i + half, i)):
      for t in range(lang.shape[1]):
        if mask[anchor, t]:
          own = lang[anchor, t] @ visn[anchor]
          other = lang[anchor, t] @ visn[negative]
          total += max(0.0, margin - own + other)
  return total / mask.sum()


@pytest.mark.parametrize("batch", [1, 4, 5])
def test_paired_hinge_rank_loss_matches_loop(batch):
  rng = _rng(10 + batch)
  lang, visn = _states(rng, batch, L_, H_), _states(rng, batch, H_)
  mask = _mask(rng, batch)
  for margin in (1.0, 0.3):
    _close(
        losses.paired_hinge_rank_loss(lang, visn, mask, margin),
        _np_paired_hinge(lang, visn, mask, margin),
    )
  if batch == 1:  # its own negative: every real token contributes the margin exactly
    _close(losses.paired_hinge_rank_loss(lang, visn, mask, 0.7), 0.7)
  else:
    _assert_useful_gradient(lambda x: losses.paired_hinge_rank_loss(x, visn, mask), lang)


def _np_batchwise_hinge(lang, visn, mask, margin):
  batch, seq_len = mask.shape
  token_to_clip = clip_to_token = 0.0
  for i in range(batch):
    for j in range(batch):
      if i == j:
        continue
      for t in range(seq_len):
        negative = lang[i, t] @ visn[j]
        if mask[i, t]:
          token_to_clip += max(0.0, margin - lang[i, t] @ visn[i] + negative)
        if mask[i, t] and mask[j, t]:
          clip_to_token += max(0.0, margin - lang[j, t] @ visn[j] + negative)
  return (token_to_clip + clip_to_token) / max(batch * mask.sum(), 1.0)


@pytest.mark.parametrize("batch", [4, 5])
def test_batchwise_hinge_rank_loss_matches_loop(batch):
  rng = _rng(20 + batch)
  lang, visn = _states(rng, batch, L_, H_), _states(rng, batch, H_)
  mask = _mask(rng, batch)
  _close(
      losses.batchwise_hinge_rank_loss(lang, visn, mask, 0.5),
      _np_batchwise_hinge(lang, visn, mask, 0.5),
  )
  _assert_useful_gradient(lambda v: losses.batchwise_hinge_rank_loss(lang, v, mask), visn)


def _np_info_nce(lang, visn, mask, temperature):
  batch, seq_len = mask.shape
  token_terms, token_count = 0.0, 0.0
  sentence = np.zeros((batch, batch))
  for i in range(batch):
    for t in range(seq_len):
      if not mask[i, t]:
        continue
      scores = np.array([lang[i, t] @ visn[j] for j in range(batch)]) / temperature
      token_terms -= _np_log_softmax(scores)[i]
      token_count += 1
      sentence[i] += scores / mask[i].sum()
  clip_terms = [-_np_log_softmax(sentence[:, j])[j] for j in range(batch)]
  return 0.5 * (token_terms / token_count + np.mean(clip_terms))


@pytest.mark.parametrize("batch", [4, 5])
def test_info_nce_loss_matches_loop(batch):
  rng = _rng(30 + batch)
  lang, visn = _states(rng, batch, L_, H_), _states(rng, batch, H_)
  mask = _mask(rng, batch)
  _close(losses.info_nce_loss(lang, visn, mask, 0.1), _np_info_nce(lang, visn, mask, 0.1))
  _assert_useful_gradient(lambda x: losses.info_nce_loss(x, visn, mask, 0.1), lang)


# --------------------------------------------------------------------------- NST


def _np_poly_kernel_mean(a, c):
  """The reference's poly_kernel(...).mean(): the H x H kernel (a_i . c_j)^2, built directly."""
  return (((a[None, :, :] * c[:, None, :]).sum(-1)) ** 2).mean()


def _np_nst(student, teacher):
  """The released form: loop over sequences, S = normalise(x_bᵀ) over positions, H x H kernels."""
  total = 0.0
  for b in range(student.shape[0]):
    s = _np_normalize(student[b].T, axis=1)
    t = _np_normalize(teacher[b].T, axis=1)
    total += _np_poly_kernel_mean(s, s) - 2 * _np_poly_kernel_mean(s, t)
  return total / student.shape[1]


def _np_nst_mmd(student, teacher, mask):
  total = 0.0
  for b in range(student.shape[0]):
    s = _np_normalize((student[b] * mask[b][:, None]).T, axis=1)
    t = _np_normalize((teacher[b] * mask[b][:, None]).T, axis=1)
    total += (
        _np_poly_kernel_mean(s, s) - 2 * _np_poly_kernel_mean(s, t) + _np_poly_kernel_mean(t, t)
    )
  return total / student.shape[0]


@pytest.mark.parametrize("batch", [3, 4])
def test_nst_loss_matches_loop(batch):
  rng = _rng(40 + batch)
  student = _states(rng, batch, L_, H_, normalize=False)
  teacher = _states(rng, batch, L_, H_)
  _close(losses.released_nst_per_call(student, teacher), _np_nst(student, teacher))
  # The objective is the per-sequence mean: the released call's value x L / B.
  _close(losses.nst_loss(student, teacher), _np_nst(student, teacher) * L_ / batch)
  _assert_useful_gradient(lambda s: losses.nst_loss(s, teacher), student)


@pytest.mark.parametrize("batch", [3, 4])
def test_nst_mmd_loss_matches_loop_and_is_a_squared_distance(batch):
  rng = _rng(50 + batch)
  student = _states(rng, batch, L_, H_, normalize=False)
  teacher = _states(rng, batch, L_, H_)
  mask = _mask(rng, batch)
  value = losses.nst_mmd_loss(student, teacher, mask)
  _close(value, _np_nst_mmd(student, teacher, mask))
  assert float(value) > 0.0
  assert float(losses.nst_mmd_loss(student, student, mask)) == 0.0
  # Padding is ignored: changing padded states leaves the value unchanged.
  noisy = student + (1.0 - mask)[..., None] * rng.normal(size=student.shape)
  _close(losses.nst_mmd_loss(noisy, teacher, mask), float(value))
  for seed in range(5):
    s2 = _states(_rng(seed), batch, L_, H_)
    assert float(losses.nst_mmd_loss(s2, teacher, mask)) >= 0.0
  _assert_useful_gradient(lambda s: losses.nst_mmd_loss(s, teacher, mask), student)


# --------------------------------------------------------------------------- NT-Xent


def _np_released_contrastive_item(z_i, z_j, temperature):
  """The reference's contrastive_loss_item at one position (including its division by 2B)."""
  batch = z_i.shape[0]
  n = 2 * batch
  keep = np.ones((n, n), bool)
  np.fill_diagonal(keep, False)
  for i in range(batch):
    keep[i, batch + i] = keep[batch + i, i] = False
  z = np.concatenate([z_i, z_j])
  z = _np_normalize(z)
  sim = z @ z.T / temperature
  positives = np.concatenate([np.diag(sim, batch), np.diag(sim, -batch)])
  logits = np.concatenate([positives[:, None], sim[keep].reshape(n, -1)], axis=1)
  cross_entropy = np.mean([-_np_log_softmax(row)[0] for row in logits])
  return cross_entropy / n


def _np_masked_nt_xent(student, teacher, mask, temperature):
  batch, seq_len = mask.shape
  total, count = 0.0, 0
  for t in range(seq_len):
    z = _np_normalize(np.concatenate([student[:, t], teacher[:, t]]))
    valid = np.concatenate([mask[:, t], mask[:, t]]) > 0
    for a in range(2 * batch):
      if not valid[a]:
        continue
      others = [c for c in range(2 * batch) if c != a and valid[c]]
      scores = np.array([z[a] @ z[c] for c in others]) / temperature
      partner = (a + batch) % (2 * batch)
      total += -_np_log_softmax(scores)[others.index(partner)]
      count += 1
  return total / count


@pytest.mark.parametrize("batch", [3, 4])
def test_nt_xent_loss_matches_released_loop(batch):
  rng = _rng(60 + batch)
  student = _states(rng, batch, L_, H_, normalize=False)
  teacher = _states(rng, batch, L_, H_)
  for temperature in (1.0, 0.5):
    released = np.mean(
        [
            _np_released_contrastive_item(student[:, t], teacher[:, t], temperature)
            for t in range(L_)
        ]
    )
    # The released value carries an extra 1/(2B), a loss weight outside this function.
    _close(losses.nt_xent_loss(student, teacher, temperature) / (2 * batch), released)
  mask = _mask(rng, batch)
  _close(
      losses.nt_xent_loss(student, teacher, 0.5, mask),
      _np_masked_nt_xent(student, teacher, mask, 0.5),
  )
  _assert_useful_gradient(lambda s: losses.nt_xent_loss(s, teacher, 0.5, mask), student)


# --------------------------------------------------------------------------- CRD


def _np_crd(student, teacher, ids, memory, temperature):
  """The reference's ContrastMemory + ContrastLoss, with the normalisers in their own slots."""
  num_examples = memory.student_memory.shape[0]
  num_negatives = ids.shape[1] - 1
  teacher_rows = _f32(memory.teacher_memory)[ids]
  student_rows = _f32(memory.student_memory)[ids]
  total = 0.0
  for anchor, rows in ((student, teacher_rows), (teacher, student_rows)):
    out = np.exp(np.einsum("bkd,bd->bk", rows, anchor) / temperature)
    out = out / (out.mean() * num_examples)
    noise = num_negatives / num_examples
    log_positive = np.log(out[:, 0] / (out[:, 0] + noise))
    log_negative = np.log(noise / (out[:, 1:] + noise))
    total += -(log_positive.sum() + log_negative.sum()) / anchor.shape[0]
  return total


def _crd_inputs(seed, batch=4, num_examples=16, dim=H_):
  rng = _rng(seed)
  student, teacher = _states(rng, batch, dim), _states(rng, batch, dim)
  ids = rng.choice(num_examples, size=batch, replace=False)
  memory = losses.init_crd_memory(jax.random.PRNGKey(seed), num_examples, dim)
  return student, teacher, ids, memory


def test_crd_loss_matches_reference_and_updates_memory():
  student, teacher, ids, memory = _crd_inputs(70)
  key, num_negatives, momentum = jax.random.PRNGKey(1), 5, 0.5
  np.testing.assert_allclose(np.linalg.norm(memory.student_memory, axis=1), 1.0, rtol=1e-6)
  loss, new = losses.crd_loss(
      student, teacher, ids, memory, key, num_negatives=num_negatives, momentum=momentum
  )
  negatives = np.asarray(jax.random.randint(key, (len(ids), num_negatives), 0, 16))
  all_ids = np.concatenate([ids[:, None], negatives], axis=1)
  _close(loss, _np_crd(student, teacher, all_ids, memory, 0.07), rtol=1e-5, atol=1e-5)
  assert np.isfinite(float(loss))

  for old, new_rows, emb in (
      (memory.student_memory, new.student_memory, student),
      (memory.teacher_memory, new.teacher_memory, teacher),
  ):
    old, new_rows = _f32(old), _f32(new_rows)
    expected = _np_normalize(momentum * old[ids] + (1 - momentum) * emb)
    _close(new_rows[ids], expected, atol=1e-6)
    untouched = np.setdiff1d(np.arange(16), ids)
    np.testing.assert_array_equal(new_rows[untouched], old[untouched])

  # Normalisers: each estimated on the first batch, in its own slot, then fixed.
  z_student, z_teacher = float(new.z_student), float(new.z_teacher)
  assert z_student > 0 and z_teacher > 0 and z_student != z_teacher
  scores = np.exp(np.einsum("bkd,bd->bk", _f32(memory.teacher_memory)[all_ids], student) / 0.07)
  _close(z_student, scores.mean() * 16, rtol=1e-5)
  student2, teacher2, ids2, _ = _crd_inputs(71)
  _, newer = losses.crd_loss(
      student2,
      teacher2,
      ids2,
      new,
      jax.random.PRNGKey(2),
      num_negatives=num_negatives,
      momentum=momentum,
  )
  assert float(newer.z_student) == z_student and float(newer.z_teacher) == z_teacher


def test_crd_loss_gradients_flow_only_into_embeddings():
  student, teacher, ids, memory = _crd_inputs(72)

  def total(s, t, mem):
    return losses.crd_loss(s, t, ids, mem, jax.random.PRNGKey(3), num_negatives=6)[0]

  grad_s, grad_t, grad_mem = jax.grad(total, argnums=(0, 1, 2))(
      jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32), memory
  )
  for grad in (grad_s, grad_t):
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
  for leaf in jax.tree.leaves(grad_mem):
    assert not np.any(leaf)

  def updated_memory(s):
    new = losses.crd_loss(s, teacher, ids, memory, jax.random.PRNGKey(3), num_negatives=6)[1]
    return jnp.sum(new.student_memory * new.student_memory[::-1])

  assert not np.any(jax.grad(updated_memory)(jnp.asarray(student, jnp.float32)))


def test_crd_memory_survives_orbax_round_trip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  student, teacher, ids, memory = _crd_inputs(73)
  _, memory = losses.crd_loss(student, teacher, ids, memory, jax.random.PRNGKey(4), num_negatives=3)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "crd", memory)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(
      tmp_path / "crd", jax.tree.map(ocp.utils.to_shape_dtype_struct, memory)
  )
  assert isinstance(restored, losses.CRDMemory)
  for original, loaded in zip(memory, restored):
    np.testing.assert_array_equal(np.asarray(original), np.asarray(loaded))


# --------------------------------------------------------------------------- logits and hidden


def test_soft_label_kd_loss_matches_loop():
  rng = _rng(80)
  student, teacher = _f32(rng.normal(size=(3, L_, V_))), _f32(rng.normal(size=(3, L_, V_)) * 2)
  weights = _mask(rng, 3)
  temperature = 2.0
  total = 0.0
  for b in range(3):
    for t in range(L_):
      log_p = _np_log_softmax(teacher[b, t] / temperature)
      log_q = _np_log_softmax(student[b, t] / temperature)
      total += weights[b, t] * np.sum(np.exp(log_p) * (log_p - log_q))
  _close(
      losses.soft_label_kd_loss(student, teacher, temperature, weights),
      temperature**2 * total / weights.sum(),
  )
  _close(losses.soft_label_kd_loss(teacher, teacher, temperature, weights), 0.0, atol=1e-6)
  _assert_useful_gradient(lambda s: losses.soft_label_kd_loss(s, teacher, 2.0, weights), student)


def test_hidden_mse_and_cosine_losses_match_loops():
  rng = _rng(81)
  student = _states(rng, 3, L_, H_, normalize=False)
  teacher = _states(rng, 3, L_, H_, normalize=False)
  mask = _mask(rng, 3)
  squared, cosine, count = 0.0, 0.0, 0.0
  for b in range(3):
    for t in range(L_):
      if mask[b, t]:
        squared += np.sum((student[b, t] - teacher[b, t]) ** 2)
        cosine += 1 - (
            student[b, t]
            @ teacher[b, t]
            / np.linalg.norm(student[b, t])
            / np.linalg.norm(teacher[b, t])
        )
        count += 1
  _close(losses.hidden_mse_loss(student, teacher, mask), squared / count)
  _close(losses.hidden_cosine_loss(student, teacher, mask), cosine / count)
  _assert_useful_gradient(lambda s: losses.hidden_mse_loss(s, teacher, mask), student)
  _assert_useful_gradient(lambda s: losses.hidden_cosine_loss(s, teacher, mask), student)


# --------------------------------------------------------------------------- sharding


def _batch_cases(rng, batch):
  """(name, function, args) for every batched loss; every arg has the batch as axis 0."""
  lang, visn, mask = _states(rng, batch, L_, H_), _states(rng, batch, H_), _mask(rng, batch)
  student = _states(rng, batch, L_, H_, normalize=False)
  logits, labels = _f32(rng.normal(size=(batch, L_, V_))), rng.integers(0, V_, (batch, L_))
  return [
      ("mlm", lambda z, y, w: losses.mlm_loss(z, y, w)[0], (logits, labels, mask)),
      ("voken", losses.voken_classification_loss, (logits, labels, mask)),
      ("paired_hinge", losses.paired_hinge_rank_loss, (lang, visn, mask)),
      ("batchwise_hinge", losses.batchwise_hinge_rank_loss, (lang, visn, mask)),
      ("info_nce", lambda x, v, m: losses.info_nce_loss(x, v, m, 0.1), (lang, visn, mask)),
      ("nst", losses.nst_loss, (student, lang)),
      ("nst_mmd", losses.nst_mmd_loss, (student, lang, mask)),
      ("nt_xent", lambda s, t, m: losses.nt_xent_loss(s, t, 0.5, m), (student, lang, mask)),
      (
          "soft_kd",
          lambda s, t, w: losses.soft_label_kd_loss(s, t, 2.0, w),
          (logits, logits[::-1], mask),
      ),
      ("mse", losses.hidden_mse_loss, (student, lang, mask)),
      ("cosine", losses.hidden_cosine_loss, (student, lang, mask)),
  ]


def _data_mesh():
  devices = jax.devices()
  if len(devices) < 2:
    pytest.skip("needs several devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  return Mesh(np.array(devices), ("data",))


def test_losses_are_invariant_to_batch_sharding():
  mesh = _data_mesh()
  batch = 2 * mesh.size
  sharded = NamedSharding(mesh, PartitionSpec("data"))
  for name, fn, args in _batch_cases(_rng(90), batch):
    args = [jnp.asarray(a, jnp.float32 if a.dtype.kind == "f" else jnp.int32) for a in args]
    single = float(jax.jit(fn)(*args))
    on_mesh = jax.jit(fn, in_shardings=tuple(sharded for _ in args))(
        *(jax.device_put(a, sharded) for a in args)
    )
    np.testing.assert_allclose(float(on_mesh), single, rtol=1e-5, atol=1e-5, err_msg=name)


def test_crd_is_invariant_to_sharding():
  mesh = _data_mesh()
  batch, num_examples = mesh.size, 4 * mesh.size
  student, teacher, ids, memory = _crd_inputs(91, batch=batch, num_examples=num_examples)
  data = NamedSharding(mesh, PartitionSpec("data"))
  replicated = NamedSharding(mesh, PartitionSpec())
  memory_sharding = losses.CRDMemory(data, data, replicated, replicated)
  key = jax.random.PRNGKey(5)

  def step(s, t, i, mem, k):
    return losses.crd_loss(s, t, i, mem, k, num_negatives=7)

  args = (
      jnp.asarray(student, jnp.float32),
      jnp.asarray(teacher, jnp.float32),
      jnp.asarray(ids, jnp.int32),
      memory,
      key,
  )
  single_loss, single_memory = jax.jit(step)(*args)
  shardings = (data, data, data, memory_sharding, replicated)
  loss, new_memory = jax.jit(step, in_shardings=shardings)(*jax.device_put(args, shardings))
  np.testing.assert_allclose(float(loss), float(single_loss), rtol=1e-5, atol=1e-5)
  for got, want in zip(new_memory, single_memory):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
