"""Distillation: a student BERT trained on text with MLM plus KD against a frozen teacher.

The teacher's params are restored alone from its run (fingerprint-checked against
`config.teacher`), kept in `TrainState.frozen` (used, never trained, never saved), and only its
language encoder is kept. Its forward runs in the same program as the student's, without the
vocabulary head (the head runs only for soft-label KD, at the masked positions). Its targets are
its last-layer token states, L2-normalised. Each feature objective reads the student through
its own head (see models/student.py) and compares with those targets; the memory-bank CRD
compares sequence embeddings (the mean over real tokens of the head's output and of the
targets, L2-normalised), one memory row per example: its dense `example_id` (written by
tools/make_text_tfrecords.py), the memory sized from the corpus; a hash of the token ids only
behind `config.kd.crd.hash_rows`. The CRD memory (and the voken bank of the vokenization
baseline) lives in `TrainState.extra`, sharded and checkpointed.

The vokenization baseline: the voken of a token is its nearest vector (by dot product of unit
vectors) in a finite bank of the teacher's clip vectors, namely those of the held-out
(validation) clips of a HowTo100M-layout data dir (`config.kd.voken`), or spherical k-means
centroids of them. Labels are computed inside the step from the frozen teacher's token states
on the unmasked text (vokenization labels its corpus before any masking), so the teacher plays
the token-to-image retrieval model of vokenization; as there, every real token but [CLS] and
[SEP] is classified, through vokenization's head (Linear, GELU, LayerNorm, Linear).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from vidlankd_jax import console
from vidlankd_jax import errors
from vidlankd_jax import checkpoint as ckpt_lib
from vidlankd_jax import flops
from vidlankd_jax import losses
from vidlankd_jax import objectives as kd_objectives
from vidlankd_jax import runs
from vidlankd_jax import sharding
from vidlankd_jax import train_state as ts
from vidlankd_jax.data import pipeline
from vidlankd_jax.data import shards
from vidlankd_jax.evaluation import representation
from vidlankd_jax.models.teacher import Teacher
from vidlankd_jax.objectives import FEATURE_OBJECTIVES, VOKEN_OBJECTIVE
from vidlankd_jax.ops import l2_normalize
from vidlankd_jax.train import loop

TEACHER_INPUTS = ("masked", "unmasked")


@dataclasses.dataclass(frozen=True)
class KDSpec:
  """The distillation objective, parsed and checked once from `config.kd` before tracing.

  `settings` is `config.kd` as a dict: each objective's term reads its own keys
  (`vidlankd_jax.objectives`)."""

  objectives: tuple[str, ...]
  weights: dict[str, float]
  mlm_weight: float
  teacher_input: str
  settings: dict

  @classmethod
  def from_config(cls, config) -> "KDSpec":
    """Errors name the config key at fault."""
    objectives = kd_objectives.check(config)
    if config.teacher.input not in TEACHER_INPUTS:
      raise errors.ConfigError(
          f"config.teacher.input {config.teacher.input!r} is not one of {TEACHER_INPUTS}"
      )
    if (objectives or config.teacher.workdir) and (
        config.teacher.model.vocab_size != config.model.vocab_size
    ):
      raise errors.ConfigError(
          f"config.teacher.model.vocab_size {config.teacher.model.vocab_size} differs "
          f"from config.model.vocab_size {config.model.vocab_size}: student and "
          "teacher must read the same token ids"
      )
    kd = config.kd
    return cls(
        objectives=objectives,
        weights={name: float(kd.weights[name]) for name in objectives},
        mlm_weight=float(kd.mlm_weight),
        teacher_input=config.teacher.input,
        settings=kd.to_dict(),
    )

  def needs(self, output: str) -> bool:
    """Whether an active objective needs the teacher output `output` (objectives.TEACHER_OUTPUTS)."""
    return output in kd_objectives.teacher_outputs(self.objectives)


# ---------------------------------------------------------------------------------------------
# Pure functions: the CRD memory's sharing of rows.


def expected_row_sharing(num_examples: int, num_rows: int) -> dict[str, float]:
  """What hashing `num_examples` examples uniformly into `num_rows` memory rows costs.

  With K ~ Poisson(lambda = (N - 1) / M) other examples on an example's row:
  `shared`: the share of examples whose row holds another, 1 - (1 - 1/M)^(N-1);
  `first_epoch`: the share of positives (read before the example's own update) last written
  by another example in the first epoch, E[K / (K + 1)] = 1 - (1 - e^-lambda) / lambda;
  `later_epochs`: the same once every example has written, with each epoch in a fresh random
  order: the example's own write survives only if no other of its row came after it in the
  last epoch and before it in this one, E[1 - 1/(K + 1)^2].
  """
  lam = (num_examples - 1) / num_rows
  k = np.arange(int(lam + 12 * np.sqrt(lam) + 40))
  log_poisson = -lam + k * np.log(max(lam, 1e-300)) - np.cumsum(np.log(np.maximum(k, 1)))
  poisson = np.exp(log_poisson)
  return {
      "shared": float(-np.expm1((num_examples - 1) * np.log1p(-1.0 / num_rows))),
      "first_epoch": float(1.0 - (-np.expm1(-lam)) / lam) if lam > 0 else 0.0,
      "later_epochs": float(1.0 - np.sum(poisson / (k + 1.0) ** 2)),
  }


# ---------------------------------------------------------------------------------------------
# Init: the student, the frozen teacher, the CRD memory and the voken bank.


class Models(NamedTuple):
  """Static halves (graphdef, non-param state) of the student and the teacher's language side."""

  student_def: nnx.GraphDef
  student_rest: nnx.State
  teacher_def: nnx.GraphDef | None
  teacher_rest: nnx.State | None


def load_teacher(config, mesh, *, abstract: bool = False) -> Teacher:
  """The whole teacher `config.teacher` describes, trained params from its run, on `mesh`
  (`abstract`: its shapes and shardings, no checkpoint read)."""
  if abstract:
    return runs.build_teacher(
        config.teacher, mesh, config.sharding_rules, dtype=config.dtype, abstract=True
    )
  if not config.teacher.workdir:
    raise errors.ConfigError(
        "config.teacher.workdir is empty: name the teacher run's workdir "
        "(only objectives=none trains without a teacher)"
    )
  return runs.load_teacher(
      config.teacher,
      runs.Run(config.teacher.workdir),
      mesh,
      config.sharding_rules,
      step=runs.step_or_latest(config.teacher.step),
      dtype=config.dtype,
  )


def crd_memory_size(config, num_shards: int) -> int:
  """Rows of the CRD memory: one per training example, from the corpus's conversion summary.

  `config.kd.crd.memory_size` 0 sizes it to the corpus (rounded up to a multiple of the mesh's
  data-parallel shards); a size smaller than the corpus is an error. With `hash_rows` the size
  is taken as given and the expected sharing of rows is printed.
  """
  crd = config.kd.crd
  summary_path = shards.text_summary_path(config.data.data_dir, config.data.task)
  summary = shards.read_text_summary(config.data.data_dir, config.data.task)
  num_examples = None if summary is None else int(summary["blocks"])
  size = int(crd.memory_size)
  if crd.hash_rows:
    if size <= 0:
      raise errors.ConfigError("config.kd.crd.hash_rows needs config.kd.crd.memory_size > 0")
    if num_examples is None:
      console.info(
          f"CRD memory rows are token hashes into {size} rows (config.kd.crd.hash_rows); the "
          f"corpus size is unknown (no {summary_path}), so is the share of examples that "
          "share a row"
      )
    else:
      sharing = expected_row_sharing(num_examples, size)
      console.info(
          f"CRD memory rows are token hashes (config.kd.crd.hash_rows): {num_examples} examples "
          f"in {size} rows: {sharing['shared']:.1%} of examples share a row; positives written "
          f"by another example: {sharing['first_epoch']:.1%} in the first epoch, "
          f"{sharing['later_epochs']:.1%} after it (expected)"
      )
  elif summary is not None and summary.get("settings", {}).get("example_ids") != "dense":
    raise errors.ConfigError(
        f"{summary_path}: these text shards carry no example_id (written by an older "
        "tools/make_text_tfrecords.py): convert the corpus again for the CRD memory, or set "
        "config.kd.crd.hash_rows=True (rows shared, see its printed collision rate)"
    )
  elif size <= 0:
    if num_examples is None:
      raise errors.ConfigError(
          f"config.kd.crd.memory_size is 0 (one row per example of the corpus) but {summary_path}"
          " is missing: convert the corpus with tools/make_text_tfrecords.py, or set the size"
      )
    size = -(-num_examples // num_shards) * num_shards
  elif num_examples is not None and size < num_examples:
    raise errors.ConfigError(
        f"config.kd.crd.memory_size {size} is smaller than the {num_examples} examples of "
        f"{config.data.task} ({summary_path}): every example needs its own row; set it to 0 "
        f"(sized to the corpus) or at least {num_examples}"
    )
  if size % num_shards:
    raise errors.ConfigError(
        f"config.kd.crd.memory_size {size} is not divisible by the "
        f"{num_shards} data-parallel shards of the mesh"
    )
  return size


def init_crd_memory(config, mesh, key, *, abstract: bool = False) -> losses.CRDMemory:
  """A fresh CRD memory (`crd_memory_size` rows), sharded over the data axes (logical axis
  "memory"); `abstract`: its shapes and shardings only."""
  size = crd_memory_size(config, mesh.shape["data"] * mesh.shape["fsdp"])
  make = functools.partial(
      losses.init_crd_memory, num_examples=size, dim=config.teacher.model.hidden_size
  )
  rows = sharding.logical_to_sharding(("memory", None), mesh, config.sharding_rules)
  scalar = sharding.replicated(mesh)
  if abstract:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows if x.ndim else scalar),
        jax.eval_shape(make, key),
    )
  memory = make(key)
  # A copy of every leaf: the two normalisers start as one array, and each buffer of the
  # state must be its own to be donated.
  return jax.tree.map(
      lambda x: jax.device_put(jnp.array(x, copy=True), rows if x.ndim else scalar), memory
  )


def clip_vectors(teacher: Teacher, config, mesh, vocab_file: str) -> np.ndarray:
  """The teacher's clip vectors [N, H] of the held-out clips of `config.kd.voken.data_dir`."""
  from vidlankd_jax.data import tasks  # deferred: TensorFlow only where data is read

  voken = config.kd.voken
  spec = pipeline.input_spec(
      config.data,
      vocab_file,
      config.teacher.video,
      task=tasks.VIDEO_TEXT_TASK,
      data_dir=voken.data_dir,
  )
  video_def, video_params, video_rest = ts.nnx_params(teacher.video)
  encode = jax.jit(lambda p, f, m: nnx.merge(video_def, p, video_rest)(f, m)[0])
  batches = pipeline.eval_batches(spec, mesh, config)
  chunks, count = [], 0
  for host_batch in batches:
    names = ("video_features", "video_mask", "valid")
    batch = sharding.global_batch({k: host_batch[k] for k in names}, mesh)
    clip = encode(video_params, batch["video_features"], batch["video_mask"])
    clip = multihost_utils.process_allgather(clip, tiled=True)
    valid = multihost_utils.process_allgather(batch["valid"], tiled=True) > 0
    chunks.append(np.asarray(clip, np.float32)[np.asarray(valid)])
    count += len(chunks[-1])
    if count >= voken.num_clips:
      break
  if not count:
    raise errors.ConfigError(f"config.kd.voken.data_dir {voken.data_dir}: no validation clips")
  return np.concatenate(chunks)[: voken.num_clips]


def voken_bank(teacher: Teacher, config, mesh, vocab_file: str) -> jax.Array:
  """The voken vectors [K, H]: the clip vectors, or their k-means centroids; replicated."""
  clips = clip_vectors(teacher, config, mesh, vocab_file)
  voken = config.kd.voken
  bank = (
      clips
      if voken.num_vokens <= 0
      else representation.spherical_kmeans(
          clips, int(voken.num_vokens), int(voken.kmeans_iters), config.seed
      )
  )
  console.info(
      f"voken bank: {len(bank)} vokens from {len(clips)} teacher clip vectors of {voken.data_dir}"
  )
  return jax.device_put(jnp.asarray(bank, jnp.float32), sharding.replicated(mesh))


# ---------------------------------------------------------------------------------------------
# The step.


def objective_terms(
    kd: KDSpec,
    heads,
    targets,
    batch,
    extra,
    key,
    *,
    mlm_logits=None,
    teacher_logits=None,
    voken_targets=None,
):
  """Every active KD loss (unweighted, per example): each objective's declared term.

  Each term is a mean over the batch's examples (tokens, positions), so its value and its
  gradient do not change with the global batch size, the devices or gradient accumulation;
  `config.kd.weights` carries the released scale (`vidlankd_jax.objectives` derives it).

  heads: objective -> student head output ([B, L, H_t] unit vectors; the voken scores
  [B, L, K]); targets: the teacher's unit token states [B, L, H_t]; `mlm_logits` and
  `teacher_logits` ([B, P, V], at the masked positions) for soft-label KD; `voken_targets` the
  teacher's unit token states on the unmasked text, which the voken labels come from. Returns
  (terms, metrics, extra_updates), the updates holding the advanced CRD memory.
  """
  terms, metrics, updates = {}, {}, {}
  for name in kd.objectives:  # each term under its own name in a profile
    with jax.named_scope(f"kd_{name}"):
      term = kd_objectives.OBJECTIVES[name].term(
          kd_objectives.TermInputs(
              head=heads.get(name),
              targets=targets,
              batch=batch,
              settings=kd.settings,
              extra=extra,
              key=key,
              mlm_logits=mlm_logits,
              teacher_logits=teacher_logits,
              voken_targets=voken_targets,
          )
      )
    terms[name] = term.value
    metrics.update(term.metrics)
    if term.update is not None:
      updates[name] = term.update
  return terms, metrics, updates


def teacher_states(teacher, ids, batch):
  """The frozen teacher's last hidden states on `ids` (no vocabulary head) and their unit-norm
  versions."""
  hidden = jax.lax.stop_gradient(
      teacher.bert.encode(ids, batch["attention_mask"], batch["token_type_ids"])
  )
  return hidden, l2_normalize(hidden)


def teacher_targets(teacher, batch, kd: KDSpec):
  """(hidden, targets, voken targets): the teacher's states on the input `config.teacher.input`
  names and, for the vokenization baseline, its unit states on the unmasked text (one forward
  when they coincide, or when vokens are the only objective)."""
  voken = kd.needs("unmasked_states")
  unmasked = kd.teacher_input == "unmasked" or (voken and not kd.needs("states"))
  hidden, targets = teacher_states(
      teacher, batch["unmasked_ids"] if unmasked else batch["input_ids"], batch
  )
  if not voken:
    return hidden, targets, None
  if unmasked:
    return hidden, targets, targets
  return hidden, targets, teacher_states(teacher, batch["unmasked_ids"], batch)[1]


def distill_terms(student, teacher, batch, extra, key, kd: KDSpec, *, rngs=None):
  """Both forwards and every loss term (unweighted).

  Returns (terms, metrics, extra_updates, outputs): `terms` has "mlm" and one entry per
  objective; `extra_updates` the new CRD memory; `outputs` the student's hidden states and head
  outputs and the teacher's token states (what evaluation reads).
  """
  with jax.named_scope("student"):
    hidden, mlm_logits, heads = student(
        batch["input_ids"],
        batch["attention_mask"],
        batch["token_type_ids"],
        batch["mlm_positions"],
        rngs=rngs,
    )
  with jax.named_scope("mlm_loss"):
    mlm, accuracy = losses.mlm_loss(mlm_logits, batch["mlm_targets"], batch["mlm_weights"])
  outputs = {"hidden": hidden, "heads": heads}
  if teacher is None:
    return {"mlm": mlm}, {"mlm_accuracy": accuracy}, {}, outputs
  with jax.named_scope("teacher"):
    teacher_hidden, outputs["teacher"], voken_targets = teacher_targets(teacher, batch, kd)
    teacher_logits = None
    if kd.needs("logits"):
      teacher_logits = teacher.mlm(
          teacher_hidden, teacher.bert.embeddings.word_embeddings, batch["mlm_positions"]
      )
  terms, metrics, updates = objective_terms(
      kd,
      heads,
      outputs["teacher"],
      batch,
      extra,
      key,
      mlm_logits=mlm_logits,
      teacher_logits=teacher_logits,
      voken_targets=voken_targets,
  )
  return {"mlm": mlm, **terms}, {"mlm_accuracy": accuracy, **metrics}, updates, outputs


def total_loss(terms: dict, kd: KDSpec):
  """mlm_weight * MLM + sum_k weights[k] * KD_k."""
  return kd.mlm_weight * terms["mlm"] + sum(
      kd.weights[name] * value for name, value in terms.items() if name != "mlm"
  )


def merge_models(models: Models, params, frozen):
  student = nnx.merge(models.student_def, params, models.student_rest)
  teacher = None if frozen is None else nnx.merge(models.teacher_def, frozen, models.teacher_rest)
  return student, teacher


def loss_fn(models: Models, kd: KDSpec, frozen, extra, params, batch, rng):
  """MLM + weighted KD on one batch: (loss, (metrics, CRD memory updates))."""
  student, teacher = merge_models(models, params, frozen)
  terms, metrics, updates, _ = distill_terms(
      student, teacher, batch, extra, jax.random.fold_in(rng, 1), kd, rngs=nnx.Rngs(dropout=rng)
  )
  loss = total_loss(terms, kd)
  return loss, ({"loss": loss, **{f"{k}_loss": v for k, v in terms.items()}, **metrics}, updates)


def train_step(state, batch, *, models: Models, kd: KDSpec, config, tx, schedule):
  """One optimiser step; the CRD memory advances with it; non-finite steps change nothing."""
  frozen = state.frozen if kd.objectives else None
  return ts.guarded_update(
      tx,
      state,
      functools.partial(loss_fn, models, kd, frozen, state.extra),
      batch,
      ts.step_rng(config.seed, state.step),
      num_micro=config.optimizer.grad_accum_steps,
      schedule=schedule,
  )


def eval_step(state, batch, *, models: Models, kd: KDSpec, seed: int):
  """Sums over one held-out batch: MLM, KD losses, head-teacher cosines, CKA moments.

  The memory-bank CRD term is not evaluated: its memory has one row per training example, so a
  held-out example has no row of its own (its `example_id` would read an unrelated training
  block's vectors as its positive), and the term is defined against that memory only.
  """
  kd = dataclasses.replace(kd, objectives=tuple(o for o in kd.objectives if o != "crd"))
  student, teacher = merge_models(models, state.params, state.frozen)
  terms, metrics, _, out = distill_terms(
      student, teacher, batch, state.extra, jax.random.key(seed), kd
  )
  mask = batch["attention_mask"]
  count = jnp.sum(batch["mlm_weights"])
  full = jnp.all(batch["valid"] > 0).astype(jnp.float32)  # padding only in the last batch
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
    moments = representation.cka_moments(out["hidden"], out["teacher"], mask)
  return sums, moments


def evaluate(state, jitted_eval, *, spec, config, mesh) -> dict[str, float]:
  """MLM loss/accuracy, each KD loss and closeness to the teacher on held-out text.

  MLM figures are means over the masked tokens, KD losses means over the full batches, cosines
  means over real tokens; `teacher_cka` is linear CKA between the student's last hidden states
  and the teacher's token states over all real tokens read.
  """
  batches = pipeline.eval_batches(spec, mesh, config)
  sums, moments = {}, {}
  for i, host_batch in enumerate(batches):
    if i >= config.eval.batches:
      break
    batch_sums, batch_moments = jax.device_get(
        jitted_eval(state, sharding.global_batch(host_batch, mesh))
    )
    for target, values in ((sums, batch_sums), (moments, batch_moments)):
      for k, v in values.items():
        target[k] = target.get(k, 0.0) + np.asarray(v, np.float64)
  if not sums:
    raise errors.ConfigError(f"no validation data for task {spec.task} in {spec.data_dir}")
  count, full = max(float(sums["mlm_count"]), 1.0), max(float(sums["full_batches"]), 1.0)
  metrics = {"mlm_loss": sums["mlm_loss"] / count, "mlm_accuracy": sums["mlm_accuracy"] / count}
  for k, v in sums.items():
    if (k.endswith("_loss") and not k.startswith("mlm")) or k == "voken_accuracy":
      metrics[k] = v / full
    elif k.endswith("_teacher_cosine"):
      metrics[k] = v / max(float(sums["tokens"]), 1.0)
  if moments:
    metrics["teacher_cka"] = representation.linear_cka(moments)
  return {f"eval/{k}": float(v) for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------
# The program the loop runs.


class Pieces(NamedTuple):
  """A fresh distillation run's pieces: what its steps are made of (benchmarks time parts)."""

  models: Models
  kd: KDSpec
  state: ts.TrainState
  tx: object
  schedule: object


def voken_bank_shape(config, mesh) -> jax.ShapeDtypeStruct:
  """The voken bank's shape without the clips: `num_vokens` centroids, else at most
  `num_clips` clip vectors; replicated."""
  voken = config.kd.voken
  rows = int(voken.num_vokens) if voken.num_vokens > 0 else int(voken.num_clips)
  return jax.ShapeDtypeStruct(
      (rows, config.teacher.model.hidden_size), jnp.float32, sharding=sharding.replicated(mesh)
  )


def pieces(config, mesh, *, abstract: bool = False, teacher: Teacher | None = None) -> Pieces:
  """Student, frozen teacher, CRD memory, voken bank and optimiser of a fresh run.

  The teacher is restored from `config.teacher.workdir` unless given (benchmarks pass a fresh
  one); a run with objectives=none and no teacher workdir has none. `abstract`: shapes and
  shardings only (the teacher's too: no checkpoint is read, no clip encoded).
  """
  kd = KDSpec.from_config(config)
  if teacher is None and (kd.objectives or config.teacher.workdir):
    teacher = load_teacher(config, mesh, abstract=abstract)
  extra = {}
  if VOKEN_OBJECTIVE in kd.objectives:
    if abstract:
      extra["voken_bank"] = voken_bank_shape(config, mesh)
    else:
      vocab_file = pipeline.resolve_vocab(config.data, config.model.vocab_size)
      extra["voken_bank"] = voken_bank(teacher, config, mesh, vocab_file)
  if "crd" in kd.objectives:
    extra["crd"] = init_crd_memory(config, mesh, jax.random.key(config.seed + 1), abstract=abstract)
  num_vokens = int(extra["voken_bank"].shape[0]) if "voken_bank" in extra else 0
  student_def, params, student_rest = ts.nnx_params(
      runs.build_student(config, mesh, num_vokens=num_vokens, abstract=abstract)
  )
  teacher_def = teacher_rest = frozen = None
  if teacher is not None:
    teacher_def, frozen, teacher_rest = ts.nnx_params(teacher.language)
  if abstract:
    params = sharding.on_mesh(params, mesh)
    frozen = None if frozen is None else sharding.on_mesh(frozen, mesh)
  console.debug("student parameters:\n%s", sharding.describe_shardings(params))
  tx = ts.make_optimizer(config.optimizer, config.train.steps)
  return Pieces(
      models=Models(student_def, student_rest, teacher_def, teacher_rest),
      kd=kd,
      state=ts.init_train_state(tx, params, frozen=frozen, extra=extra or None, abstract=abstract),
      tx=tx,
      schedule=ts.learning_rate_schedule(config.optimizer, config.train.steps),
  )


def init(config, mesh, *, abstract: bool = False, teacher: Teacher | None = None) -> loop.Setup:
  """The stage contract's init: `pieces`'s state and the train and eval steps made of them."""
  return setup_of(config, pieces(config, mesh, abstract=abstract, teacher=teacher))


def setup_of(config, parts: Pieces) -> loop.Setup:
  """The state of `parts` and the train and eval steps made of them."""
  return loop.Setup(
      state=parts.state,
      train_step=functools.partial(
          train_step,
          models=parts.models,
          kd=parts.kd,
          config=config,
          tx=parts.tx,
          schedule=parts.schedule,
      ),
      eval_step=functools.partial(eval_step, models=parts.models, kd=parts.kd, seed=config.seed),
  )


def example_batch(config) -> dict[str, jax.ShapeDtypeStruct]:
  """The global training batch: MLM text with each block's `example_id`."""
  return pipeline.example_text_batch(
      config.train.batch_size, config.data.seq_len, config.data.max_predictions, example_id=True
  )


def step_flops(config) -> dict[str, float]:
  """The step's analytic FLOPs, term by term (`vidlankd_jax.flops`)."""
  return flops.distill_step(config)


def build(config, mesh) -> loop.Program:
  """The program the loop runs: `init`'s state, the steps, the text data and the evaluation."""
  vocab_file = pipeline.resolve_vocab(config.data, config.model.vocab_size)
  spec = pipeline.input_spec(config.data, vocab_file)
  setup = init(config, mesh)
  return loop.pretraining_program(
      config,
      mesh,
      spec,
      state=setup.state,
      train_step=setup.train_step,
      eval_step=setup.eval_step,
      evaluate=functools.partial(evaluate, spec=spec, config=config, mesh=mesh),
      fingerprint=ckpt_lib.fingerprint(config),
  )


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Distils the student for `config.train.steps` steps, resuming from `workdir` if it can."""
  mesh = sharding.make_mesh(config.mesh)
  return loop.fit(build(config, mesh), config, workdir, mesh)
