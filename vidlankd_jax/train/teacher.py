"""Teacher pretraining: language and video encoders, token-level contrastive loss + MLM.

The video tower trains jointly with the language side (the paper) unless `config.video.frozen`
(the released code's behaviour). Evaluation: held-out MLM and text-to-video retrieval.
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from vidlankd_jax import console
from vidlankd_jax import errors
from vidlankd_jax import checkpoint as ckpt_lib
from vidlankd_jax import flops
from vidlankd_jax import losses
from vidlankd_jax import sharding
from vidlankd_jax import train_state as ts
from vidlankd_jax.data import pipeline
from vidlankd_jax.evaluation.retrieval import retrieval_metrics
from vidlankd_jax.models.teacher import Teacher
from vidlankd_jax.train import loop

CONTRASTIVE_LOSSES = ("paired_hinge", "batchwise_hinge", "info_nce")


def contrastive_loss(loss_cfg, tokens, clip, mask):
  """The configured video-language loss over L2-normalised token states and clip vectors."""
  if loss_cfg.contrastive == "paired_hinge":
    return losses.paired_hinge_rank_loss(tokens, clip, mask, loss_cfg.margin)
  if loss_cfg.contrastive == "batchwise_hinge":
    return losses.batchwise_hinge_rank_loss(tokens, clip, mask, loss_cfg.margin)
  if loss_cfg.contrastive == "info_nce":
    return losses.info_nce_loss(tokens, clip, mask, loss_cfg.temperature)
  raise errors.ConfigError(
      f"config.loss.contrastive {loss_cfg.contrastive!r} is not one of {CONTRASTIVE_LOSSES}"
  )


def make_optimizer(config, params) -> optax.GradientTransformation:
  """AdamW over the trained parameters; a frozen video tower gets no update at all."""
  tx = ts.make_optimizer(config.optimizer, config.train.steps)
  if not config.video.frozen:
    return tx
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if getattr(path[0], "key", None) == "video" else "trained", params
  )
  return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)


def loss_fn(graphdef, rest, loss_cfg, params, batch, rng):
  """Contrastive + MLM on one (micro-)batch: (loss, (metrics, no state updates))."""
  model = nnx.merge(graphdef, params, rest)
  out = model(batch, rngs=nnx.Rngs(dropout=rng))
  with jax.named_scope("mlm_loss"):
    mlm, accuracy = losses.mlm_loss(out["mlm_logits"], batch["mlm_targets"], batch["mlm_weights"])
  with jax.named_scope("contrastive_loss"):
    contrast = contrastive_loss(loss_cfg, out["tokens"], out["clip"], batch["attention_mask"])
  loss = loss_cfg.mlm_weight * mlm + loss_cfg.contrastive_weight * contrast
  metrics = {"loss": loss, "mlm_loss": mlm, "mlm_accuracy": accuracy, "contrastive_loss": contrast}
  return loss, (metrics, {})


def train_step(state, batch, *, graphdef, rest, config, tx, schedule):
  """One optimiser step (with gradient accumulation); non-finite steps leave the state as is."""
  return ts.guarded_update(
      tx,
      state,
      functools.partial(loss_fn, graphdef, rest, config.loss),
      batch,
      ts.step_rng(config.seed, state.step),
      num_micro=config.optimizer.grad_accum_steps,
      schedule=schedule,
  )


def eval_step(state, batch, *, graphdef, rest):
  """MLM sums and the sentence/clip vectors text-to-video retrieval ranks."""
  model = nnx.merge(graphdef, state.params, rest)
  out = model(batch)
  valid = batch["valid"].astype(jnp.float32)
  weights = batch["mlm_weights"] * valid[:, None]
  ce = optax.softmax_cross_entropy_with_integer_labels(out["mlm_logits"], batch["mlm_targets"])
  correct = (jnp.argmax(out["mlm_logits"], -1) == batch["mlm_targets"]).astype(jnp.float32)
  # Sentences from the unmasked text; their score against clip j is mean_t x_t . v_j.
  tokens = model.text_states(
      batch["unmasked_ids"], batch["attention_mask"], batch["token_type_ids"]
  )
  mask = batch["attention_mask"][..., None].astype(jnp.float32)
  sentence = jnp.sum(tokens * mask, 1) / jnp.maximum(jnp.sum(mask, 1), 1.0)
  sums = {
      "mlm_loss_sum": jnp.sum(ce * weights),
      "mlm_correct": jnp.sum(correct * weights),
      "mlm_count": jnp.sum(weights),
  }
  return sums, {"sentence": sentence, "clip": out["clip"], "valid": valid}


def evaluate(state, jitted_eval, *, spec, config, mesh) -> dict[str, float]:
  """MLM loss/accuracy and text-to-video retrieval over the held-out clips."""
  batches = pipeline.eval_batches(spec, mesh, config)
  sums = {"mlm_loss_sum": 0.0, "mlm_correct": 0.0, "mlm_count": 0.0}
  sentences, clips = [], []
  for i, host_batch in enumerate(batches):
    if i >= config.eval.batches and sum(len(s) for s in sentences) >= config.eval.retrieval_clips:
      break
    stats, vectors = jitted_eval(state, sharding.global_batch(host_batch, mesh))
    for k in sums:
      sums[k] += float(stats[k])
    vectors = multihost_utils.process_allgather(vectors, tiled=True)
    keep = np.asarray(vectors["valid"]) > 0
    sentences.append(np.asarray(vectors["sentence"])[keep])
    clips.append(np.asarray(vectors["clip"])[keep])
  if not sentences:
    raise errors.DataError(f"no validation data for task {spec.task} in {spec.data_dir}")
  n = config.eval.retrieval_clips
  metrics = retrieval_metrics(np.concatenate(sentences)[:n], np.concatenate(clips)[:n])
  count = max(sums["mlm_count"], 1.0)
  metrics.update(mlm_loss=sums["mlm_loss_sum"] / count, mlm_accuracy=sums["mlm_correct"] / count)
  return {f"eval/{k}": v for k, v in metrics.items()}


def init(config, mesh, *, abstract: bool = False) -> loop.Setup:
  """Model, optimiser and step functions of a fresh teacher run on `mesh` (`abstract`: shapes
  and shardings only, nothing allocated)."""
  model = sharding.create_sharded(
      lambda: Teacher.from_config(config, rngs=nnx.Rngs(config.seed)),
      mesh,
      config.sharding_rules,
      abstract=abstract,
  )
  graphdef, params, rest = ts.nnx_params(model)
  if abstract:
    params = sharding.on_mesh(params, mesh)
  console.debug("teacher parameters:\n%s", sharding.describe_shardings(params))
  tx = make_optimizer(config, params)
  schedule = ts.learning_rate_schedule(config.optimizer, config.train.steps)
  return loop.Setup(
      state=ts.init_train_state(tx, params, abstract=abstract),
      train_step=functools.partial(
          train_step, graphdef=graphdef, rest=rest, config=config, tx=tx, schedule=schedule
      ),
      eval_step=functools.partial(eval_step, graphdef=graphdef, rest=rest),
  )


def example_batch(config) -> dict[str, jax.ShapeDtypeStruct]:
  """The global training batch at its longest (video padded to `config.video.max_steps`)."""
  b, l, p = config.train.batch_size, config.data.seq_len, config.data.max_predictions
  t, d = config.video.max_steps, config.video.input_dim
  return {
      **pipeline.example_text_batch(b, l, p),
      "video_features": jax.ShapeDtypeStruct((b, t, d), jnp.float16),
      "video_mask": jax.ShapeDtypeStruct((b, t), jnp.int32),
  }


def step_flops(config) -> dict[str, float]:
  """The step's analytic FLOPs, term by term (`vidlankd_jax.flops`)."""
  return flops.teacher_step(config)


def build(config, mesh) -> loop.Program:
  """The program the loop runs: `init`'s state and steps, the video-text data and evaluation."""
  vocab_file = pipeline.resolve_vocab(config.data, config.model.vocab_size)
  spec = pipeline.input_spec(config.data, vocab_file, config.video)
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
  """Trains the teacher for `config.train.steps` steps, resuming from `workdir` if it can."""
  if config.data.get("synthetic"):
    pipeline.prepare_synthetic_video_text(config.data, config.video)
  mesh = sharding.make_mesh(config.mesh)
  return loop.fit(build(config, mesh), config, workdir, mesh)
