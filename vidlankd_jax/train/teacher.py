"""Teacher pretraining: language and video encoders, token-level contrastive loss + MLM.

One loop: files -> seqio task -> host batch -> global sharded array -> jitted step -> metrics and
checkpoints. The video tower trains jointly with the language side (the paper) unless
`config.video.frozen` (the released code's behaviour).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from vidlankd_jax import losses
from vidlankd_jax import sharding
from vidlankd_jax.models.teacher import Teacher
from vidlankd_jax.train import common
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
  raise ValueError(
      f"config.loss.contrastive {loss_cfg.contrastive!r} is not one of {CONTRASTIVE_LOSSES}"
  )


def make_optimizer(config, params) -> optax.GradientTransformation:
  """AdamW over the trained parameters; a frozen video tower gets no update at all."""
  tx = common.make_optimizer(config.optimizer, config.train.steps)
  if not config.video.frozen:
    return tx
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if getattr(path[0], "key", None) == "video" else "trained", params
  )
  return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)


def build(config, mesh):
  """(graphdef, params, rest) of a freshly initialised teacher, sharded on `mesh`."""
  model = sharding.create_sharded(
      lambda: Teacher.from_config(config, rngs=nnx.Rngs(config.seed)), mesh, config.sharding_rules
  )
  return common.nnx_params(model)


def loss_and_metrics(graphdef, rest, loss_cfg, params, batch, rng):
  model = nnx.merge(graphdef, params, rest)
  out = model(batch, rngs=nnx.Rngs(dropout=rng))
  mlm, accuracy = losses.mlm_loss(out["mlm_logits"], batch["mlm_targets"], batch["mlm_weights"])
  contrast = contrastive_loss(loss_cfg, out["tokens"], out["clip"], batch["attention_mask"])
  loss = loss_cfg.mlm_weight * mlm + loss_cfg.contrastive_weight * contrast
  return loss, {
      "loss": loss,
      "mlm_loss": mlm,
      "mlm_accuracy": accuracy,
      "contrastive_loss": contrast,
  }


def train_step(state, batch, *, graphdef, rest, config, tx, schedule):
  """One optimiser step (with gradient accumulation); non-finite steps leave the state as is."""
  loss_fn = functools.partial(loss_and_metrics, graphdef, rest, config.loss)
  rng = common.step_rng(config.seed, state.step)
  grads, metrics = common.accumulated_grads(
      loss_fn, state.params, batch, rng, config.optimizer.grad_accum_steps
  )
  new_state, opt_metrics = common.apply_gradients(tx, state, grads)
  finite = common.all_finite(metrics["loss"], opt_metrics["grad_norm"])
  new_state = common.keep_if_finite(finite, new_state, state.replace(step=state.step + 1))
  return new_state, {
      **metrics,
      **opt_metrics,
      "learning_rate": schedule(state.step),
      "finite": finite,
  }


def eval_step(params, batch, *, graphdef, rest, config):
  """MLM sums and the sentence/clip vectors text-to-video retrieval ranks."""
  model = nnx.merge(graphdef, params, rest)
  out = model(batch)
  valid = (batch["attention_mask"][:, 0] > 0).astype(jnp.float32)  # padded eval rows are zeros
  weights = batch["mlm_weights"] * valid[:, None]
  ce = optax.softmax_cross_entropy_with_integer_labels(out["mlm_logits"], batch["mlm_targets"])
  correct = (jnp.argmax(out["mlm_logits"], -1) == batch["mlm_targets"]).astype(jnp.float32)
  # Sentences from the unmasked text; their score against clip j is mean_t x_t . v_j.
  tokens = model.text_states(
      batch["unmasked_ids"], batch["attention_mask"], batch["token_type_ids"]
  )
  mask = batch["attention_mask"][..., None].astype(jnp.float32)
  sentence = jnp.sum(tokens * mask, 1) / jnp.maximum(jnp.sum(mask, 1), 1.0)
  return {
      "mlm_loss_sum": jnp.sum(ce * weights),
      "mlm_correct": jnp.sum(correct * weights),
      "mlm_count": jnp.sum(weights),
  }, {"sentence": sentence, "clip": out["clip"], "valid": valid}


def retrieval_metrics(sentence: np.ndarray, clip: np.ndarray) -> dict[str, float]:
  """Text-to-video recall@1/5/10 and median rank (1 = best) over paired rows; also chance R@1.

  Ties count half (the expected rank under random tie-breaking) and NaN scores count ahead of
  the true clip, so a collapsed model that scores every clip alike ranks at chance, never first.
  """
  scores = sentence @ clip.T
  own = np.diagonal(scores)[:, None]
  n = len(own)
  others = ~np.eye(n, dtype=bool)
  ahead = (scores > own) | np.isnan(scores) | np.isnan(own)
  ranks = 1 + np.sum(ahead & others, axis=1) + 0.5 * np.sum((scores == own) & others, axis=1)
  return {
      "recall@1": float(np.mean(ranks <= 1)),
      "recall@5": float(np.mean(ranks <= 5)),
      "recall@10": float(np.mean(ranks <= 10)),
      "median_rank": float(np.median(ranks)),
      "chance_recall@1": 1.0 / max(n, 1),
      "retrieval_clips": float(n),
  }


def evaluate(state, jitted_eval, config, mesh) -> dict[str, float]:
  """MLM loss/accuracy and text-to-video retrieval over the held-out clips."""
  it = common.data_iterator(
      config.data,
      mesh,
      "validation",
      global_batch_size=config.eval.batch_size,
      seed=config.seed,
      repeat=False,
      shuffle=False,
  )
  sums = {"mlm_loss_sum": 0.0, "mlm_correct": 0.0, "mlm_count": 0.0}
  sentences, clips = [], []
  for i, host_batch in enumerate(it):
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
    raise ValueError(f"no validation data for task {config.data.task} in {config.data.data_dir}")
  n = config.eval.retrieval_clips
  metrics = retrieval_metrics(np.concatenate(sentences)[:n], np.concatenate(clips)[:n])
  count = max(sums["mlm_count"], 1.0)
  metrics.update(mlm_loss=sums["mlm_loss_sum"] / count, mlm_accuracy=sums["mlm_correct"] / count)
  return {f"eval/{k}": v for k, v in metrics.items()}


def init_state(config, mesh):
  """(state, train_step_fn, eval_step_fn) of a fresh teacher run on `mesh`: what `loop.fit` runs."""
  graphdef, params, rest = build(config, mesh)
  tx = make_optimizer(config, params)
  schedule = common.learning_rate_schedule(config.optimizer, config.train.steps)
  state = common.init_train_state(tx, params)
  train_step_fn = functools.partial(
      train_step, graphdef=graphdef, rest=rest, config=config, tx=tx, schedule=schedule
  )
  eval_params = functools.partial(eval_step, graphdef=graphdef, rest=rest, config=config)
  return state, train_step_fn, lambda state, batch: eval_params(state.params, batch)


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains the teacher for `config.train.steps` steps, resuming from `workdir` if it can."""
  config.data.vocab_file = common.resolve_vocab(config)
  if config.data.get("synthetic") and jax.process_index() == 0:
    from vidlankd_jax.data import synthetic

    synthetic.prepare_video_text(
        config.data.data_dir, word_budget=config.data.seq_len // 2, max_steps=config.video.max_steps
    )
  if config.data.get("synthetic"):  # the other processes read what process 0 wrote
    sharding.wait_for_all_processes("synthetic video-text data")
  mesh = sharding.make_mesh(config.mesh)
  state, train_step_fn, eval_step_fn = init_state(config, mesh)
  logging.info("teacher parameters:\n%s", sharding.describe_shardings(state.params))
  return loop.fit(config, workdir, mesh, state, train_step_fn, eval_step_fn, evaluate)
