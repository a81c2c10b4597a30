"""Registration of the downstream benchmarks of the paper's evaluation protocol.

Task                 kind             source
glue_<name>          classification   TFDS glue/<name> (cola sst2 mrpc qqp mnli qnli rte wnli)
glue_stsb            regression       TFDS glue/stsb
glue_ax              classification   TFDS glue/ax (test only, unlabelled; score an MNLI model)
squad_v1 / squad_v2  span             TFDS squad/v1.1, squad/v2.0
swag                 multiple_choice  train.csv / val.csv / test.csv in swag_dir
piqa                 multiple_choice  TFDS piqa
tracie_iid           classification   {tracie_dir}/iid/tracie_{train,test}.txt
tracie_uniform_prior classification   {tracie_dir}/uniform-prior/...
"""

from __future__ import annotations

import importlib
from typing import Mapping

import tensorflow as tf

from vidlankd_jax.data import vocab as vocab_lib
from vidlankd_jax.data.downstream import registry, sources
from vidlankd_jax.data.downstream.registry import DownstreamSpec
from vidlankd_jax.evaluation import metrics

GLUE_VERSION, SQUAD_VERSION, PIQA_VERSION = "2.0.0", "3.0.0", "1.0.0"

# GLUE task -> (text fields, label names or None for regression)
GLUE_TASKS: dict[str, tuple[tuple[str, ...], tuple[str, ...] | None]] = {
    "cola": (("sentence",), ("unacceptable", "acceptable")),
    "sst2": (("sentence",), ("negative", "positive")),
    "mrpc": (("sentence1", "sentence2"), ("not_equivalent", "equivalent")),
    "stsb": (("sentence1", "sentence2"), None),
    "qqp": (("question1", "question2"), ("not_duplicate", "duplicate")),
    "mnli": (("premise", "hypothesis"), metrics.MNLI_LABELS),
    "qnli": (("question", "sentence"), ("entailment", "not_entailment")),
    "rte": (("sentence1", "sentence2"), ("entailment", "not_entailment")),
    "wnli": (("sentence1", "sentence2"), ("not_entailment", "entailment")),
    "ax": (("premise", "hypothesis"), metrics.MNLI_LABELS),
}

# Default max tokens per row, [CLS]/[SEP] included: the released scripts' (configs/finetune.py
# sets the same; docs/recipe.md).
DEFAULT_SEQ_LEN = {"glue": 126, "squad": 384, "swag": 80, "piqa": 126, "tracie": 126}


def glue_formatter(text_fields: tuple[str, ...]):
  """A GLUE record -> text_a, [text_b], label, idx."""

  def fmt(ex):
    out = {"text_a": ex[text_fields[0]], "label": ex["label"], "idx": ex["idx"]}
    if len(text_fields) == 2:
      out["text_b"] = ex[text_fields[1]]
    return out

  return fmt


def squad_formatter(ex):
  """A TFDS SQuAD record -> the span fields (the first answer is the training label)."""
  return {
      "example_id": ex["id"],
      "question": ex["question"],
      "context": ex["context"],
      "answer_text": ex["answers"]["text"],
      "answer_start": ex["answers"]["answer_start"],
  }


def swag_formatter(ex):
  """SWAG: context sent1; each choice is sent2 followed by one ending."""
  return {
      "context": ex["sent1"],
      "choices": tf.strings.join([ex["sent2"], ex["endings"]], separator=" "),
      "label": ex["label"],
  }


def piqa_formatter(ex):
  """PIQA: context goal; choices sol1, sol2."""
  return {
      "context": ex["goal"],
      "choices": tf.stack([ex["sol1"], ex["sol2"]]),
      "label": ex["label"],
  }


def tracie_formatter(ex):
  """TRACIE: premise story, hypothesis the temporal statement; keeps its category and story."""
  return {
      "text_a": ex["story"],
      "text_b": ex["hypothesis"],
      "label": ex["label"],
      "hypothesis_type": ex["hypothesis_type"],
      "story_id": ex["story_id"],
  }


def _glue_spec(name: str, data_dir: str | None, seq_len: int) -> DownstreamSpec:
  fields, labels = GLUE_TASKS[name]
  if name == "mnli":
    evals, tests = ("validation_matched", "validation_mismatched"), (
        "test_matched",
        "test_mismatched",
    )
  elif name == "ax":
    evals, tests = (), ("test",)
  else:
    evals, tests = ("validation",), ("test",)
  train = None if name == "ax" else "train"
  tfds_name = f"glue/{name}:{GLUE_VERSION}"
  return DownstreamSpec(
      name=f"glue_{name}",
      kind="regression" if labels is None else "classification",
      num_labels=1 if labels is None else len(labels),
      metric_fn=metrics.GLUE_METRICS[name],
      source=sources.TfdsSource(tfds_name, data_dir, ((train,) if train else ()) + evals + tests),
      formatter=glue_formatter(fields),
      description=f"TFDS {tfds_name}",
      seq_len=seq_len,
      train_split=train,
      eval_splits=evals,
      test_splits=tests,
      label_names=labels or (),
  )


def protocol_specs(
    data_dir: str | None = None,
    swag_dir: str | None = None,
    tracie_dir: str | None = None,
    seq_len: int | Mapping[str, int] | None = None,
    *,
    doc_stride: int = 128,
    max_query_length: int = 64,
) -> list[DownstreamSpec]:
  """The specs of all benchmarks of the protocol, reading data from the given places."""

  def length(task: str, family: str) -> int:
    if isinstance(seq_len, Mapping):
      return int(seq_len.get(task, DEFAULT_SEQ_LEN[family]))
    return int(seq_len or DEFAULT_SEQ_LEN[family])

  specs = [_glue_spec(name, data_dir, length(f"glue_{name}", "glue")) for name in GLUE_TASKS]
  for version, tfds_config, metric, v2 in (
      ("v1", "v1.1", metrics.squad_v1_metrics, False),
      ("v2", "v2.0", metrics.squad_v2_metrics, True),
  ):
    tfds_name = f"squad/{tfds_config}:{SQUAD_VERSION}"
    specs.append(
        DownstreamSpec(
            name=f"squad_{version}",
            kind="span",
            num_labels=2,
            metric_fn=metric,
            source=sources.TfdsSource(tfds_name, data_dir, ("train", "validation")),
            formatter=squad_formatter,
            description=f"TFDS {tfds_name}",
            seq_len=length(f"squad_{version}", "squad"),
            doc_stride=doc_stride,
            max_query_length=max_query_length,
            version_2_with_negative=v2,
        )
    )
  specs.append(
      DownstreamSpec(
          name="swag",
          kind="multiple_choice",
          num_labels=sources.SWAG_NUM_CHOICES,
          metric_fn=metrics.multiple_choice_accuracy,
          source=sources.swag_source(swag_dir),
          formatter=swag_formatter,
          description=f"SWAG CSVs ({', '.join(sources.SWAG_FILES.values())}) in {swag_dir}",
          seq_len=length("swag", "swag"),
          test_splits=("test",),
      )
  )
  piqa_name = f"piqa:{PIQA_VERSION}"
  specs.append(
      DownstreamSpec(
          name="piqa",
          kind="multiple_choice",
          num_labels=2,
          metric_fn=metrics.multiple_choice_accuracy,
          source=sources.TfdsSource(piqa_name, data_dir, ("train", "validation")),
          formatter=piqa_formatter,
          description=f"TFDS {piqa_name}",
          seq_len=length("piqa", "piqa"),
      )
  )
  for setting in sources.TRACIE_FILES:
    specs.append(
        DownstreamSpec(
            name=f"tracie_{setting}",
            kind="classification",
            num_labels=len(sources.TRACIE_LABELS),
            metric_fn=metrics.tracie_metrics,
            source=sources.tracie_source(tracie_dir, setting),
            formatter=tracie_formatter,
            description=f"TRACIE {setting} files in {tracie_dir}",
            seq_len=length(f"tracie_{setting}", "tracie"),
            eval_splits=("test",),
            label_names=sources.TRACIE_LABELS,
            metric_fields=("hypothesis_type", "story_id"),
        )
    )
  return specs


def register_downstream_tasks(
    vocab_file: str | None = None,
    data_dir: str | None = None,
    swag_dir: str | None = None,
    tracie_dir: str | None = None,
    seq_len: int | Mapping[str, int] | None = None,
    *,
    lower_case: bool = True,
    doc_stride: int = 128,
    max_query_length: int = 64,
) -> dict[str, DownstreamSpec]:
  """Registers (again, if called again) every downstream benchmark as a seqio task.

  vocab_file: WordPiece vocab.txt (default: bert-base-uncased's). data_dir: TFDS data folder
  (None: TFDS's default). swag_dir / tracie_dir: folders of the released files. seq_len:
  one length for all tasks, or {task name: length} overriding the defaults. Nothing is read
  until a dataset is requested; missing data then raises an error saying how to get it.
  """
  vocab = vocab_lib.WordPieceVocabulary(
      vocab_file or vocab_lib.default_vocab_file(), lower_case=lower_case
  )
  specs = protocol_specs(
      data_dir,
      swag_dir,
      tracie_dir,
      seq_len,
      doc_stride=doc_stride,
      max_query_length=max_query_length,
  )
  for spec in specs:
    registry.register_benchmark(spec, vocab)
  return {spec.name: spec for spec in specs}


def register_from_config(data_cfg) -> DownstreamSpec:
  """Registers the protocol's benchmarks (and `data_cfg.benchmarks_module`'s) -> the task's spec.

  A benchmarks module defines `register_benchmarks(vocab, data_config)`, which calls
  `register_benchmark(spec, vocab)` for each benchmark it adds.
  """
  vocab_file = data_cfg.vocab_file or vocab_lib.default_vocab_file()
  register_downstream_tasks(
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
  return registry.get_downstream_spec(data_cfg.task)
