"""Distillation: pure helpers, the jitted step, the loop end to end, and the science check.

The end-to-end runs distil tiny students on real English text (gensim's Lee news corpus,
tokenized with the bert-base-uncased vocabulary into the student's TFRecords) from the session's
trained tiny teacher (`tests/support/tiny_teachers.py`, trained on a generated video-text corpus).
"""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vidlankd_jax import configlib
from vidlankd_jax import checkpoint as ckpt_lib
from vidlankd_jax import errors
from vidlankd_jax import losses
from vidlankd_jax import objectives
from vidlankd_jax import sharding
from vidlankd_jax.data import shards as shards_lib
from vidlankd_jax.models.teacher import Teacher
from vidlankd_jax.evaluation import representation
from vidlankd_jax.objectives import parse_objectives
from vidlankd_jax.train import loop
from vidlankd_jax.train import distill

SCIENCE_STEPS = 60

# ---------------------------------------------------------------------------------------------
# Pure helpers.


def test_parse_objectives():
  assert parse_objectives("nst") == ("nst",)
  assert parse_objectives("nst+crd") == ("nst", "crd")
  assert parse_objectives("none") == ()
  for bad in ("nst+nst", "crd+none", "", "nts"):
    with pytest.raises(ValueError, match="config.kd.objectives"):
      parse_objectives(bad)


@pytest.mark.parametrize("missing", ["weights.crd", "crd.momentum", "ntxent_group_size"])
def test_an_older_config_without_a_key_fails_naming_it(missing):
  """A run's config.json from before a weight or setting existed: one line naming the key."""
  import ml_collections

  tree = configlib.load("distill", "size=tiny,objectives=nst+ntxent+crd").to_dict()
  *parents, leaf = missing.split(".")
  node = tree["kd"]
  for part in parents:
    node = node[part]
  del node[leaf]
  with pytest.raises(errors.ConfigError, match=rf"\(config\.kd\.{missing}\)"):
    objectives.check(ml_collections.ConfigDict(tree))


def test_memory_rows_are_example_ids_or_hashes_of_the_text_not_the_masking():
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 30000, (6, 32)).astype(np.int32)
  ids[1] = ids[0]
  ids[2] = ids[0]
  ids[2, 5] += 1  # one token differs
  masked = ids.copy()
  masked[:, 3] = 103
  batch = {"unmasked_ids": ids, "input_ids": masked, "example_id": np.arange(6) + 10}
  np.testing.assert_array_equal(np.asarray(objectives.memory_rows(batch, 16)), np.arange(6) + 10)
  rows = np.asarray(objectives.memory_rows(batch, 1 << 20, hash_rows=True))
  assert rows.min() >= 0 and rows.max() < (1 << 20)
  assert rows[0] == rows[1] and len(set(rows.tolist()) - {rows[0]}) == 4
  remasked = {**batch, "input_ids": ids}
  np.testing.assert_array_equal(
      rows, np.asarray(objectives.memory_rows(remasked, 1 << 20, hash_rows=True))
  )
  with pytest.raises(ValueError, match="lacks: write the text with tools/make_text_tfrecords"):
    objectives.memory_rows({"unmasked_ids": ids}, 16)


def test_expected_row_sharing_matches_a_simulated_memory():
  """The closed forms the hash fallback prints, against hashing 20,000 examples into 16,384
  rows and replaying two epochs of shuffled batches of 64 (reads before each batch's writes)."""
  n, m = 20_000, 1 << 14
  rng = np.random.default_rng(5)
  rows = rng.integers(0, m, n)
  last_writer = np.full(m, -1)
  wrong = {0: 0, 1: 0}
  for epoch in (0, 1):
    order = rng.permutation(n)
    for start in range(0, n, 64):
      chosen = order[start : start + 64]
      writer = last_writer[rows[chosen]]
      wrong[epoch] += int(np.sum((writer != chosen) & (writer >= 0)))
      last_writer[rows[chosen]] = chosen
  expected = distill.expected_row_sharing(n, m)
  assert expected["shared"] == pytest.approx(np.mean(np.bincount(rows)[rows] > 1), abs=0.01)
  assert expected["first_epoch"] == pytest.approx(wrong[0] / n, abs=0.01)
  assert expected["later_epochs"] == pytest.approx(wrong[1] / n, abs=0.01)
  # A WikiText-103-sized corpus in 2^20 rows: most examples share a row.
  wiki103 = distill.expected_row_sharing(960_000, 1 << 20)
  assert wiki103["shared"] == pytest.approx(0.60, abs=0.005)
  assert wiki103["later_epochs"] == pytest.approx(0.486, abs=0.005)


def write_text_summary(data_dir, blocks, example_ids="dense"):
  path = shards_lib.text_summary_path(str(data_dir), "wiki103_mlm")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump({"blocks": blocks, "settings": {"example_ids": example_ids}}, f)


def test_crd_memory_is_sized_from_the_corpus(tmp_path, capsys):
  config = configlib.load("distill", "size=tiny,objectives=crd")
  config.data.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match="memory_size is 0 .*wiki103-train-summary.json is missing"):
    distill.crd_memory_size(config, 4)
  write_text_summary(tmp_path, 1001)
  assert distill.crd_memory_size(config, 4) == 1004  # one row per example, 4 shards
  config.kd.crd.memory_size = 1000
  with pytest.raises(ValueError, match="memory_size 1000 is smaller than the 1001 examples"):
    distill.crd_memory_size(config, 4)
  config.kd.crd.memory_size = 1 << 10
  assert distill.crd_memory_size(config, 4) == 1 << 10
  config.kd.crd.hash_rows = True
  config.kd.crd.memory_size = 512
  assert distill.crd_memory_size(config, 4) == 512
  assert "1001 examples in 512 rows: 85.8% of examples share a row" in capsys.readouterr().out
  config.kd.crd.hash_rows = False
  write_text_summary(tmp_path, 1001, example_ids=None)
  with pytest.raises(ValueError, match="carry no example_id"):
    distill.crd_memory_size(config, 4)


def test_voken_labels_are_the_nearest_bank_vector():
  rng = np.random.default_rng(1)
  bank = np.asarray(losses.l2_normalize(rng.standard_normal((5, 8))))
  states = np.asarray(losses.l2_normalize(rng.standard_normal((2, 3, 8))))
  expected = np.argmax(states @ bank.T, axis=-1)
  np.testing.assert_array_equal(np.asarray(objectives.voken_labels(states, bank)), expected)
  np.testing.assert_array_equal(
      np.asarray(objectives.voken_labels(bank[None], bank))[0], np.arange(5)
  )


def test_voken_term_classifies_content_tokens_by_their_unmasked_labels():
  """Voken labels come from the teacher's states on the unmasked text (`voken_targets`, not
  the masked-input targets), and [CLS], [SEP] and padding are not classified."""
  config = configlib.load("distill", "size=tiny,objectives=voken")
  config.kd.voken.data_dir = "clips"
  rng = np.random.default_rng(6)
  unit = lambda *shape: np.asarray(losses.l2_normalize(rng.standard_normal(shape)), np.float32)
  bank, masked_states, unmasked_states = unit(5, 16), unit(2, 6, 16), unit(2, 6, 16)
  scores = rng.standard_normal((2, 6, 5)).astype(np.float32)
  mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], np.int32)
  content = np.array([[0, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]], np.float32)
  np.testing.assert_array_equal(np.asarray(objectives.content_token_mask(mask)), content)
  terms, metrics, _ = distill.objective_terms(
      distill.KDSpec.from_config(config),
      {"voken": scores},
      masked_states,
      {"attention_mask": mask},
      {"voken_bank": bank},
      None,
      voken_targets=unmasked_states,
  )
  labels = np.argmax(unmasked_states @ bank.T, axis=-1)
  assert float(terms["voken"]) == pytest.approx(
      float(losses.voken_classification_loss(scores, labels, content)), rel=1e-6
  )
  assert float(metrics["voken_accuracy"]) == pytest.approx(
      float(losses.weighted_accuracy(scores, labels, content))
  )


def test_teacher_targets_read_the_unmasked_text_for_voken_labels():
  config = step_config("nst+voken")
  config.kd.voken.data_dir = "clips"
  mesh = sharding.single_device_mesh()
  teacher = sharding.create_sharded(
      lambda: Teacher.from_config(config.teacher, rngs=nnx.Rngs(7)), mesh, config.sharding_rules
  )
  batch = random_batch(config, batch=2)
  masked = distill.teacher_states(teacher.language, batch["input_ids"], batch)[1]
  unmasked = distill.teacher_states(teacher.language, batch["unmasked_ids"], batch)[1]
  assert np.abs(np.asarray(masked) - np.asarray(unmasked)).max() > 1e-3
  for names, expected_targets in (("nst+voken", masked), ("voken", unmasked)):
    config.kd.objectives = names
    _, targets, voken_targets = distill.teacher_targets(
        teacher.language, batch, distill.KDSpec.from_config(config)
    )
    np.testing.assert_allclose(np.asarray(targets), np.asarray(expected_targets), atol=1e-6)
    np.testing.assert_allclose(np.asarray(voken_targets), np.asarray(unmasked), atol=1e-6)


def test_linear_cka():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((4, 50, 6)).astype(np.float32)
  mask = np.ones((4, 50), np.float32)
  rotation, _ = np.linalg.qr(rng.standard_normal((6, 6)))
  wider = np.concatenate([3.0 * x @ rotation, np.zeros((4, 50, 2), np.float32)], -1)
  cka = lambda a, b, m: representation.linear_cka(representation.cka_moments(a, b, m))
  assert cka(x, x, mask) == pytest.approx(1.0, abs=1e-5)
  assert cka(x, wider, mask) == pytest.approx(1.0, abs=1e-4)  # rotation, scale, other width
  assert cka(x, rng.standard_normal((4, 50, 6)).astype(np.float32), mask) < 0.2
  # Summing the moments over batches equals one pass; masked tokens count for nothing.
  halves = [
      representation.cka_moments(x[i : i + 2], wider[i : i + 2], mask[i : i + 2]) for i in (0, 2)
  ]
  summed = {k: np.asarray(halves[0][k], np.float64) + np.asarray(halves[1][k]) for k in halves[0]}
  assert representation.linear_cka(summed) == pytest.approx(cka(x, wider, mask), abs=1e-6)
  noisy = x.copy()
  noisy[:, 40:] = 100 * rng.standard_normal((4, 10, 6))
  mask[:, 40:] = 0
  assert cka(x, noisy, mask) == pytest.approx(1.0, abs=1e-5)


def test_spherical_kmeans_finds_the_clusters():
  rng = np.random.default_rng(3)
  centres = np.eye(4, 16)
  points = np.repeat(centres, 30, axis=0) + 0.05 * rng.standard_normal((120, 16))
  points /= np.linalg.norm(points, axis=1, keepdims=True)
  found = representation.spherical_kmeans(points, 4, iters=10, seed=0)
  np.testing.assert_allclose(np.linalg.norm(found, axis=1), 1.0, atol=1e-6)
  assert np.sort(np.max(found @ centres.T, axis=0)).min() > 0.99  # every centre is found
  with pytest.raises(ValueError, match="num_vokens=200 exceeds the 120 clips"):
    representation.spherical_kmeans(points, 200, iters=1, seed=0)


def test_total_loss_weights_each_term():
  config = configlib.load("distill", "size=tiny,objectives=nst+crd")
  config.kd.weights.crd = 0.25
  config.kd.mlm_weight = 2.0
  terms = {"mlm": jnp.float32(3.0), "nst": jnp.float32(-0.5), "crd": jnp.float32(4.0)}
  assert float(distill.total_loss(terms, distill.KDSpec.from_config(config))) == pytest.approx(
      6.0 - 0.5 * 1.0 + 1.0  # the tiny size's NST weight: the released 32 / L at L = 32
  )


def test_objective_terms_dispatch_to_the_losses():
  config = configlib.load("distill", "size=tiny,objectives=nst+ntxent+mse+cos+kd")
  config.kd.ntxent_group_size = 2
  rng = np.random.default_rng(4)
  unit = lambda *shape: np.asarray(
      losses.l2_normalize(rng.standard_normal(shape).astype(np.float32))
  )
  heads = {name: unit(4, 8, 16) for name in ("nst", "ntxent", "mse", "cos")}
  targets = unit(4, 8, 16)
  mask = np.ones((4, 8), np.int32)
  mask[1, 5:] = 0
  batch = {"attention_mask": mask, "mlm_weights": np.ones((4, 3), np.float32)}
  student_logits, teacher_logits = rng.standard_normal((2, 4, 3, 11)).astype(np.float32)
  terms, _, updates = distill.objective_terms(
      distill.KDSpec.from_config(config),
      heads,
      targets,
      batch,
      None,
      None,
      mlm_logits=student_logits,
      teacher_logits=teacher_logits,
  )
  halves = [
      losses.nt_xent_loss(heads["ntxent"][i : i + 2], targets[i : i + 2], 1.0, mask[i : i + 2])
      for i in (0, 2)
  ]
  expected = {
      "nst": losses.released_nst_per_call(heads["nst"], targets) * 8 / 4,  # x L / B
      "ntxent": (halves[0] + halves[1]) / 2,  # groups of 2 sequences
      "mse": losses.hidden_mse_loss(heads["mse"], targets, mask),
      "cos": losses.hidden_cosine_loss(heads["cos"], targets, mask),
      "kd": losses.soft_label_kd_loss(student_logits, teacher_logits, 1.0, batch["mlm_weights"]),
  }
  assert set(terms) == set(expected) and updates == {}
  for name, value in expected.items():
    assert float(terms[name]) == pytest.approx(float(value), rel=1e-6), name
  config.kd.nst_variant = "mmd"
  config.kd.ntxent_group_size = 0  # the whole batch
  terms, _, _ = distill.objective_terms(
      distill.KDSpec.from_config(config),
      heads,
      targets,
      batch,
      None,
      None,
      mlm_logits=student_logits,
      teacher_logits=teacher_logits,
  )
  assert float(terms["nst"]) == pytest.approx(
      float(losses.nst_mmd_loss(heads["nst"], targets, mask))
  )
  assert float(terms["ntxent"]) == pytest.approx(
      float(losses.nt_xent_loss(heads["ntxent"], targets, 1.0, mask)), rel=1e-6
  )


def test_benchmark_flop_count_matches_the_model():
  """The benchmark's encoder FLOP term counts exactly the kernels a token passes through."""
  import importlib.util

  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench", "distill_step.py")
  spec = importlib.util.spec_from_file_location("distill_step", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  config = configlib.load("distill", "size=tiny,teacher_size=mini,objectives=none")
  from vidlankd_jax.models.bert import BertConfig, TransformerStack

  stack = sharding.create_sharded(
      lambda: TransformerStack(BertConfig.from_config(config.teacher.model), rngs=nnx.Rngs(0)),
      sharding.single_device_mesh(),
      config.sharding_rules,
  )
  kernels = sum(
      x.size for path, x in nnx.state(stack, nnx.Param).flat_state() if path[-1] == "kernel"
  )
  b, l = config.train.batch_size, config.data.seq_len
  m = config.teacher.model
  flops = bench.step_flops(config)
  assert flops["teacher_forward"] == 0  # the text-only baseline runs no teacher
  config.kd.objectives = "nst"
  flops = bench.step_flops(config)
  attention = 4 * m.num_layers * l * m.hidden_size
  assert flops["teacher_forward"] == 2 * b * l * kernels + b * l * attention
  assert flops["step"] == flops["student_train"] + flops["teacher_forward"]


# ---------------------------------------------------------------------------------------------
# The jitted step (no data files): a fresh teacher, random batches.


def step_config(objectives="nst+crd"):
  config = configlib.load("distill", f"size=tiny,objectives={objectives}")
  config.model.vocab_size = config.teacher.model.vocab_size = 128
  config.teacher.video.input_dim = 32
  config.kd.crd.memory_size = 64
  config.kd.crd.num_negatives = 16
  config.optimizer.warmup_steps = 0
  return config


def random_batch(config, batch=8, seed=0):
  rng = np.random.default_rng(seed)
  l, p = config.data.seq_len, config.data.max_predictions
  ids = rng.integers(5, config.model.vocab_size, (batch, l)).astype(np.int32)
  mask = np.ones((batch, l), np.int32)
  mask[:, -4:] = 0
  positions = rng.integers(1, l - 4, (batch, p)).astype(np.int32)
  masked = ids.copy()
  np.put_along_axis(masked, positions, 4, axis=1)
  return {
      "input_ids": masked * mask,
      "unmasked_ids": ids * mask,
      "attention_mask": mask,
      "token_type_ids": np.zeros_like(ids),
      "mlm_positions": positions,
      "mlm_targets": np.take_along_axis(ids, positions, axis=1),
      "mlm_weights": np.ones((batch, p), np.float32),
      "example_id": np.arange(batch, dtype=np.int32) + batch * seed,
  }


def fresh_setup(config, mesh):
  """A fresh run's pieces, from a fresh teacher."""
  teacher = sharding.create_sharded(
      lambda: Teacher.from_config(config.teacher, rngs=nnx.Rngs(7)), mesh, config.sharding_rules
  )
  return distill.pieces(config, mesh, teacher=teacher)


def jitted_step(parts, config, mesh):
  """The loop's train step of `parts`, with the settings of `config`."""
  return loop.jit_train_step(distill.setup_of(config, parts).train_step, parts.state, mesh)


def compiled_step(config, mesh):
  """A fresh run's state (from a fresh teacher) and its jitted train step."""
  setup = fresh_setup(config, mesh)
  return setup.state, jitted_step(setup, config, mesh)


def run_steps(config, mesh, num_steps=2, batches=None):
  """Train steps on random batches (or on `batches`): (state before, state after, the metrics of
  every step)."""
  state, step = compiled_step(config, mesh)
  before = jax.tree.map(
      np.asarray, {"params": state.params, "frozen": state.frozen, "extra": state.extra}
  )
  metrics = []
  for batch in batches or [random_batch(config, seed=i) for i in range(num_steps)]:
    state, step_metrics = step(state, sharding.global_batch(batch, mesh))
    metrics.append(jax.device_get(step_metrics))
  return before, state, metrics


@pytest.fixture(scope="module")
def single_device_steps():
  before, state, metrics = run_steps(step_config(), sharding.single_device_mesh())
  return before, state, metrics[-1]


def test_step_trains_the_student_advances_the_memory_and_keeps_the_teacher(single_device_steps):
  before, state, metrics = single_device_steps
  assert metrics["finite"] and np.isfinite(metrics["loss"])
  assert metrics["loss"] == pytest.approx(
      metrics["mlm_loss"] + metrics["nst_loss"] + metrics["crd_loss"], rel=1e-5
  )
  for a, b in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(before["frozen"])):
    np.testing.assert_array_equal(np.asarray(a), b)
  for name in ("language", "kd_heads"):
    change = max(
        float(np.abs(np.asarray(a) - b).max())
        for a, b in zip(
            jax.tree.leaves(state.params[name]), jax.tree.leaves(before["params"][name])
        )
    )
    assert change > 0, name
  memory, fresh = state.extra["crd"], before["extra"]["crd"]
  assert float(memory.z_student) > 0 and float(fresh.z_student) < 0  # set on the first batch
  moved = np.any(np.asarray(memory.teacher_memory) != fresh.teacher_memory, axis=1)
  assert 8 <= moved.sum() <= 16  # the rows of the two batches' examples, no others


def test_evaluation_reads_no_training_memory_row_for_held_out_examples(single_device_steps):
  """Held-out example_ids 0..N-1 are not rows of the training memory: the evaluation must not
  depend on what that memory holds (permuting its rows changes nothing) nor report a CRD loss."""
  _, state, _ = single_device_steps
  config = step_config()
  mesh = sharding.single_device_mesh()
  parts = fresh_setup(config, mesh)
  eval_step = loop.jit_eval_step(distill.setup_of(config, parts).eval_step, parts.state, mesh)
  batch = {**random_batch(config, seed=5), "valid": np.ones(8, np.int32)}
  batch["example_id"] = np.arange(8, dtype=np.int32)  # the first held-out examples
  sums, _ = jax.device_get(eval_step(state, batch))
  memory = state.extra["crd"]
  permuted = memory._replace(
      student_memory=memory.student_memory[::-1], teacher_memory=memory.teacher_memory[::-1]
  )
  other, _ = jax.device_get(eval_step(state.replace(extra={**state.extra, "crd": permuted}), batch))
  assert "crd_loss" not in sums and "nst_loss" in sums
  for key in sums:
    np.testing.assert_allclose(other[key], sums[key], rtol=1e-6, err_msg=key)


def test_sharded_step_with_a_sharded_memory_equals_single_device(single_device_steps):
  _, ref, ref_metrics = single_device_steps
  config = step_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 4, 2, 1
  mesh = sharding.make_mesh(config.mesh)
  _, out, metrics = run_steps(config, mesh)
  metrics = metrics[-1]
  assert out.extra["crd"].student_memory.sharding.spec == jax.sharding.PartitionSpec(
      ("data", "fsdp"), None
  )
  assert metrics["loss"] == pytest.approx(ref_metrics["loss"], rel=1e-5)
  for a, b in zip(
      jax.tree.leaves((ref.params, ref.extra)), jax.tree.leaves((out.params, out.extra))
  ):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-5)


def test_logged_kd_losses_are_per_example_whatever_the_batch_and_accumulation():
  """The logged (unweighted) KD terms of one step are per-example means: the same at global
  batch 8 and 16 and with grad_accum_steps 1 and 2. Batch 16 is two batches of 8 and dropout
  is off, so NST and MSE agree exactly; NT-Xent's groups of 4 are regrouped by the strided
  micro-batches, so it agrees within sampling noise."""
  objectives = ("nst", "ntxent", "mse")
  a, b = (random_batch(step_config(), batch=8, seed=s) for s in (10, 11))
  both = {k: np.concatenate([a[k], b[k]]) for k in a}

  config = step_config("+".join(objectives))
  config.model.hidden_dropout = config.model.attention_dropout = 0.0
  config.optimizer.learning_rate = 0.0  # every step sees the initial parameters
  config.kd.ntxent_group_size = 4
  mesh = sharding.single_device_mesh()
  setup = fresh_setup(config, mesh)
  state = setup.state
  accumulating = config.copy_and_resolve_references()
  accumulating.optimizer.grad_accum_steps = 2
  steps = {1: jitted_step(setup, config, mesh), 2: jitted_step(setup, accumulating, mesh)}

  def logged(batch, accum):
    nonlocal state
    state, metrics = steps[accum](state, sharding.global_batch(batch, mesh))
    return {name: float(metrics[f"{name}_loss"]) for name in objectives}

  small = [logged(a, 1), logged(b, 1)]  # global batch 8
  mean_of_small = {k: (small[0][k] + small[1][k]) / 2 for k in objectives}
  for label, accum in (("batch 16", 1), ("batch 16, accumulation 2", 2)):
    values = logged(both, accum)
    for name in ("nst", "mse"):
      assert values[name] == pytest.approx(mean_of_small[name], rel=1e-4), (label, name)
    assert values["ntxent"] == pytest.approx(mean_of_small["ntxent"], rel=0.02), label


def test_text_only_baseline_needs_no_teacher():
  config = step_config("none")
  setup = distill.pieces(config, sharding.single_device_mesh())
  assert setup.state.frozen is None and setup.state.extra is None
  assert setup.models.teacher_def is None


def test_config_errors_name_the_key():
  config = step_config("nst")
  config.teacher.model.vocab_size = 256
  with pytest.raises(ValueError, match="config.teacher.model.vocab_size 256"):
    distill.KDSpec.from_config(config)
  config = step_config("voken")
  with pytest.raises(ValueError, match="config.kd.voken.data_dir is empty"):
    distill.KDSpec.from_config(config)
  config = step_config("nst+crd")
  config.optimizer.grad_accum_steps = 2
  with pytest.raises(ValueError, match="grad_accum_steps must be 1 with the crd"):
    distill.KDSpec.from_config(config)
  config = step_config("nst")
  with pytest.raises(ValueError, match="config.teacher.workdir is empty"):
    distill.init(config, sharding.single_device_mesh())


# ---------------------------------------------------------------------------------------------
# The loop end to end, on files.


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_teachers):
  """Student TFRecords (train/validation) of real English text, and the session's trained tiny
  teacher (the true-pairs one of `tests/support/tiny_teachers.py`) with its video-text corpus."""
  import gensim.test.utils as gensim_data
  from vidlankd_jax.data import text as text_lib
  from vidlankd_jax.data import vocab as vocab_lib

  root = tmp_path_factory.mktemp("distill")
  with open(gensim_data.datapath("lee_background.cor"), encoding="utf-8") as f:
    lines = [line for line in f if line.strip()]
  cut = int(0.85 * len(lines))
  vocab = vocab_lib.WordPieceVocabulary(vocab_lib.default_vocab_file())
  for split, part in (("train", lines[:cut]), ("validation", lines[cut:])):
    raw = root / f"{split}.txt"
    raw.write_text("".join(part), encoding="utf-8")
    text_lib.convert_text(
        [str(raw)],
        str(root / "text" / "wiki103"),
        vocab,
        prefix="wiki103",
        split=split,
        num_shards=1,
        fmt="lines",
        log=lambda *_: None,
    )
  teacher = tiny_teachers["true"]
  return {
      "root": root,
      "teacher": teacher["workdir"],
      "video": teacher["data_dir"],
      "teacher_step": int(teacher["eval"]["step"]),
      "teacher_params": ckpt_lib.restore_params_numpy(
          os.path.join(teacher["workdir"], "checkpoints")
      ),
  }


def loop_config(corpus, objectives, steps, seed=0):
  config = configlib.load("distill", f"size=tiny,objectives={objectives}")
  config.seed = seed
  config.data.data_dir = str(corpus["root"] / "text")
  config.teacher.workdir = corpus["teacher"]
  config.kd.voken.data_dir = corpus["video"]
  config.train.steps = steps
  config.train.log_every = 10
  config.eval.every_steps = max(steps // 2, 1)
  config.eval.batches = 4
  config.checkpoint.every_steps = steps
  return config


def run_loop(corpus, objectives, steps, seed=0):
  workdir = str(corpus["root"] / objectives.replace("+", "_"))
  metrics = distill.train_and_evaluate(loop_config(corpus, objectives, steps, seed), workdir)
  return workdir, metrics


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def science_runs(corpus):
  """The NST student and the text-only baseline: same seed, data, steps; the same teacher.

  Also the NST student's evaluation before training. The students' seed differs from the
  teacher's, so that a student does not start from the teacher's own initial weights.
  """
  runs = {
      objectives: run_loop(corpus, objectives, SCIENCE_STEPS, seed=1)
      for objectives in ("nst", "none")
  }
  config = loop_config(corpus, "nst", SCIENCE_STEPS, seed=1)
  mesh = sharding.make_mesh(config.mesh)
  program = distill.build(config, mesh)
  runs["initial"] = program.evaluate(program.state, jax.jit(program.eval_step))
  return runs


@pytest.mark.slow
def test_nst_loop_saves_the_student_alone_and_leaves_the_teacher_untouched(corpus, science_runs):
  workdir, metrics = science_runs["nst"]
  for key in (
      "eval/mlm_loss",
      "eval/mlm_accuracy",
      "eval/nst_loss",
      "eval/nst_teacher_cosine",
      "eval/teacher_cka",
  ):
    assert np.isfinite(metrics[key]), key
  step_dir = os.path.join(workdir, "checkpoints", str(SCIENCE_STEPS))
  assert set(os.listdir(step_dir)) >= {"params", "opt_state", "meta"}
  assert not {"frozen", "teacher"} & set(os.listdir(step_dir))
  saved = ckpt_lib.restore_params_numpy(os.path.join(workdir, "checkpoints"))
  assert set(saved) == {"language", "kd_heads"} and set(saved["kd_heads"]) == {"nst"}
  teacher_now = ckpt_lib.restore_params_numpy(os.path.join(corpus["teacher"], "checkpoints"))
  for a, b in zip(jax.tree.leaves(teacher_now), jax.tree.leaves(corpus["teacher_params"])):
    np.testing.assert_array_equal(a, b)
  assert ckpt_lib.CheckpointManager(
      os.path.join(corpus["teacher"], "checkpoints"), every_steps=1, keep=1
  ).all_steps() == [corpus["teacher_step"]]
  baseline = ckpt_lib.restore_params_numpy(os.path.join(science_runs["none"][0], "checkpoints"))
  assert set(baseline) == {"language"}


@pytest.mark.slow
def test_science_check_distilled_student_ends_closer_to_the_teacher(science_runs):
  """NST's loss falls, and the NST student's token states end closer to the teacher's (linear
  CKA over held-out tokens) than those of the text-only baseline after the same steps."""
  initial, distilled, baseline = (
      science_runs[k] if k == "initial" else science_runs[k][1] for k in ("initial", "nst", "none")
  )
  figures = (
      f"NST eval loss {initial['eval/nst_loss']:.4f} at step 0 -> "
      f"{distilled['eval/nst_loss']:.4f} at step {SCIENCE_STEPS}; CKA with the teacher: "
      f"{initial['eval/teacher_cka']:.4f} at step 0 -> NST student "
      f"{distilled['eval/teacher_cka']:.4f}, text-only baseline "
      f"{baseline['eval/teacher_cka']:.4f}"
  )
  print(figures)
  # NST's released value can be negative (the teacher-teacher term is dropped): falling means
  # moving down by a fifth of its initial size or more.
  assert distilled["eval/nst_loss"] < initial["eval/nst_loss"] - 0.2 * abs(
      initial["eval/nst_loss"]
  ), figures
  assert distilled["eval/teacher_cka"] > baseline["eval/teacher_cka"] + 0.01, figures


@pytest.mark.slow
def test_crd_memory_survives_sigterm_and_resume(corpus, monkeypatch):
  write = loop.MetricsWriter.write

  def write_then_signal(self, step, metrics, **kwargs):
    write(self, step, metrics, **kwargs)
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(loop.MetricsWriter, "write", write_then_signal)
  config = loop_config(corpus, "nst+crd", 6)
  config.train.log_every = 2
  config.eval.every_steps = 6
  workdir = str(corpus["root"] / "crd")
  with pytest.raises(loop.Preempted):  # stopped at step 2, before any evaluation
    distill.train_and_evaluate(config, workdir)
  manager = ckpt_lib.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      every_steps=100,
      keep=3,
      fingerprint=ckpt_lib.fingerprint(config),
  )
  assert manager.latest_step() == 2
  mesh = sharding.make_mesh(config.mesh)
  fresh = distill.init(config, mesh).state
  fresh_memory = jax.tree.map(np.asarray, fresh.extra["crd"])
  restored, _ = manager.restore(fresh)
  manager.close()
  memory = restored.extra["crd"]
  assert int(restored.step) == 2 and float(memory.z_student) > 0 > fresh_memory.z_student
  assert np.any(np.asarray(memory.student_memory) != fresh_memory.student_memory)
  assert memory.student_memory.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)

  monkeypatch.setattr(loop.MetricsWriter, "write", write)
  metrics = distill.train_and_evaluate(config, workdir)
  assert "eval/crd_loss" not in metrics and np.isfinite(metrics["eval/nst_loss"])
  logged = [m["step"] for m in read_metrics(workdir) if "train/crd_loss" in m]
  assert logged == [2, 4, 6]  # resumed at step 2, not from scratch


@pytest.mark.slow
def test_voken_baseline_classifies_teacher_clip_vokens(corpus):
  config = loop_config(corpus, "voken", 10)
  config.kd.voken.num_vokens = 16  # k-means centroids of the teacher's held-out clip vectors
  workdir = str(corpus["root"] / "voken")
  metrics = distill.train_and_evaluate(config, workdir)
  saved = ckpt_lib.restore_params_numpy(os.path.join(workdir, "checkpoints"))
  assert saved["kd_heads"]["voken"]["output"]["kernel"].shape == (64, 16)
  assert 0.0 <= metrics["eval/voken_accuracy"] <= 1.0 and np.isfinite(metrics["eval/voken_loss"])
  first = next(m for m in read_metrics(workdir) if "train/voken_loss" in m)
  assert first["train/voken_loss"] < np.log(16) + 1.0  # starts near chance, log K


@pytest.mark.slow  # the session's tiny teachers
def test_crd_rows_are_unique_per_example_of_the_text_corpus(corpus):
  """The real text TFRecords: a memory smaller than the corpus is an error naming both sizes;
  sized from the corpus, one epoch of training batches gives every example its own row."""
  from vidlankd_jax.data import pipeline

  config = loop_config(corpus, "crd", 1)
  mesh = sharding.single_device_mesh()
  blocks = shards_lib.read_text_summary(config.data.data_dir, config.data.task)["blocks"]
  assert blocks > 16
  config.kd.crd.memory_size = 16
  with pytest.raises(ValueError, match=f"memory_size 16 is smaller than the {blocks} examples"):
    distill.init_crd_memory(config, mesh, jax.random.key(0))
  config.kd.crd.memory_size = 0
  memory = distill.init_crd_memory(config, mesh, jax.random.key(0))
  assert memory.student_memory.shape[0] == blocks
  vocab_file = pipeline.resolve_vocab(config.data, config.model.vocab_size)
  batches = pipeline.host_batches(
      pipeline.input_spec(config.data, vocab_file),
      mesh,
      "train",
      global_batch_size=16,
      seed=0,
      repeat=False,
  )
  rows = [
      row
      for batch in batches
      for row in np.asarray(objectives.memory_rows(batch, blocks))[batch["valid"] > 0].tolist()
  ]
  assert sorted(rows) == list(range(blocks))


@pytest.mark.slow  # the session's tiny teachers
def test_teacher_size_mismatch_is_a_fingerprint_error(corpus):
  config = loop_config(corpus, "nst", 1)
  bigger = configlib.load("distill", "size=tiny,teacher_size=mini,objectives=nst")
  config.teacher.model = bigger.teacher.model
  config.teacher.video = bigger.teacher.video
  with pytest.raises(
      ckpt_lib.IncompatibleCheckpointError, match="model.hidden_size: checkpoint 64 vs config 256"
  ):
    distill.load_teacher(config, sharding.single_device_mesh())
