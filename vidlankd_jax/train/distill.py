"""Distillation: a student BERT trained on text with MLM plus KD against a frozen teacher.

One loop: text files -> seqio task -> host batch -> global sharded array -> one jitted step
(frozen teacher forward, student forward and backward, every loss) -> metrics and checkpoints.

The teacher's params are restored alone from its run's checkpoint (fingerprint-checked against
`config.teacher`), kept in `TrainState.frozen` (used, never trained, never saved), and only its
language encoder is kept. Its forward runs in the same program as the student's, without the
vocabulary head (the head runs only for soft-label KD, at the masked positions). Its targets are
its last-layer token states, L2-normalised. Each feature objective reads the student through
its own head (see models/student.py) and compares with those targets; the memory-bank CRD
compares sequence embeddings (the mean over real tokens of the head's output and of the
targets, L2-normalised), one memory row per example: its `example_id` when the data has one,
else a hash of its token ids. The CRD memory (and the voken bank of the vokenization baseline)
lives in `TrainState.extra`, sharded and checkpointed.

The vokenization baseline: the voken of a token is its nearest vector (by dot product of unit
vectors) in a finite bank of the teacher's clip vectors, namely those of the held-out
(validation) clips of a HowTo100M-layout data dir (`config.kd.voken`), or spherical k-means
centroids of them. Labels are computed inside the step from the frozen teacher's token states,
so the teacher plays the token-to-image retrieval model of vokenization.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from vidlankd_jax import checkpoint as ckpt_lib
from vidlankd_jax import losses
from vidlankd_jax import sharding
from vidlankd_jax.models.bert import BertConfig
from vidlankd_jax.models.student import FEATURE_OBJECTIVES, VOKEN_OBJECTIVE, Student
from vidlankd_jax.models.teacher import Teacher
from vidlankd_jax.train import common
from vidlankd_jax.train import loop

OBJECTIVES = FEATURE_OBJECTIVES + ("kd", VOKEN_OBJECTIVE)
NST_VARIANTS = ("released", "mmd")
TEACHER_INPUTS = ("masked", "unmasked")


def parse_objectives(spec: str) -> tuple[str, ...]:
  """`config.kd.objectives` ("nst", "nst+crd", "none", ...) -> the active KD objectives."""
  names = tuple(n.strip() for n in str(spec).split("+") if n.strip())
  if names == ("none",):
    return ()
  unknown = [n for n in names if n not in OBJECTIVES]
  if not names or unknown or len(set(names)) != len(names):
    raise ValueError(
        f"config.kd.objectives {spec!r}: expected 'none' or distinct names from "
        f"{OBJECTIVES} joined by '+'" + (f"; unknown: {unknown}" if unknown else "")
    )
  return names


# ---------------------------------------------------------------------------------------------
# Pure functions: pooling, memory ids, voken labels, closeness to the teacher.


def masked_mean_pool(x, mask):
  """[B, L, D], [B, L] -> [B, D]: the mean over the real tokens (0 for an empty row)."""
  mask = mask.astype(jnp.float32)[..., None]
  return jnp.sum(x.astype(jnp.float32) * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


_HASH_MULTIPLIER = 0x01000193  # FNV-1a 32-bit prime


def sequence_hash(ids):
  """[B, L] int -> [B] uint32: a polynomial hash of each row, mixed by murmur3's finaliser.

  Depends only on the token ids, so a sequence keeps its hash whatever its masking or epoch.
  """
  length = ids.shape[-1]
  powers = np.array(
      [pow(_HASH_MULTIPLIER, length - 1 - i, 1 << 32) for i in range(length)], np.uint32
  )
  h = jnp.sum(ids.astype(jnp.uint32) * jnp.asarray(powers), axis=-1, dtype=jnp.uint32)
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def memory_rows(batch, num_rows: int):
  """The CRD memory row of each example: `example_id` if the data has it, else a token hash."""
  if "example_id" in batch:
    return (batch["example_id"] % num_rows).astype(jnp.int32)
  return (sequence_hash(batch["unmasked_ids"]) % jnp.uint32(num_rows)).astype(jnp.int32)


def voken_labels(token_states, bank):
  """[B, L, H] unit token states, [K, H] unit voken vectors -> [B, L] nearest voken ids."""
  scores = jnp.einsum("blh,kh->blk", token_states.astype(jnp.float32), bank.astype(jnp.float32))
  return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def cka_moments(x, y, mask):
  """Sums over the real tokens that linear CKA needs: count, sums, and cross-products.

  x [B, L, Hx], y [B, L, Hy], mask [B, L] -> dict of n, sx [Hx], sy [Hy], xx [Hx, Hx],
  yy [Hy, Hy], yx [Hy, Hx] (float32; add them over batches, then `linear_cka`).
  """
  m = mask.astype(jnp.float32)
  x = x.astype(jnp.float32).reshape(-1, x.shape[-1]) * m.reshape(-1, 1)
  y = y.astype(jnp.float32).reshape(-1, y.shape[-1]) * m.reshape(-1, 1)
  mm = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
  return {
      "n": jnp.sum(m),
      "sx": jnp.sum(x, 0),
      "sy": jnp.sum(y, 0),
      "xx": mm(x.T, x),
      "yy": mm(y.T, y),
      "yx": mm(y.T, x),
  }


def linear_cka(moments) -> float:
  """Linear CKA of the token representations X and Y summarised by `cka_moments`.

  With centred cross-products C_ab = sum_t (a_t - mean a)(b_t - mean b)ᵀ:
  ``CKA = ||C_yx||_F^2 / (||C_xx||_F ||C_yy||_F)``, in [0, 1], invariant to rotations and
  scalings of either representation (so a student needs no head to be compared).
  """
  m = {k: np.asarray(v, np.float64) for k, v in moments.items()}
  n = max(float(m["n"]), 1.0)
  centred = lambda ab, sa, sb: ab - np.outer(sa, sb) / n
  cxx = centred(m["xx"], m["sx"], m["sx"])
  cyy = centred(m["yy"], m["sy"], m["sy"])
  cyx = centred(m["yx"], m["sy"], m["sx"])
  denominator = np.linalg.norm(cxx) * np.linalg.norm(cyy)
  return float(np.sum(cyx * cyx) / denominator) if denominator > 0 else 0.0


def spherical_kmeans(vectors: np.ndarray, k: int, iters: int, seed: int) -> np.ndarray:
  """`k` unit centroids of unit `vectors` [N, D] by cosine k-means (an empty cluster keeps its
  centroid); initialised from `k` distinct vectors drawn with `seed`."""
  if k > len(vectors):
    raise ValueError(f"config.kd.voken.num_vokens={k} exceeds the {len(vectors)} clips read")
  rng = np.random.default_rng(seed)
  centroids = vectors[rng.choice(len(vectors), k, replace=False)]
  for _ in range(iters):
    assign = np.argmax(vectors @ centroids.T, axis=1)
    sums = np.zeros_like(centroids)
    np.add.at(sums, assign, vectors)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    centroids = np.where(norms > 0, sums / np.maximum(norms, 1e-12), centroids)
  return centroids


# ---------------------------------------------------------------------------------------------
# Models: the student, and the frozen teacher restored from its checkpoint.


class Models(NamedTuple):
  """Static halves (graphdef, non-param state) of the student and the teacher's language side."""

  student_def: nnx.GraphDef
  student_rest: nnx.State
  teacher_def: nnx.GraphDef | None
  teacher_rest: nnx.State | None


def teacher_checkpoints(workdir: str) -> str:
  """The checkpoint folder of a teacher run: `<workdir>/checkpoints`, or `workdir` itself."""
  if not workdir:
    raise ValueError(
        "config.teacher.workdir is empty: name the teacher run's workdir "
        "(only objectives=none trains without a teacher)"
    )
  nested = os.path.join(workdir, "checkpoints")
  return nested if os.path.isdir(nested) or "://" in workdir else workdir


def teacher_fingerprint(config) -> dict:
  """The fingerprint a teacher run with `config.teacher`'s architecture wrote."""
  return ckpt_lib.fingerprint(
      ml_collections.ConfigDict(
          {"stage": "teacher", "model": config.teacher.model, "video": config.teacher.video}
      )
  )


def load_teacher(config, mesh) -> Teacher:
  """The whole teacher with its trained params, sharded on `mesh`."""
  teacher = sharding.create_sharded(
      lambda: Teacher.from_config(config.teacher, rngs=nnx.Rngs(config.seed)),
      mesh,
      config.sharding_rules,
  )
  _, params, _ = common.nnx_params(teacher)
  step = None if config.teacher.step < 0 else int(config.teacher.step)
  directory = teacher_checkpoints(config.teacher.workdir)
  nnx.update(
      teacher,
      ckpt_lib.restore_params(
          directory, params, step, expected_fingerprint=teacher_fingerprint(config)
      ),
  )
  logging.info("teacher restored from %s", directory)
  return teacher


def build_student(config, mesh, num_vokens: int = 0) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, params, rest) of a fresh student, sharded on `mesh`."""
  cfg = BertConfig.from_config(config.model)
  model = sharding.create_sharded(
      lambda: Student(
          cfg,
          parse_objectives(config.kd.objectives),
          teacher_hidden_size=config.teacher.model.hidden_size,
          num_vokens=num_vokens,
          rngs=nnx.Rngs(config.seed),
      ),
      mesh,
      config.sharding_rules,
  )
  return common.nnx_params(model)


def check_config(config) -> tuple[str, ...]:
  """Errors that name the config key at fault, before anything is built."""
  objectives = parse_objectives(config.kd.objectives)
  if config.kd.nst_variant not in NST_VARIANTS:
    raise ValueError(
        f"config.kd.nst_variant {config.kd.nst_variant!r} is not one of {NST_VARIANTS}"
    )
  if config.teacher.input not in TEACHER_INPUTS:
    raise ValueError(
        f"config.teacher.input {config.teacher.input!r} is not one of {TEACHER_INPUTS}"
    )
  if (objectives or config.teacher.workdir) and (
      config.teacher.model.vocab_size != config.model.vocab_size
  ):
    raise ValueError(
        f"config.teacher.model.vocab_size {config.teacher.model.vocab_size} differs "
        f"from config.model.vocab_size {config.model.vocab_size}: student and "
        "teacher must read the same token ids"
    )
  if "crd" in objectives and config.optimizer.grad_accum_steps != 1:
    raise ValueError(
        "config.optimizer.grad_accum_steps must be 1 with the crd objective: the "
        "memory update needs every example's embeddings of the step at once"
    )
  if VOKEN_OBJECTIVE in objectives and not config.kd.voken.data_dir:
    raise ValueError(
        "config.kd.voken.data_dir is empty: the voken bank is made of the "
        "teacher's clip vectors of that data dir's held-out video clips"
    )
  return objectives


# ---------------------------------------------------------------------------------------------
# The extra state: CRD memory and voken bank.


def init_crd_memory(config, mesh, key) -> losses.CRDMemory:
  """A fresh CRD memory, rows sharded over the data axes (logical axis "memory")."""
  crd = config.kd.crd
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if crd.memory_size % shards:
    raise ValueError(
        f"config.kd.crd.memory_size {crd.memory_size} is not divisible by the "
        f"{shards} data-parallel shards of the mesh"
    )
  memory = losses.init_crd_memory(key, crd.memory_size, config.teacher.model.hidden_size)
  rows = sharding.logical_to_sharding(("memory", None), mesh, config.sharding_rules)
  scalar = sharding.replicated(mesh)
  # A copy of every leaf: the two normalisers start as one array, and each buffer of the
  # state must be its own to be donated.
  return jax.tree.map(
      lambda x: jax.device_put(jnp.array(x, copy=True), rows if x.ndim else scalar), memory
  )


def clip_vectors(teacher: Teacher, config, mesh) -> np.ndarray:
  """The teacher's clip vectors [N, H] of the held-out clips of `config.kd.voken.data_dir`."""
  voken = config.kd.voken
  data_cfg = ml_collections.ConfigDict(
      dict(
          config.data.to_dict(),
          task="howto100m_video_text",
          data_dir=voken.data_dir,
          max_video_steps=config.teacher.video.max_steps,
          video_dim=config.teacher.video.input_dim,
      )
  )
  video_def, video_params, video_rest = common.nnx_params(teacher.video)
  encode = jax.jit(lambda p, f, m: nnx.merge(video_def, p, video_rest)(f, m)[0])
  batches = common.data_iterator(
      data_cfg,
      mesh,
      "validation",
      global_batch_size=config.eval.batch_size,
      seed=config.seed,
      repeat=False,
      shuffle=False,
  )
  chunks, count = [], 0
  for host_batch in batches:
    batch = sharding.global_batch(
        {k: host_batch[k] for k in ("video_features", "video_mask")}, mesh
    )
    clip = multihost_utils.process_allgather(
        encode(video_params, batch["video_features"], batch["video_mask"]), tiled=True
    )
    valid = multihost_utils.process_allgather(batch["video_mask"][:, 0], tiled=True) > 0
    chunks.append(np.asarray(clip, np.float32)[np.asarray(valid)])
    count += len(chunks[-1])
    if count >= voken.num_clips:
      break
  if not count:
    raise ValueError(f"config.kd.voken.data_dir {voken.data_dir}: no validation clips")
  return np.concatenate(chunks)[: voken.num_clips]


def voken_bank(teacher: Teacher, config, mesh) -> jax.Array:
  """The voken vectors [K, H]: the clip vectors, or their k-means centroids; replicated."""
  clips = clip_vectors(teacher, config, mesh)
  voken = config.kd.voken
  bank = (
      clips
      if voken.num_vokens <= 0
      else spherical_kmeans(clips, int(voken.num_vokens), int(voken.kmeans_iters), config.seed)
  )
  print(
      f"voken bank: {len(bank)} vokens from {len(clips)} teacher clip vectors of "
      f"{voken.data_dir}",
      flush=True,
  )
  return jax.device_put(jnp.asarray(bank, jnp.float32), sharding.replicated(mesh))


# ---------------------------------------------------------------------------------------------
# The step.


def objective_terms(
    config, heads, targets, batch, extra, key, *, mlm_logits=None, teacher_logits=None
):
  """Every active KD loss (unweighted) from the heads' outputs and the teacher's token states.

  heads: objective -> student head output ([B, L, H_t] unit vectors; the voken scores
  [B, L, K]); targets: the teacher's unit token states [B, L, H_t]; `mlm_logits` and
  `teacher_logits` ([B, P, V], at the masked positions) for soft-label KD. Returns
  (terms, metrics, extra_updates), the updates holding the advanced CRD memory.
  """
  kd = config.kd
  mask = batch["attention_mask"]
  terms, metrics, updates = {}, {}, {}
  for name in parse_objectives(kd.objectives):
    if name == "nst" and kd.nst_variant == "released":
      terms[name] = losses.nst_loss(heads[name], targets)
    elif name == "nst":
      terms[name] = losses.nst_mmd_loss(heads[name], targets, mask)
    elif name == "ntxent":
      terms[name] = losses.nt_xent_loss(heads[name], targets, kd.ntxent_temperature, mask)
    elif name == "mse":
      terms[name] = losses.hidden_mse_loss(heads[name], targets, mask)
    elif name == "cos":
      terms[name] = losses.hidden_cosine_loss(heads[name], targets, mask)
    elif name == "crd":
      terms[name], updates["crd"] = losses.crd_loss(
          losses.l2_normalize(masked_mean_pool(heads[name], mask)),
          losses.l2_normalize(masked_mean_pool(targets, mask)),
          memory_rows(batch, kd.crd.memory_size),
          extra["crd"],
          key,
          num_negatives=kd.crd.num_negatives,
          temperature=kd.crd.temperature,
          momentum=kd.crd.momentum,
      )
    elif name == "kd":
      terms[name] = losses.soft_label_kd_loss(
          mlm_logits,
          jax.lax.stop_gradient(teacher_logits),
          kd.soft_label_temperature,
          batch["mlm_weights"],
      )
    elif name == VOKEN_OBJECTIVE:
      labels = voken_labels(targets, extra["voken_bank"])
      terms[name] = losses.voken_classification_loss(heads[name], labels, mask)
      metrics["voken_accuracy"] = losses.weighted_accuracy(heads[name], labels, mask)
  return terms, metrics, updates


def teacher_targets(teacher, batch, config):
  """The frozen teacher's last hidden states (no vocabulary head) and their unit-norm targets."""
  ids = batch["unmasked_ids"] if config.teacher.input == "unmasked" else batch["input_ids"]
  hidden = jax.lax.stop_gradient(
      teacher.bert.encode(ids, batch["attention_mask"], batch["token_type_ids"])
  )
  return hidden, losses.l2_normalize(hidden)


def distill_terms(student: Student, teacher, batch, extra, key, config, *, rngs=None):
  """Both forwards and every loss term (unweighted).

  Returns (terms, metrics, extra_updates, outputs): `terms` has "mlm" and one entry per
  objective; `extra_updates` the new CRD memory; `outputs` the student's hidden states and head
  outputs and the teacher's token states (what evaluation reads).
  """
  hidden, mlm_logits, heads = student(
      batch["input_ids"],
      batch["attention_mask"],
      batch["token_type_ids"],
      batch["mlm_positions"],
      rngs=rngs,
  )
  mlm, accuracy = losses.mlm_loss(mlm_logits, batch["mlm_targets"], batch["mlm_weights"])
  outputs = {"hidden": hidden, "heads": heads}
  if teacher is None:
    return {"mlm": mlm}, {"mlm_accuracy": accuracy}, {}, outputs
  teacher_hidden, outputs["teacher"] = teacher_targets(teacher, batch, config)
  teacher_logits = None
  if "kd" in parse_objectives(config.kd.objectives):
    teacher_logits = teacher.mlm(
        teacher_hidden, teacher.bert.embeddings.word_embeddings, batch["mlm_positions"]
    )
  terms, metrics, updates = objective_terms(
      config,
      heads,
      outputs["teacher"],
      batch,
      extra,
      key,
      mlm_logits=mlm_logits,
      teacher_logits=teacher_logits,
  )
  return {"mlm": mlm, **terms}, {"mlm_accuracy": accuracy, **metrics}, updates, outputs


def total_loss(terms: dict, kd_cfg):
  """mlm_weight * MLM + sum_k weights[k] * KD_k."""
  return kd_cfg.mlm_weight * terms["mlm"] + sum(
      kd_cfg.weights[name] * value for name, value in terms.items() if name != "mlm"
  )


def merge_models(models: Models, params, frozen):
  student = nnx.merge(models.student_def, params, models.student_rest)
  teacher = None if frozen is None else nnx.merge(models.teacher_def, frozen, models.teacher_rest)
  return student, teacher


def train_step(state, batch, *, models: Models, config, tx, schedule):
  """One optimiser step; the CRD memory advances with it; non-finite steps change nothing."""
  uses_teacher = bool(parse_objectives(config.kd.objectives))

  def loss_fn(params, batch, rng):
    student, teacher = merge_models(models, params, state.frozen if uses_teacher else None)
    terms, metrics, updates, _ = distill_terms(
        student,
        teacher,
        batch,
        state.extra,
        jax.random.fold_in(rng, 1),
        config,
        rngs=nnx.Rngs(dropout=rng),
    )
    loss = total_loss(terms, config.kd)
    return loss, ({"loss": loss, **{f"{k}_loss": v for k, v in terms.items()}, **metrics}, updates)

  rng = common.step_rng(config.seed, state.step)
  grads, (metrics, updates) = common.accumulated_grads(
      loss_fn, state.params, batch, rng, config.optimizer.grad_accum_steps
  )
  extra = None if state.extra is None else {**state.extra, **updates}
  new_state, opt_metrics = common.apply_gradients(tx, state, grads, extra=extra)
  finite = common.all_finite(metrics["loss"], opt_metrics["grad_norm"])
  new_state = common.keep_if_finite(finite, new_state, state.replace(step=state.step + 1))
  return new_state, {
      **metrics,
      **opt_metrics,
      "learning_rate": schedule(state.step),
      "finite": finite,
  }


def eval_step(state, batch, *, models: Models, config):
  """Sums over one held-out batch: MLM, KD losses, head-teacher cosines, CKA moments."""
  student, teacher = merge_models(models, state.params, state.frozen)
  terms, metrics, _, out = distill_terms(
      student, teacher, batch, state.extra, jax.random.key(config.seed), config
  )
  mask = batch["attention_mask"]
  count = jnp.sum(batch["mlm_weights"])
  full = jnp.all(mask[:, 0] > 0).astype(jnp.float32)  # padded rows only in the last batch
  sums = {
      "mlm_loss": terms["mlm"] * count,
      "mlm_accuracy": metrics["mlm_accuracy"] * count,
      "mlm_count": count,
      "full_batches": full,
  }
  sums.update({f"{k}_loss": v * full for k, v in terms.items() if k != "mlm"})
  if "voken_accuracy" in metrics:
    sums["voken_accuracy"] = metrics["voken_accuracy"] * full
  moments = {}
  if "teacher" in out:
    m = mask.astype(jnp.float32)
    sums["tokens"] = jnp.sum(m)
    for name in FEATURE_OBJECTIVES:
      if name in out["heads"]:
        cosine = jnp.sum(out["heads"][name] * out["teacher"], axis=-1)
        sums[f"{name}_teacher_cosine"] = jnp.sum(cosine * m)
    moments = cka_moments(out["hidden"], out["teacher"], mask)
  return sums, moments


def evaluate(state, jitted_eval, config, mesh) -> dict[str, float]:
  """MLM loss/accuracy, each KD loss and closeness to the teacher on held-out text.

  MLM figures are means over the masked tokens, KD losses means over the full batches, cosines
  means over real tokens; `teacher_cka` is linear CKA between the student's last hidden states
  and the teacher's token states over all real tokens read.
  """
  it = common.data_iterator(
      config.data,
      mesh,
      "validation",
      global_batch_size=config.eval.batch_size,
      seed=config.seed,
      repeat=False,
      shuffle=False,
  )
  sums, moments = {}, {}
  for i, host_batch in enumerate(it):
    if i >= config.eval.batches:
      break
    batch_sums, batch_moments = jax.device_get(
        jitted_eval(state, sharding.global_batch(host_batch, mesh))
    )
    for target, values in ((sums, batch_sums), (moments, batch_moments)):
      for k, v in values.items():
        target[k] = target.get(k, 0.0) + np.asarray(v, np.float64)
  if not sums:
    raise ValueError(f"no validation data for task {config.data.task} in {config.data.data_dir}")
  count, full = max(float(sums["mlm_count"]), 1.0), max(float(sums["full_batches"]), 1.0)
  metrics = {"mlm_loss": sums["mlm_loss"] / count, "mlm_accuracy": sums["mlm_accuracy"] / count}
  for k, v in sums.items():
    if (k.endswith("_loss") and not k.startswith("mlm")) or k == "voken_accuracy":
      metrics[k] = v / full
    elif k.endswith("_teacher_cosine"):
      metrics[k] = v / max(float(sums["tokens"]), 1.0)
  if moments:
    metrics["teacher_cka"] = linear_cka(moments)
  return {f"eval/{k}": float(v) for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------
# The loop.


def init_state(config, mesh, teacher: Teacher | None = None):
  """(models, state, tx) of a fresh run: student, frozen teacher, CRD memory, voken bank.

  The teacher is restored from `config.teacher.workdir` unless given (benchmarks pass a fresh
  one); a run with objectives=none and no teacher workdir has none.
  """
  objectives = check_config(config)
  if teacher is None and (objectives or config.teacher.workdir):
    teacher = load_teacher(config, mesh)
  extra = {}
  if VOKEN_OBJECTIVE in objectives:
    extra["voken_bank"] = voken_bank(teacher, config, mesh)
  if "crd" in objectives:
    extra["crd"] = init_crd_memory(config, mesh, jax.random.key(config.seed + 1))
  num_vokens = int(extra["voken_bank"].shape[0]) if "voken_bank" in extra else 0
  student_def, params, student_rest = build_student(config, mesh, num_vokens)
  teacher_def = teacher_rest = frozen = None
  if teacher is not None:
    teacher_def, frozen, teacher_rest = common.nnx_params(teacher.language)
  tx = common.make_optimizer(config.optimizer, config.train.steps)
  state = common.init_train_state(tx, params, frozen=frozen, extra=extra or None)
  return Models(student_def, student_rest, teacher_def, teacher_rest), state, tx


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Distils the student for `config.train.steps` steps, resuming from `workdir` if it can."""
  config.data.vocab_file = common.resolve_vocab(config)
  mesh = sharding.make_mesh(config.mesh)
  models, state, tx = init_state(config, mesh)
  logging.info("student parameters:\n%s", sharding.describe_shardings(state.params))
  schedule = common.learning_rate_schedule(config.optimizer, config.train.steps)
  return loop.fit(
      config,
      workdir,
      mesh,
      state,
      functools.partial(train_step, models=models, config=config, tx=tx, schedule=schedule),
      functools.partial(eval_step, models=models, config=config),
      evaluate,
  )
