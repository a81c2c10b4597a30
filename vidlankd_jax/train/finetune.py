"""Fine-tuning on the downstream benchmarks: one loop for every task kind, several seeds a run.

  python -m vidlankd_jax.main --config=configs/finetune.py:task=sst2,init=runs/student \
      --config.seeds=1,2,3 --workdir=runs/finetune/sst2

The initial encoder is `config.init.source`: "scratch", "hf:<dir>" (a Hugging Face BERT
directory) or a teacher/student workdir (or its checkpoints/ folder), whose language BERT is
`params["language"]["bert"]`. Each seed fine-tunes a fresh head on that encoder and is scored on
the task's evaluation splits by the task's metric function; `<workdir>/results.json` holds every
seed's metrics with their mean and spread, `<workdir>/results.md` the task's table row.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import seqio
import tensorflow as tf
from absl import logging
from etils import epath
from flax import nnx, traverse_util
from jax.experimental import multihost_utils

from vidlankd_jax import checkpoint as ckpt_lib
from vidlankd_jax import sharding
from vidlankd_jax.data import downstream
from vidlankd_jax.data import vocab as vocab_lib
from vidlankd_jax.evaluation import metrics as metrics_lib
from vidlankd_jax.interop import hf_bert
from vidlankd_jax.models import heads
from vidlankd_jax.models.bert import BertConfig
from vidlankd_jax.train import common

HF_PREFIX = "hf:"
SCRATCH = "scratch"
AUTO_SIZE = "auto"
# What fixes the shape of the encoder's weights (the rest of BertConfig is free to differ).
ARCHITECTURE_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
)
LABEL_FEATURES = {
    "classification": ("label",),
    "regression": ("label",),
    "multiple_choice": ("label",),
    "span": ("start_position", "end_position"),
}
SPAN_WINDOW_FIELDS = ("example_id", "offset_start", "offset_end", "token_is_max_context", "valid")


# ------------------------------------------------------------------------------ benchmarks


def register_benchmarks(data_cfg) -> downstream.DownstreamSpec:
  """Registers the protocol's benchmarks (and `data_cfg.benchmarks_module`'s) -> the task's spec.

  A benchmarks module defines `register_benchmarks(vocab, data_config)`, which calls
  `downstream.register_benchmark(spec, vocab)` for each benchmark it adds.
  """
  vocab_file = data_cfg.vocab_file or vocab_lib.default_vocab_file()
  downstream.register_downstream_tasks(
      vocab_file,
      data_dir=data_cfg.data_dir or None,
      swag_dir=data_cfg.swag_dir or None,
      tracie_dir=data_cfg.tracie_dir or None,
      lower_case=data_cfg.lower_case,
      doc_stride=data_cfg.doc_stride,
      max_query_length=data_cfg.max_query_length,
  )
  if data_cfg.benchmarks_module:
    module = importlib.import_module(data_cfg.benchmarks_module)
    if not hasattr(module, "register_benchmarks"):
      raise AttributeError(
          f"config.data.benchmarks_module {data_cfg.benchmarks_module!r} has no "
          "register_benchmarks(vocab, data_config) function"
      )
    module.register_benchmarks(
        vocab_lib.WordPieceVocabulary(vocab_file, data_cfg.lower_case), data_cfg
    )
  return downstream.get_downstream_spec(data_cfg.task)


def train_label_stats(
    spec: downstream.DownstreamSpec, seq_len: int
) -> tuple[int, np.ndarray | None]:
  """(training examples, label counts or None) of the train split.

  Span tasks count their context windows (what a training step consumes); the others count raw
  records, reading labels through the task's formatter without tokenizing.
  """
  if spec.kind == "span":
    ds = downstream.get_downstream_dataset(
        spec.name, spec.train_split, batch_size=256, seq_len=seq_len
    )
    return (
        int(ds.reduce(np.int64(0), lambda n, b: n + tf.reduce_sum(tf.cast(b["valid"], tf.int64)))),
        None,
    )
  ds = spec.source.get_dataset(split=spec.train_split, shuffle=False).map(spec.formatter)
  if spec.kind == "regression":
    return int(ds.reduce(np.int64(0), lambda n, _: n + 1)), None
  counts = ds.reduce(
      tf.zeros([spec.num_labels], tf.int64),
      lambda c, ex: c + tf.one_hot(tf.cast(ex["label"], tf.int32), spec.num_labels, dtype=tf.int64),
  )
  counts = np.asarray(counts)
  return int(counts.sum()), counts


# ---------------------------------------------------------------------------- initial weights


@dataclasses.dataclass
class InitialEncoder:
  """Where the encoder's weights come from, their architecture and (unless scratch) the weights."""

  source: str
  architecture: dict | None = None
  params: dict | None = None  # flat "embeddings/word_embeddings/embedding" -> numpy array
  hf_state: dict | None = None  # a Hugging Face state dict (hf:<dir>)


def checkpoint_dirs(path: str) -> tuple[str, str]:
  """(Orbax manager directory, run workdir) of a workdir or of its checkpoints/ folder."""
  path = epath.Path(path.rstrip("/"))  # local folders and gs:// buckets alike
  if (path / "checkpoints").is_dir():
    return str(path / "checkpoints"), str(path)
  return str(path), str(path.parent)


def architecture_from_params(bert: dict, where: str) -> dict:
  """Encoder sizes read off the array shapes (all but the number of heads)."""
  try:
    vocab, hidden = bert["embeddings/word_embeddings/embedding"].shape
    layers = sorted({int(k.split("/")[2]) for k in bert if k.startswith("encoder/layers/")})
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_layers": len(layers),
        "intermediate_size": bert["encoder/layers/0/intermediate/kernel"].shape[1],
        "max_position_embeddings": bert["embeddings/position_embeddings/embedding"].shape[0],
        "type_vocab_size": bert["embeddings/token_type_embeddings/embedding"].shape[0],
    }
  except KeyError as e:
    raise ValueError(f"{where}: the language encoder lacks {e}; is this a BERT checkpoint?") from e


def heads_from_saved_config(workdir: str, shapes: dict) -> int | None:
  """num_heads in the run's config.json (`model`: the teacher's or student's language BERT),
  if that config describes weights of these `shapes`."""
  path = epath.Path(workdir) / "config.json"
  if not path.is_file():
    return None
  model = json.loads(path.read_text()).get("model", {})
  if all(model.get(k) == shapes[k] for k in ("hidden_size", "num_layers", "intermediate_size")):
    return int(model["num_heads"])
  return None


def read_initial_encoder(init_cfg, default_heads: int) -> InitialEncoder:
  """Reads the weights `init_cfg.source` names, and their architecture."""
  source = init_cfg.source
  if source == SCRATCH:
    return InitialEncoder(source)
  if source.startswith(HF_PREFIX):
    model_dir = source[len(HF_PREFIX) :]
    arch = {k: getattr(hf_bert.read_config(model_dir), k) for k in ARCHITECTURE_KEYS}
    return InitialEncoder(source, arch, hf_state=hf_bert.read_state_dict(model_dir))
  manager_dir, workdir = checkpoint_dirs(source)
  if not epath.Path(manager_dir).is_dir():
    raise FileNotFoundError(
        f"config.init.source {source!r}: no such directory; expected 'scratch', "
        "'hf:<Hugging Face BERT dir>' or a teacher/student workdir"
    )
  step = None if init_cfg.step < 0 else int(init_cfg.step)
  params = ckpt_lib.restore_params_numpy(manager_dir, step)
  if "language" not in params or "bert" not in params["language"]:
    raise ValueError(
        f"{manager_dir}: the checkpoint's params have no language/bert encoder "
        f"(top-level keys: {sorted(params)})"
    )
  bert = traverse_util.flatten_dict(params["language"]["bert"], sep="/")
  arch = architecture_from_params(bert, manager_dir)
  num_heads = heads_from_saved_config(workdir, arch)
  if num_heads is None:
    logging.warning(
        "%s has no config.json matching its weights: assuming %d attention heads",
        workdir,
        default_heads,
    )
  arch["num_heads"] = default_heads if num_heads is None else num_heads
  return InitialEncoder(source, arch, params=bert)


def encoder_config(model_cfg, init: InitialEncoder) -> BertConfig:
  """The fine-tuned encoder's BertConfig: config.model, with the initial weights' architecture.

  With `config.model.size == "auto"` the architecture is the weights'; with a named size it must
  equal theirs, else a ValueError lists each difference.
  """
  cfg = BertConfig.from_config(model_cfg)
  if init.architecture is None:
    if model_cfg.size == AUTO_SIZE:
      raise ValueError(
          "config.model.size 'auto' takes the size from the initial weights, but "
          "config.init.source is 'scratch': pass a size (e.g. size=small)"
      )
    return cfg
  if model_cfg.size != AUTO_SIZE:
    diffs = [
        f"{k}: weights {init.architecture[k]} vs config {getattr(cfg, k)}"
        for k in ARCHITECTURE_KEYS
        if init.architecture[k] != getattr(cfg, k)
    ]
    if diffs:
      raise ValueError(
          f"config.model (size={model_cfg.size}) does not match the encoder in "
          f"{init.source}:\n  "
          + "\n  ".join(diffs)
          + "\nuse size=auto to take the size from the weights"
      )
  return dataclasses.replace(cfg, **init.architecture)


def load_encoder(bert: nnx.Module, init: InitialEncoder) -> None:
  """Copies the initial weights into `bert` (a BertModel) in place, keeping its shardings."""
  if init.hf_state is not None:
    hf_bert.load_state_dict(bert, init.hf_state)
    return
  if init.params is None:
    return
  for path, var in nnx.to_flat_state(nnx.state(bert, nnx.Param)):
    key = "/".join(map(str, path))
    if key not in init.params:
      raise ValueError(f"{init.source}: the checkpoint's language encoder lacks {key}")
    value, current = init.params[key], var.get_value()
    if tuple(value.shape) != tuple(current.shape):
      raise ValueError(f"{init.source}: {key} has shape {value.shape}, the model {current.shape}")
    var.set_value(jax.device_put(jnp.asarray(value, current.dtype), current.sharding))


# ---------------------------------------------------------------------------------- steps


def model_batch(batch: dict, kind: str) -> dict:
  """The arrays a step reads (model inputs, labels, `valid`); strings and bookkeeping stay home."""
  names = downstream.MODEL_FEATURES + LABEL_FEATURES[kind] + ("valid",)
  return {k: batch[k] for k in names}


def forward(graphdef, rest, params, batch, rngs=None) -> dict:
  model = nnx.merge(graphdef, params, rest)
  return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], rngs=rngs)


def train_step(state, batch, seed, *, graphdef, rest, kind, tx, schedule, num_micro):
  """One AdamW step on the task loss (dropout keyed by seed and step); non-finite steps skip."""

  def loss_fn(params, micro_batch, rng):
    outputs = forward(graphdef, rest, params, micro_batch, nnx.Rngs(dropout=rng))
    loss, aux = heads.task_loss(kind, outputs, micro_batch)
    return loss, {"loss": loss, **aux}

  grads, metrics = common.accumulated_grads(
      loss_fn, state.params, batch, common.step_rng(seed, state.step), num_micro
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


def eval_step(params, batch, *, graphdef, rest):
  """Deterministic head outputs (float32 logits) of one batch."""
  return forward(graphdef, rest, params, batch)


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
    raise ValueError(f"{spec.name}/{split}: no evaluation examples ({spec.description})")
  return batches


def predict(kind: str, batches: list[dict], params, eval_fn, mesh) -> dict[str, np.ndarray]:
  """Head outputs of every row of the batches (padding rows included), gathered on every host."""
  outputs = []
  for batch in batches:
    rows = host_rows(model_batch(batch, kind), mesh, len(batch["valid"]))
    out = eval_fn(params, sharding.global_batch(rows, mesh))
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


def evaluate(
    spec,
    eval_sets: dict[str, list[dict]],
    params,
    eval_fn,
    config,
    mesh,
    span_examples: dict | None = None,
) -> dict:
  """Metrics on every evaluation split, keyed `<split>/<metric>`."""
  out = {}
  for split, batches in eval_sets.items():
    outputs = predict(spec.kind, batches, params, eval_fn, mesh)
    examples = span_examples[split] if span_examples else None
    out.update(
        {
            f"{split}/{k}": float(v)
            for k, v in score(spec, split, outputs, batches, config, examples).items()
        }
    )
  return out


def glue_diagnostics(ax_batches: list[dict], params, eval_fn, config, mesh, out_dir: str) -> dict:
  """An MNLI model on the GLUE diagnostics (glue_ax): `AX.tsv` for the GLUE server in
  `out_dir` and, given the labelled diagnostic-full.tsv, R3 per category as `ax/<category>/r3`."""
  outputs = predict("classification", ax_batches, params, eval_fn, mesh)
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


# ------------------------------------------------------------------------------- results


def summarize(per_seed: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
  """Mean and sample standard deviation (0 for one seed) of each metric over seeds."""
  names = sorted(set().union(*(m.keys() for m in per_seed.values())))
  out = {}
  for name in names:
    values = np.asarray([m[name] for m in per_seed.values() if name in m], np.float64)
    out[name] = {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "n": len(values),
    }
  return out


def format_cell(stats: dict | None) -> str:
  """'mean ± std' with one decimal (metrics are percentages); the mean alone for one seed;
  '-' when missing."""
  if not stats or stats.get("mean") is None:
    return "-"
  if stats.get("n", 0) < 2 or stats.get("std") is None:
    return f"{stats['mean']:.1f}"
  return f"{stats['mean']:.1f} ± {stats['std']:.1f}"


def primary_metric_name(spec, primary: str) -> str:
  """`<first eval split>/<primary>`: the metric a comparison table shows for the task."""
  return f"{spec.eval_splits[0]}/{primary}" if spec.eval_splits else primary


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def results_markdown(results: dict) -> str:
  """The task's table: one row, a column per metric (mean ± std over seeds)."""
  names = list(results["summary"])
  header = ["task", "init", "seeds"] + names
  row = [results["task"], results["init"], str(len(results["seeds"]))]
  row += [format_cell(results["summary"][n]) for n in names]
  if results.get("majority_baseline"):
    header.append("majority baseline")
    row.append(f"{results['majority_baseline'].get(results['primary_metric'], float('nan')):.1f}")
  return markdown_table(header, [row])


def comparison_table(results: dict[str, dict[str, dict]], tasks: list[str]) -> str:
  """Rows: initial checkpoints; columns: tasks' primary metrics; cells mean ± std over seeds.

  `results[name][task]` is a results.json dict (missing runs show '-').
  """
  header, rows = ["init"], []
  for task in tasks:
    any_run = next((r[task] for r in results.values() if task in r), None)
    header.append(f"{task} ({any_run['primary_metric']})" if any_run else task)
  for name, by_task in results.items():
    rows.append(
        [name]
        + [
            format_cell(by_task[t]["summary"].get(by_task[t]["primary_metric"]))
            if t in by_task
            else "-"
            for t in tasks
        ]
    )
  return markdown_table(header, rows)


def json_safe(tree):
  """NaN (e.g. a metric over an empty subset) -> None, so results.json stays strict JSON."""
  if isinstance(tree, dict):
    return {k: json_safe(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return [json_safe(v) for v in tree]
  return None if isinstance(tree, float) and math.isnan(tree) else tree


def write_results(workdir: str, results: dict) -> None:
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir)  # local folders and gs:// buckets alike
  path.mkdir(parents=True, exist_ok=True)
  (path / "results.json").write_text(
      json.dumps(json_safe(results), indent=2, sort_keys=True, allow_nan=False)
  )
  (path / "results.md").write_text(results_markdown(results))


# ---------------------------------------------------------------------------------- loop


def parse_seeds(seeds: str) -> list[int]:
  try:
    out = [int(s) for s in str(seeds).replace(" ", "").split(",") if s]
  except ValueError as e:
    raise ValueError(f"config.seeds {seeds!r} is not a comma-separated list of integers") from e
  if not out or len(set(out)) != len(out):
    raise ValueError(f"config.seeds {seeds!r} must list distinct seeds, e.g. '1,2,3'")
  return out


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Fine-tunes `config.data.task` once per seed of `config.seeds` and writes the results."""
  spec = register_benchmarks(config.data)
  if not spec.train_split:
    raise ValueError(
        f"{spec.name} has no training split (e.g. glue_ax is scored with an MNLI "
        "model's predictions)"
    )
  if config.eval.glue_ax and spec.name != "glue_mnli":
    raise ValueError(f"config.eval.glue_ax scores an MNLI model; the task is {spec.name}")
  seq_len = config.data.seq_len or spec.seq_len
  seeds = parse_seeds(config.seeds)
  init = read_initial_encoder(config.init, config.model.num_heads)
  bert_cfg = encoder_config(config.model, init)
  vocab_size = len(
      vocab_lib.read_vocab_file(config.data.vocab_file or vocab_lib.default_vocab_file())
  )
  if vocab_size > bert_cfg.vocab_size:
    raise ValueError(
        f"the vocabulary has {vocab_size} entries but the encoder only {bert_cfg.vocab_size}"
    )

  num_train, label_counts = train_label_stats(spec, seq_len)
  batch_size = config.train.batch_size
  steps = config.train.steps or math.ceil(config.train.epochs * num_train / batch_size)
  opt_cfg = ml_collections.ConfigDict(config.optimizer.to_dict())
  opt_cfg.warmup_steps = int(round(config.optimizer.warmup_fraction * steps))
  tx = common.make_optimizer(opt_cfg, steps)
  schedule = common.learning_rate_schedule(opt_cfg, steps)
  print(
      f"{spec.name}: {num_train} training examples, {steps} steps of {batch_size} "
      f"({opt_cfg.warmup_steps} warmup), seeds {seeds}, init {init.source}",
      flush=True,
  )

  mesh = sharding.make_mesh(config.mesh)
  shard_index, num_shards = sharding.host_data_shard(mesh, batch_size)
  batch_sh = sharding.batch_sharding(mesh)
  eval_sets = {split: read_eval_batches(spec, split, config) for split in spec.eval_splits}
  span_examples = (
      {split: downstream.get_span_examples(spec.name, split) for split in eval_sets}
      if spec.kind == "span"
      else None
  )
  ax_batches = (
      read_eval_batches(downstream.get_downstream_spec("glue_ax"), "test", config)
      if config.eval.glue_ax
      else None
  )
  primary = primary_metric_name(spec, config.eval.primary_metric)
  baseline = (
      {}
      if label_counts is None
      else {
          f"{split}/{k}": float(v)
          for split, batches in eval_sets.items()
          for k, v in majority_baseline(spec, label_counts, batches).items()
      }
  )
  step_fn = eval_fn = None
  per_seed = {}
  for seed in seeds:
    model = sharding.create_sharded(
        lambda: heads.build_head(spec.kind, bert_cfg, spec.num_labels, rngs=nnx.Rngs(seed)),
        mesh,
        config.sharding_rules,
    )
    load_encoder(model.bert, init)
    graphdef, params, rest = common.nnx_params(model)
    state = common.init_train_state(tx, params)
    if step_fn is None:  # every seed's model has the same structure: compile once
      state_sh = sharding.state_shardings(state)
      step_fn = jax.jit(
          functools.partial(
              train_step,
              graphdef=graphdef,
              rest=rest,
              kind=spec.kind,
              tx=tx,
              schedule=schedule,
              num_micro=config.optimizer.grad_accum_steps,
          ),
          in_shardings=(state_sh, batch_sh, sharding.replicated(mesh)),
          out_shardings=(state_sh, None),
          donate_argnums=0,
      )
      eval_fn = jax.jit(
          functools.partial(eval_step, graphdef=graphdef, rest=rest),
          in_shardings=(state_sh.params, batch_sh),
      )

    seed_dir = os.path.join(workdir, f"seed_{seed}")
    writer = common.MetricsWriter(seed_dir)
    meter = common.ProgressMeter(steps, batch_size)
    batches = downstream.get_downstream_dataset(
        spec.name,
        spec.train_split,
        batch_size=batch_size // num_shards,
        seq_len=seq_len,
        shuffle=True,
        seed=seed,
        repeat=True,
        shuffle_buffer_size=config.data.shuffle_buffer,
        shard_info=seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None,
    ).as_numpy_iterator()
    seed_arr = jnp.asarray(seed, jnp.int32)
    try:
      for step in range(steps):
        host_batch = model_batch(next(batches), spec.kind)
        state, metrics = step_fn(state, sharding.global_batch(host_batch, mesh), seed_arr)
        done = step + 1
        if config.train.on_nonfinite == "stop" or done % config.train.log_every == 0:
          common.check_finite(done, jax.device_get(metrics), config.train.on_nonfinite)
        if done % config.train.log_every == 0 or done == steps:
          writer.write(
              done,
              {f"train/{k}": v for k, v in jax.device_get(metrics).items()}
              | {f"train/{k}": v for k, v in meter.update(done).items()},
          )
        elif step == 0:
          meter.update(done)
        if config.eval.every_steps and done % config.eval.every_steps == 0 and done < steps:
          writer.write(
              done,
              {
                  f"eval/{k}": v
                  for k, v in evaluate(
                      spec, eval_sets, state.params, eval_fn, config, mesh, span_examples
                  ).items()
              },
          )
      per_seed[seed] = evaluate(spec, eval_sets, state.params, eval_fn, config, mesh, span_examples)
      if primary not in per_seed[seed]:
        raise KeyError(
            f"config.eval.primary_metric {config.eval.primary_metric!r} is not among "
            f"{spec.name}'s metrics {sorted(per_seed[seed])}"
        )
      if ax_batches is not None:
        per_seed[seed].update(
            glue_diagnostics(ax_batches, state.params, eval_fn, config, mesh, seed_dir)
        )
      writer.write(steps, {f"eval/{k}": v for k, v in per_seed[seed].items()})
    finally:
      writer.close()

  summary = summarize(per_seed)
  results = {
      "task": spec.name,
      "kind": spec.kind,
      "init": init.source,
      "seeds": seeds,
      "encoder": {k: getattr(bert_cfg, k) for k in ARCHITECTURE_KEYS},
      "train_examples": num_train,
      "train_steps": steps,
      "batch_size": batch_size,
      "learning_rate": config.optimizer.learning_rate,
      "warmup_steps": opt_cfg.warmup_steps,
      "seq_len": seq_len,
      "eval_splits": list(spec.eval_splits),
      "primary_metric": primary,
      "per_seed": {str(s): m for s, m in per_seed.items()},
      "summary": summary,
      "majority_baseline": baseline,
  }
  write_results(workdir, results)
  print(results_markdown(results), flush=True)
  return {
      f"{name}/{stat}": stats[stat] for name, stats in summary.items() for stat in ("mean", "std")
  }
