"""Fine-tuning on the downstream benchmarks: one program per seed, run by the one loop.

  python -m vidlankd_jax.main --config=configs/finetune.py:task=sst2,init=runs/student \
      --config.seeds=1,2,3 --workdir=runs/finetune/sst2

The initial encoder is `config.init.source`: "scratch", "hf:<dir>" (a Hugging Face BERT
directory) or a teacher/student workdir (see `vidlankd_jax.runs`). Each seed fine-tunes a fresh
head on that encoder in `<workdir>/seed_<s>/` (checkpoints, exact resume, preemption, like every
stage) and is scored on the task's evaluation splits by the task's metric function;
`<workdir>/results.json` holds every seed's metrics with their mean and spread,
`<workdir>/results.md` the task's table row. A rerun skips the seeds that finished.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from vidlankd_jax import console
from vidlankd_jax import errors
from vidlankd_jax import flops
from vidlankd_jax import runs
from vidlankd_jax import sharding
from vidlankd_jax import train_state as ts
from vidlankd_jax.data import downstream
from vidlankd_jax.data import pipeline
from vidlankd_jax.data import vocab as vocab_lib
from vidlankd_jax.evaluation import metrics as metrics_lib
from vidlankd_jax.evaluation import results as results_lib
from vidlankd_jax.models import heads
from vidlankd_jax.train import loop

LABEL_FEATURES = {
    "classification": ("label",),
    "regression": ("label",),
    "multiple_choice": ("label",),
    "span": ("start_position", "end_position"),
}
SPAN_WINDOW_FIELDS = ("example_id", "offset_start", "offset_end", "token_is_max_context", "valid")


# ---------------------------------------------------------------------------------- steps


def model_features(kind: str) -> tuple[str, ...]:
  """The arrays a step reads (model inputs, labels, `valid`); strings and bookkeeping stay home."""
  return downstream.MODEL_FEATURES + LABEL_FEATURES[kind] + ("valid",)


def model_batch(batch: dict, kind: str) -> dict:
  return {k: batch[k] for k in model_features(kind)}


def forward(graphdef, rest, params, batch, rngs=None) -> dict:
  model = nnx.merge(graphdef, params, rest)
  return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], rngs=rngs)


def loss_fn(graphdef, rest, kind, params, batch, rng):
  """The task loss of one (micro-)batch: (loss, (metrics, no state updates))."""
  outputs = forward(graphdef, rest, params, batch, nnx.Rngs(dropout=rng))
  with jax.named_scope("task_loss"):
    loss, aux = heads.task_loss(kind, outputs, batch)
  return loss, ({"loss": loss, **aux}, {})


def train_step(state, batch, *, graphdef, rest, kind, tx, schedule, num_micro):
  """One AdamW step on the task loss, dropout keyed by (the seed in the state, step)."""
  return ts.guarded_update(
      tx,
      state,
      functools.partial(loss_fn, graphdef, rest, kind),
      batch,
      ts.step_rng(state.extra["seed"], state.step),
      num_micro=num_micro,
      schedule=schedule,
  )


def eval_step(state, batch, *, graphdef, rest):
  """Deterministic head outputs (float32 logits) of one batch."""
  return forward(graphdef, rest, state.params, batch)


# ---------------------------------------------------------------------------- evaluation


def host_rows(batch: dict, mesh, global_batch_size: int) -> dict:
  """This host's rows of a global batch that every host read whole (evaluation)."""
  index, num_shards = sharding.host_data_shard(mesh, global_batch_size)
  size = global_batch_size // num_shards
  return {k: v[index * size : (index + 1) * size] for k, v in batch.items()}


def read_eval_batches(spec, split: str, config) -> list[dict]:
  """Every host's copy of `split` (the first `config.eval.batches` batches if > 0), read once
  per run and shared by the seeds."""
  ds = downstream.get_downstream_dataset(
      spec.name, split, batch_size=config.eval.batch_size, seq_len=config.data.seq_len or None
  )
  batches = []
  for batch in ds.as_numpy_iterator():
    if config.eval.batches and len(batches) >= config.eval.batches:
      break
    batches.append(batch)
  if not batches:
    raise errors.DataError(f"{spec.name}/{split}: no evaluation examples ({spec.description})")
  return batches


def predict(kind: str, batches: list[dict], state, eval_fn, mesh) -> dict[str, np.ndarray]:
  """Head outputs of every row of the batches (padding rows included), gathered on every host."""
  outputs = []
  for batch in batches:
    rows = host_rows(model_batch(batch, kind), mesh, len(batch["valid"]))
    out = eval_fn(state, sharding.global_batch(rows, mesh))
    outputs.append(jax.tree.map(np.asarray, multihost_utils.process_allgather(out, tiled=True)))
  return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}


def score(spec, split: str, outputs: dict, batches: list[dict], config, span_examples=None) -> dict:
  """The task's metrics (percent) of one split's predictions."""
  if spec.kind == "span":
    windows = {k: np.concatenate([b[k] for b in batches]) for k in SPAN_WINDOW_FIELDS}
    seen = {x.decode("utf-8") for x in windows["example_id"][windows["valid"] > 0]}
    examples = (
        span_examples
        if span_examples is not None
        else downstream.get_span_examples(spec.name, split)
    )
    if config.eval.batches:  # a capped evaluation scores the questions it reached
      examples = {q: e for q, e in examples.items() if q in seen}
    result, _ = downstream.evaluate_span_predictions(
        spec.name,
        split,
        windows,
        outputs["start_logits"],
        outputs["end_logits"],
        n_best_size=config.eval.n_best_size,
        max_answer_length=config.eval.max_answer_length,
        null_score_diff_threshold=config.eval.null_score_diff_threshold,
        examples=examples,
    )
    return result
  valid = np.concatenate([b["valid"] for b in batches]) > 0
  targets = gold_labels(batches)
  predictions = outputs["logits"][valid]
  if spec.kind == "regression":
    predictions = predictions[:, 0]
  return spec.metric_fn(targets, predictions, **downstream.eval_fields(spec, batches))


def gold_labels(batches: list[dict]) -> np.ndarray:
  """The labels of the real rows (valid = 1) of evaluation batches."""
  valid = np.concatenate([b["valid"] for b in batches]) > 0
  return np.concatenate([b["label"] for b in batches])[valid]


def majority_baseline(spec, label_counts: np.ndarray, batches: list[dict]) -> dict:
  """The task's metrics when every example gets the training set's most frequent label."""
  targets = gold_labels(batches)
  constant = np.full_like(targets, int(np.argmax(label_counts)))
  return spec.metric_fn(targets, constant, **downstream.eval_fields(spec, batches))


def glue_diagnostics(ax_batches: list[dict], state, eval_fn, config, mesh, out_dir: str) -> dict:
  """An MNLI model on the GLUE diagnostics (glue_ax): `AX.tsv` for the GLUE server in
  `out_dir` and, given the labelled diagnostic-full.tsv, R3 per category as `ax/<category>/r3`."""
  outputs = predict("classification", ax_batches, state, eval_fn, mesh)
  valid = np.concatenate([b["valid"] for b in ax_batches]) > 0
  indices = np.concatenate([b["idx"] for b in ax_batches])[valid]
  labels = outputs["logits"][valid].argmax(-1)
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    metrics_lib.write_glue_ax_predictions(os.path.join(out_dir, "AX.tsv"), indices, labels)
  if not config.eval.glue_diagnostics_file:
    return {}
  breakdown = metrics_lib.glue_diagnostic_breakdown(
      config.eval.glue_diagnostics_file, dict(zip(indices.tolist(), labels.tolist()))
  )
  return {f"ax/{name}/r3": stats["r3"] for name, stats in breakdown.items()}


def evaluate(
    state, eval_fn, *, spec, eval_sets, span_examples, ax_batches, config, mesh, steps, seed_dir
):
  """`eval/<split>/<metric>` on every evaluation split; at the last step an MNLI model also
  predicts the GLUE diagnostics."""
  out = {}
  for split, batches in eval_sets.items():
    outputs = predict(spec.kind, batches, state, eval_fn, mesh)
    examples = span_examples[split] if span_examples else None
    scores = score(spec, split, outputs, batches, config, examples)
    out.update({f"{split}/{k}": float(v) for k, v in scores.items()})
  if ax_batches is not None and int(state.step) == steps:
    out.update(glue_diagnostics(ax_batches, state, eval_fn, config, mesh, seed_dir))
  return {f"eval/{k}": v for k, v in out.items()}


# ---------------------------------------------------------------------------------- runs


def fingerprint(spec, bert_cfg, config) -> dict:
  """What a seed's checkpoint must match to be resumed."""
  return {
      "stage": "finetune",
      "task": spec.name,
      "init": config.init.source,
      **{f"model.{k}": getattr(bert_cfg, k) for k in runs.ARCHITECTURE_KEYS},
  }


def parse_seeds(seeds: str) -> list[int]:
  try:
    out = [int(s) for s in str(seeds).replace(" ", "").split(",") if s]
  except ValueError as e:
    raise errors.DataError(
        f"config.seeds {seeds!r} is not a comma-separated list of integers"
    ) from e
  if not out or len(set(out)) != len(out):
    raise errors.DataError(f"config.seeds {seeds!r} must list distinct seeds, e.g. '1,2,3'")
  return out


class Task(NamedTuple):
  """What every seed's program shares, worked out once per run: the benchmark, the initial
  encoder and its configuration, the optimiser and the number of steps (None when abstract and
  the steps follow from the size of training data not read)."""

  spec: object
  seq_len: int
  seeds: list[int]
  init: runs.InitialEncoder
  bert_cfg: object
  steps: int | None
  warmup_steps: int
  tx: object
  schedule: object
  num_train: int | None
  label_counts: object


def prepare(config, *, abstract: bool = False) -> Task:
  """The run's `Task`; `abstract`: no weights and no training data are read (the encoder's
  architecture is `config.model`'s size)."""
  spec = downstream.register_from_config(config.data)
  if not spec.train_split:
    raise errors.DataError(
        f"{spec.name} has no training split (e.g. glue_ax is scored with an MNLI "
        "model's predictions)"
    )
  if config.eval.glue_ax and spec.name != "glue_mnli":
    raise errors.DataError(f"config.eval.glue_ax scores an MNLI model; the task is {spec.name}")
  seq_len = config.data.seq_len or spec.seq_len
  seeds = parse_seeds(config.seeds)
  if abstract:
    if config.model.size == runs.AUTO_SIZE:
      raise errors.ConfigError(
          "config.model.size 'auto' takes the size from the initial weights, which are not "
          "read here: pass the encoder's size (e.g. size=base)"
      )
    init = runs.InitialEncoder(config.init.source)
    bert_cfg = runs.encoder_config(config.model, runs.InitialEncoder(runs.SCRATCH), config.dtype)
  else:
    init = runs.read_initial_encoder(
        config.init.source, runs.step_or_latest(config.init.step), config.model.num_heads
    )
    bert_cfg = runs.encoder_config(config.model, init, config.dtype)
  vocab_file = config.data.vocab_file or vocab_lib.default_vocab_file()
  vocab_size = len(vocab_lib.read_vocab_file(vocab_file))
  if vocab_size > bert_cfg.vocab_size:
    raise errors.DataError(
        f"the vocabulary has {vocab_size} entries but the encoder only {bert_cfg.vocab_size}"
    )
  num_train, label_counts = None, None
  if not abstract:
    num_train, label_counts = downstream.training_stats(spec, seq_len)
  batch_size = config.train.batch_size
  steps = config.train.steps or (
      None if num_train is None else math.ceil(config.train.epochs * num_train / batch_size)
  )
  opt_cfg = ml_collections.ConfigDict(config.optimizer.to_dict())
  # The schedule's length only sets constants of the step, not its shapes or cost.
  schedule_steps = steps or 1
  opt_cfg.warmup_steps = int(config.optimizer.warmup_fraction * schedule_steps)  # floor
  return Task(
      spec=spec,
      seq_len=seq_len,
      seeds=seeds,
      init=init,
      bert_cfg=bert_cfg,
      steps=steps,
      warmup_steps=opt_cfg.warmup_steps,
      tx=ts.make_optimizer(opt_cfg, schedule_steps),
      schedule=ts.learning_rate_schedule(opt_cfg, schedule_steps),
      num_train=num_train,
      label_counts=label_counts,
  )


def init(
    config, mesh, *, abstract: bool = False, seed: int | None = None, task: Task | None = None
) -> loop.Setup:
  """A fresh head on the initial encoder for `seed` (default: the first of `config.seeds`), its
  optimiser state and steps; `abstract`: shapes and shardings only, no weights read."""
  task = task or prepare(config, abstract=abstract)
  seed = task.seeds[0] if seed is None else seed
  spec = task.spec
  model = sharding.create_sharded(
      lambda: heads.build_head(spec.kind, task.bert_cfg, spec.num_labels, rngs=nnx.Rngs(seed)),
      mesh,
      config.sharding_rules,
      abstract=abstract,
  )
  if not abstract:
    runs.load_encoder(model.bert, task.init)
  graphdef, params, rest = ts.nnx_params(model)
  replicated = sharding.replicated(mesh)
  if abstract:
    params = sharding.on_mesh(params, mesh)
    seed_array = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  else:
    seed_array = jax.device_put(jnp.asarray(seed, jnp.int32), replicated)
  return loop.Setup(
      state=ts.init_train_state(task.tx, params, extra={"seed": seed_array}, abstract=abstract),
      train_step=functools.partial(
          train_step,
          graphdef=graphdef,
          rest=rest,
          kind=spec.kind,
          tx=task.tx,
          schedule=task.schedule,
          num_micro=config.optimizer.grad_accum_steps,
      ),
      eval_step=functools.partial(eval_step, graphdef=graphdef, rest=rest),
  )


def example_batch(config) -> dict[str, jax.ShapeDtypeStruct]:
  """The global training batch of `config.data.task`: token rows ([B, C, L] for multiple
  choice), the labels and `valid`."""
  spec = downstream.register_from_config(config.data)
  b, seq_len = config.train.batch_size, config.data.seq_len or spec.seq_len
  rows = (b, spec.num_labels, seq_len) if spec.kind == "multiple_choice" else (b, seq_len)
  batch = {k: jax.ShapeDtypeStruct(rows, jnp.int32) for k in downstream.MODEL_FEATURES}
  label = jnp.float32 if spec.kind == "regression" else jnp.int32
  for name in LABEL_FEATURES[spec.kind]:
    batch[name] = jax.ShapeDtypeStruct((b,), label)
  batch["valid"] = jax.ShapeDtypeStruct((b,), jnp.int32)
  return batch


def step_flops(config) -> dict[str, float]:
  """The step's analytic FLOPs, term by term (`vidlankd_jax.flops`)."""
  spec = downstream.register_from_config(config.data)
  return flops.finetune_step(
      config, spec.kind, spec.num_labels, config.data.seq_len or spec.seq_len
  )


class EvalData(NamedTuple):
  """The evaluation data every seed shares, read once per run."""

  eval_sets: dict
  span_examples: dict | None
  ax_batches: list | None


def read_eval_data(task: Task, config) -> EvalData:
  spec = task.spec
  eval_sets = {split: read_eval_batches(spec, split, config) for split in spec.eval_splits}
  return EvalData(
      eval_sets=eval_sets,
      span_examples=(
          {split: downstream.get_span_examples(spec.name, split) for split in eval_sets}
          if spec.kind == "span"
          else None
      ),
      ax_batches=(
          read_eval_batches(downstream.get_downstream_spec("glue_ax"), "test", config)
          if config.eval.glue_ax
          else None
      ),
  )


def build(
    config,
    mesh,
    *,
    seed: int | None = None,
    task: Task | None = None,
    eval_data: EvalData | None = None,
    workdir: str = "",
) -> loop.Program:
  """The program of one seed (default: the first): `init`'s state and steps, the task's
  training stream and its evaluation (GLUE diagnostics written under `workdir`/seed_<s>)."""
  task = task or prepare(config)
  seed = task.seeds[0] if seed is None else seed
  eval_data = eval_data or read_eval_data(task, config)
  setup = init(config, mesh, seed=seed, task=task)
  spec = task.spec
  return loop.Program(
      state=setup.state,
      train_step=setup.train_step,
      eval_step=setup.eval_step,
      evaluate=functools.partial(
          evaluate,
          spec=spec,
          eval_sets=eval_data.eval_sets,
          span_examples=eval_data.span_examples,
          ax_batches=eval_data.ax_batches,
          config=config,
          mesh=mesh,
          steps=task.steps,
          seed_dir=os.path.join(workdir, f"seed_{seed}"),
      ),
      train_batches=functools.partial(
          pipeline.downstream_batches,
          spec.name,
          spec.train_split,
          mesh,
          global_batch_size=config.train.batch_size,
          seq_len=task.seq_len,
          seed=seed,
          shuffle_buffer=config.data.shuffle_buffer,
          features=model_features(spec.kind),
      ),
      steps=task.steps,
      batch_size=config.train.batch_size,
      fingerprint=fingerprint(spec, task.bert_cfg, config),
  )


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Fine-tunes `config.data.task` once per seed of `config.seeds` and writes the results."""
  task = prepare(config)
  spec, seeds = task.spec, task.seeds
  batch_size = config.train.batch_size
  console.info(
      f"{spec.name}: {task.num_train} training examples, {task.steps} steps of {batch_size} "
      f"({task.warmup_steps} warmup), seeds {seeds}, init {task.init.source}"
  )

  mesh = sharding.make_mesh(config.mesh)
  eval_data = read_eval_data(task, config)
  if spec.kind in downstream.LABELLED_KINDS:  # span and regression rows have no class label
    for split, batches in eval_data.eval_sets.items():
      downstream.check_labels(spec, split, gold_labels(batches))
  primary = results_lib.primary_metric_name(spec, config.eval.primary_metric)
  baseline = {}
  if task.label_counts is not None:
    for split, batches in eval_data.eval_sets.items():
      scores = majority_baseline(spec, task.label_counts, batches)
      baseline.update({f"{split}/{k}": float(v) for k, v in scores.items()})

  steps_fns = None
  per_seed = {}
  for seed in seeds:
    program = build(config, mesh, seed=seed, task=task, eval_data=eval_data, workdir=workdir)
    if steps_fns is None:  # every seed's model has the same structure: one compiled step
      steps_fns = (program.train_step, program.eval_step)
    program.train_step, program.eval_step = steps_fns
    final = loop.fit(
        program, config, os.path.join(workdir, f"seed_{seed}"), mesh, config_dir=workdir
    )
    per_seed[seed] = {k.removeprefix("eval/"): v for k, v in final.items()}
    if primary not in per_seed[seed]:
      raise errors.UnknownNameError(
          f"config.eval.primary_metric {config.eval.primary_metric!r} is not among "
          f"{spec.name}'s metrics {sorted(per_seed[seed])}"
      )

  summary = results_lib.summarize(per_seed)
  results = {
      "task": spec.name,
      "kind": spec.kind,
      "init": task.init.source,
      "seeds": seeds,
      "encoder": {k: getattr(task.bert_cfg, k) for k in runs.ARCHITECTURE_KEYS},
      "train_examples": task.num_train,
      "train_steps": task.steps,
      "batch_size": batch_size,
      "learning_rate": config.optimizer.learning_rate,
      "warmup_steps": task.warmup_steps,
      "seq_len": task.seq_len,
      "eval_splits": list(spec.eval_splits),
      "primary_metric": primary,
      "per_seed": {str(s): m for s, m in per_seed.items()},
      "summary": summary,
      "majority_baseline": baseline,
  }
  results_lib.write_results(workdir, results)
  console.info(results_lib.results_markdown(results))
  return {
      f"{name}/{stat}": stats[stat] for name, stats in summary.items() for stat in ("mean", "std")
  }
