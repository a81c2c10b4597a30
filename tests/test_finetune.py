"""Fine-tuning loop end to end at tiny size: one task of each kind, seeds, initial weights, tables."""

import csv
import json
import os
import signal
import sys

import jax
import numpy as np
import pytest

import tensorflow_datasets as tfds

from vidlankd_jax import checkpoint as ckpt_lib
from vidlankd_jax import configlib
from vidlankd_jax import main as main_lib
from vidlankd_jax import runs
from vidlankd_jax import sharding
from vidlankd_jax.data import downstream
from vidlankd_jax.train import finetune
from vidlankd_jax.train import loop

from support import multihost_worker as worker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACIE_DIR = os.path.join(os.path.dirname(REPO), "shared", "data", "tracie")
pytestmark = pytest.mark.slow  # end-to-end fine-tuning runs, one in a subprocess


def tiny_config(task, init="scratch", size="tiny", **overrides):
  """A tiny config of a few steps on short rows and a capped evaluation."""
  config = configlib.load("finetune", f"task={task},size={size},init={init}")
  config.seeds = "1"
  config.train.steps = 2
  config.train.batch_size = 8
  config.train.log_every = 1
  config.eval.batch_size = 16
  config.eval.batches = 2
  for key, value in overrides.items():
    section, name = key.split("__")
    config[section][name] = value
  return config


def run(config, workdir):
  """Runs the stage as `vidlankd_jax.main` does; returns (returned metrics, results.json)."""
  metrics = main_lib.run(config, str(workdir))
  with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
    return metrics, json.load(f)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tracie_run(tmp_path_factory):
  """Classification on the real TRACIE files, two seeds."""
  if not os.path.isdir(TRACIE_DIR):
    pytest.skip(f"the TRACIE release files are not in {TRACIE_DIR}")
  config = tiny_config("tracie", data__tracie_dir=TRACIE_DIR, data__seq_len=48)
  config.seeds = "1,2"
  config.train.steps = 3
  workdir = tmp_path_factory.mktemp("tracie")
  return (workdir, *run(config, workdir))


@pytest.fixture(scope="module")
def squad_run(tmp_path_factory):
  """Span extraction on TFDS mock SQuAD v1.1."""
  workdir = tmp_path_factory.mktemp("squad")
  with tfds.testing.mock_data(num_examples=24):
    return (workdir, *run(tiny_config("squad_v1"), workdir))


def write_swag_csv(path, n, seed):
  rng = np.random.default_rng(seed)
  words = ["the", "man", "woman", "walks", "runs", "dog", "ball", "park", "kitchen", "cooks"]
  say = lambda k: " ".join(rng.choice(words, k))
  with open(path, "w", encoding="utf-8", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(
        [
            "video-id",
            "fold-ind",
            "startphrase",
            "sent1",
            "sent2",
            "gold-source",
            "ending0",
            "ending1",
            "ending2",
            "ending3",
            "label",
        ]
    )
    for i in range(n):
      writer.writerow(
          [
              f"v{i}",
              i,
              "",
              say(6),
              say(2),
              "gold",
              say(4),
              say(4),
              say(4),
              say(4),
              int(rng.integers(0, 4)),
          ]
      )


@pytest.fixture(scope="module")
def swag_run(tmp_path_factory):
  """Multiple choice (4 endings) on SWAG-format CSVs."""
  data = tmp_path_factory.mktemp("swag_data")
  write_swag_csv(data / "train.csv", 20, 0)
  write_swag_csv(data / "val.csv", 12, 1)
  workdir = tmp_path_factory.mktemp("swag")
  return (workdir, *run(swag_config(data), workdir), data)


def swag_config(data_dir):
  """Two seeds of six steps (the uninterrupted reference of the resume test)."""
  config = tiny_config("swag", data__swag_dir=str(data_dir))
  config.seeds = "1,2"
  config.train.steps = 6
  config.checkpoint.every_steps = 2
  return config


@pytest.fixture(scope="module")
def teacher_workdir(tmp_path_factory):
  """A tiny teacher-stage workdir: an Orbax checkpoint of the teacher and its config.json."""
  from flax import nnx

  from vidlankd_jax import train_state as ts
  from vidlankd_jax.models.teacher import Teacher

  config = configlib.load("teacher", "size=tiny")
  workdir = str(tmp_path_factory.mktemp("teacher"))
  runs.write_config(config, workdir)
  model = sharding.create_sharded(
      lambda: Teacher.from_config(config, rngs=nnx.Rngs(7)),
      sharding.single_device_mesh(),
      config.sharding_rules,
  )
  _, params, _ = ts.nnx_params(model)
  manager = ckpt_lib.CheckpointManager(
      os.path.join(workdir, "checkpoints"), every_steps=1, keep=1, async_save=False
  )
  manager.save(3, ts.init_train_state(ts.make_optimizer(config.optimizer, 10), params), force=True)
  manager.close()
  return workdir


BENCHMARK_MODULE = '''
"""A sentiment benchmark read from <data_dir>/{train,validation}.tsv (sentence TAB label)."""
import csv
import os

import numpy as np

from vidlankd_jax.data import downstream
from vidlankd_jax.evaluation import metrics


def read_tsv(path):
  with open(path, encoding="utf-8") as f:
    rows = list(csv.reader(f, delimiter="\\t"))
  return {"sentence": np.asarray([r[0] for r in rows], dtype=object),
          "label": np.asarray([int(r[1]) for r in rows], dtype=np.int32)}


def register_benchmarks(vocab, data_config):
  files = {split: os.path.join(data_config.data_dir, f"{split}.tsv") for split in ("train", "validation")}
  downstream.register_benchmark(downstream.DownstreamSpec(
      name="tiny_sentiment", kind="classification", num_labels=2,
      metric_fn=metrics.accuracy_metric,
      source=downstream.file_source(files, read_tsv, lambda split, path: f"{path}: write the {split} TSV"),
      formatter=lambda ex: {"text_a": ex["sentence"], "label": ex["label"]},
      description="sentences with 0/1 sentiment labels", seq_len=32), vocab)
'''


@pytest.fixture(scope="module")
def new_benchmark_run(tmp_path_factory, teacher_workdir):
  """A benchmark added by one registration module + a config entry, from a teacher checkpoint."""
  root = tmp_path_factory.mktemp("benchmark")
  (root / "tiny_sentiment_benchmark.py").write_text(BENCHMARK_MODULE)
  rng = np.random.default_rng(0)
  for split, n in (("train", 24), ("validation", 10)):
    with open(root / f"{split}.tsv", "w", encoding="utf-8") as f:
      for _ in range(n):
        label = int(rng.integers(0, 2))
        f.write(
            f"{'a great happy film' if label else 'a dull sad film'} number {rng.integers(100)}\t{label}\n"
        )
  sys.path.insert(0, str(root))
  configlib.load_module("finetune").TASK_DEFAULTS["tiny_sentiment"] = dict(
      learning_rate=2e-3, epochs=10, batch_size=8
  )
  try:
    config = tiny_config(
        "tiny_sentiment",
        init=teacher_workdir,
        size="auto",
        data__data_dir=str(root),
        data__benchmarks_module="tiny_sentiment_benchmark",
        data__shuffle_buffer=64,
    )
    config.train.steps = 0  # the length comes from the epochs and the train split size
    config.eval.batches = 0
    workdir = tmp_path_factory.mktemp("tiny_sentiment")
    return (workdir, config, *run(config, workdir))
  finally:
    del configlib.load_module("finetune").TASK_DEFAULTS["tiny_sentiment"]
    sys.path.remove(str(root))


# --------------------------------------------------------------------------------- tests


def test_classification_on_tracie_aggregates_seeds(tracie_run):
  workdir, metrics, results = tracie_run
  assert results["task"] == "tracie_iid" and results["kind"] == "classification"
  assert results["seeds"] == [1, 2] and results["train_examples"] == 1174
  assert results["primary_metric"] == "test/accuracy"
  per_seed = [results["per_seed"][s]["test/accuracy"] for s in ("1", "2")]
  summary = results["summary"]["test/accuracy"]
  assert summary["mean"] == pytest.approx(np.mean(per_seed))
  assert summary["std"] == pytest.approx(np.std(per_seed, ddof=1))
  assert metrics["test/accuracy/mean"] == pytest.approx(summary["mean"])
  assert {"test/start_accuracy", "test/story_em"} <= set(results["summary"])
  # The training split is balanced: the majority class scores exactly the test split's share.
  assert 0 < results["majority_baseline"]["test/accuracy"] < 100
  for seed in (1, 2):  # each seed logs its own training curve
    lines = (workdir / f"seed_{seed}" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines if "train/loss" in l] == [1, 2, 3]
  table = (workdir / "results.md").read_text()
  assert "| tracie_iid | scratch | 2 |" in table and "±" in table


def test_span_task_on_mock_squad(squad_run):
  _, metrics, results = squad_run
  assert results["kind"] == "span" and results["seq_len"] == 64
  assert set(results["summary"]) == {"validation/exact_match", "validation/f1"}
  assert 0.0 <= results["summary"]["validation/f1"]["mean"] <= 100.0
  assert results["majority_baseline"] == {}
  assert np.isfinite(metrics["validation/f1/mean"])


def test_multiple_choice_on_swag_csvs(swag_run):
  _, _, results, _ = swag_run
  assert results["kind"] == "multiple_choice" and results["train_examples"] == 20
  accuracy = results["per_seed"]["1"]["validation/accuracy"]
  assert any(accuracy == pytest.approx(100.0 * k / 12) for k in range(13))  # 12 questions
  assert results["learning_rate"] == pytest.approx(1e-3)


def test_sigterm_mid_seed_resumes_to_the_uninterrupted_results(
    swag_run, tmp_path, monkeypatch, capsys
):
  """Fine-tuning gets the loop's checkpoints: SIGTERM during the second seed saves and stops;
  the same command again skips the finished seed, resumes the second from its checkpoint, and
  ends with the metrics of the run that was never stopped."""
  reference_dir, _, reference, data_dir = swag_run
  config = swag_config(data_dir)
  write = loop.MetricsWriter.write

  def write_then_signal(self, step, metrics, **kwargs):
    write(self, step, metrics, **kwargs)
    if self.path.parent.name == "seed_2" and step == 3 and "train/loss" in metrics:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(loop.MetricsWriter, "write", write_then_signal)
  workdir = tmp_path / "run"
  with pytest.raises(loop.Preempted):
    main_lib.run(config, str(workdir))
  assert not (workdir / "results.json").exists()
  assert ckpt_lib.CheckpointManager(
      str(workdir / "seed_2" / "checkpoints"), every_steps=2, keep=3
  ).all_steps() == [2, 3]
  monkeypatch.setattr(loop.MetricsWriter, "write", write)
  capsys.readouterr()
  _, results = run(config, workdir)
  out = capsys.readouterr().out
  assert "run already finished at step 6" in out and "resuming from checkpoint step 3" in out
  assert results["per_seed"] == reference["per_seed"]
  for seed in ("seed_1", "seed_2"):
    assert worker.read_metrics(str(workdir / seed)) == worker.read_metrics(
        str(reference_dir / seed)
    ), seed


def test_a_new_benchmark_trains_through_the_normal_loop(new_benchmark_run):
  _, config, _, results = new_benchmark_run
  assert results["task"] == "tiny_sentiment"
  # Its config entry sets the batch, epochs and lr: 10 epochs of 24 examples in batches of 8.
  assert results["batch_size"] == 8 and results["train_steps"] == 30
  assert results["warmup_steps"] == 3  # 10% of the steps
  assert results["learning_rate"] == pytest.approx(2e-3)
  # The label is in the words: the loop learns it, far above the majority class.
  assert results["summary"]["validation/accuracy"]["mean"] == 100.0
  assert results["majority_baseline"]["validation/accuracy"] < 80.0


def test_init_from_a_teacher_workdir_takes_its_size_and_weights(new_benchmark_run, teacher_workdir):
  _, _, _, results = new_benchmark_run
  assert results["init"] == teacher_workdir
  assert results["encoder"]["hidden_size"] == 64 and results["encoder"]["num_heads"] == 2
  # The encoder loaded before training holds the checkpoint's language BERT exactly.
  config = tiny_config("tiny_sentiment", init=teacher_workdir, size="auto")
  init = runs.read_initial_encoder(config.init.source, None, config.model.num_heads)
  bert_cfg = runs.encoder_config(config.model, init)
  from flax import nnx
  from vidlankd_jax.models import heads

  model = sharding.create_sharded(
      lambda: heads.build_head("classification", bert_cfg, 2, rngs=nnx.Rngs(0)),
      sharding.single_device_mesh(),
      config.sharding_rules,
  )
  runs.load_encoder(model.bert, init)
  saved = ckpt_lib.restore_params_numpy(os.path.join(teacher_workdir, "checkpoints"))["language"][
      "bert"
  ]
  np.testing.assert_array_equal(
      np.asarray(model.bert.encoder.layers.attention.query.kernel.get_value()[1]),
      saved["encoder"]["layers"]["1"]["attention"]["query"]["kernel"],
  )
  # The checkpoints/ folder itself works too, and a named size must match the weights.
  config = tiny_config(
      "tiny_sentiment", init=os.path.join(teacher_workdir, "checkpoints"), size="mini"
  )
  init = runs.read_initial_encoder(config.init.source, None, config.model.num_heads)
  with pytest.raises(ValueError, match=r"size=mini.*\n.*hidden_size: weights 64 vs config 256"):
    runs.encoder_config(config.model, init)


def test_init_from_a_hugging_face_directory(minilm_dir):
  config = configlib.load("finetune", f"task=sst2,init=hf:{minilm_dir}")
  assert config.model.size == "auto"
  init = runs.read_initial_encoder(config.init.source, None, config.model.num_heads)
  bert_cfg = runs.encoder_config(config.model, init)
  assert (bert_cfg.num_layers, bert_cfg.hidden_size, bert_cfg.num_heads) == (6, 384, 12)
  from flax import nnx
  from safetensors.numpy import load_file
  from vidlankd_jax.models import heads

  model = sharding.create_sharded(
      lambda: heads.build_head("span", bert_cfg, 2, rngs=nnx.Rngs(0)),
      sharding.single_device_mesh(),
      config.sharding_rules,
  )
  runs.load_encoder(model.bert, init)
  tensors = load_file(os.path.join(minilm_dir, "model.safetensors"))
  key = next(k for k in tensors if k.endswith("encoder.layer.5.intermediate.dense.weight"))
  np.testing.assert_array_equal(
      np.asarray(model.bert.encoder.layers.intermediate.kernel.get_value()[5]), tensors[key].T
  )
  config = configlib.load("finetune", f"task=sst2,init=hf:{minilm_dir},size=small")
  with pytest.raises(ValueError, match="hidden_size: weights 384 vs config 512"):
    runs.encoder_config(config.model, runs.read_initial_encoder(config.init.source, None, 8))


def test_missing_inputs_raise_errors_that_name_them(tmp_path):
  config = configlib.load("finetune", "task=tracie,size=auto")
  with pytest.raises(ValueError, match="size 'auto'.*scratch"):
    runs.encoder_config(config.model, runs.InitialEncoder("scratch"))
  config = configlib.load("finetune", f"task=tracie,init={tmp_path}/nothing")
  with pytest.raises(FileNotFoundError, match="nothing.*scratch.*hf:"):
    runs.read_initial_encoder(config.init.source, None, 12)
  with pytest.raises(ValueError, match="distinct seeds"):
    finetune.parse_seeds("1,1")
  config = tiny_config("swag", data__swag_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="train.csv.*github.com/rowanz/swagaf"):
    finetune.train_and_evaluate(config, str(tmp_path / "run"))


def test_config_defaults_follow_the_protocol():
  glue = configlib.load("finetune", "task=qnli")
  assert glue.data.task == "glue_qnli" and glue.model.size == "base"
  assert (
      glue.optimizer.learning_rate,
      glue.train.epochs,
      glue.train.batch_size,
      glue.data.seq_len,
  ) == (1e-4, 3, 32, 126)
  assert (glue.optimizer.warmup_fraction, glue.optimizer.weight_decay) == (0.1, 0.0)
  v1, v2 = configlib.load("finetune", "task=squad_v1"), configlib.load("finetune", "task=squad_v2")
  assert (v1.optimizer.learning_rate, v2.optimizer.learning_rate) == (3e-5, 5e-5)
  assert (v1.train.epochs, v1.data.seq_len, v1.data.doc_stride, v1.eval.primary_metric) == (
      2,
      384,
      128,
      "f1",
  )
  assert (v2.train.batch_size, v2.optimizer.warmup_fraction, v2.optimizer.eps) == (12, 0.0, 1e-8)
  swag = configlib.load("finetune", "task=swag,size=small")
  assert (swag.optimizer.learning_rate, swag.train.epochs, swag.data.seq_len) == (5e-5, 3, 80)
  piqa = configlib.load("finetune", "task=piqa")
  assert (piqa.optimizer.learning_rate, piqa.train.batch_size, piqa.data.seq_len) == (1e-4, 32, 126)
  assert swag.model.hidden_size == 512
  assert configlib.load("finetune", "task=cola").eval.primary_metric == "matthews_corr"


def test_comparison_table_shows_mean_and_std_per_checkpoint(tracie_run, tmp_path):
  sys.path.insert(0, os.path.join(REPO, "tools"))
  try:
    import compare_finetune
  finally:
    sys.path.pop(0)
  workdir, _, results = tracie_run
  other = json.loads(json.dumps(results))
  other["summary"]["test/accuracy"] = {"mean": 61.25, "std": 1.5, "n": 2}
  for name, res in (("student", results), ("baseline", other)):
    os.makedirs(tmp_path / name / "tracie_iid")
    with open(tmp_path / name / "tracie_iid" / "results.json", "w") as f:
      json.dump(res, f)
  table = compare_finetune.compare(
      str(tmp_path),
      {"student": "runs/s", "baseline": "runs/b"},
      ["tracie", "sst2"],
      seeds="1,2",
      table_only=True,
  )
  lines = table.splitlines()
  assert lines[0] == "| init | tracie_iid (test/accuracy) | glue_sst2 |"
  mean, std = (
      results["summary"]["test/accuracy"]["mean"],
      results["summary"]["test/accuracy"]["std"],
  )
  assert lines[2] == f"| student | {mean:.1f} ± {std:.1f} | - |"
  assert lines[3] == "| baseline | 61.2 ± 1.5 | - |"
  assert (tmp_path / "comparison.md").read_text() == table


def test_glue_diagnostics_write_ax_tsv_and_score_categories(tmp_path):
  """AX predictions keep the examples' idx, drop batch padding and score each category."""
  from vidlankd_jax.data import vocab as vocab_lib
  from vidlankd_jax.evaluation import metrics

  premises = ["yes it rains", "no sun today", "maybe snow", "yes wind", "no fog"]
  with open(tmp_path / "ax.tsv", "w", encoding="utf-8") as f:
    for i, p in reversed(list(enumerate(premises))):  # file order differs from idx order
      f.write(f"{i}\t{p}\tthe weather changes\n")

  def read(path):
    rows = [line.rstrip("\n").split("\t") for line in open(path, encoding="utf-8")]
    return {
        "idx": np.asarray([int(r[0]) for r in rows], np.int32),
        "premise": np.asarray([r[1] for r in rows], object),
        "hypothesis": np.asarray([r[2] for r in rows], object),
    }

  vocab = vocab_lib.WordPieceVocabulary(vocab_lib.default_vocab_file())
  downstream.register_benchmark(
      downstream.DownstreamSpec(
          name="tiny_ax",
          kind="classification",
          num_labels=3,
          metric_fn=metrics.matthews_metric,
          source=downstream.file_source({"test": str(tmp_path / "ax.tsv")}, read, lambda s, p: p),
          formatter=lambda ex: {
              "text_a": ex["premise"],
              "text_b": ex["hypothesis"],
              "label": -1,
              "idx": ex["idx"],
          },
          description="five diagnostic pairs",
          seq_len=16,
          train_split=None,
          eval_splits=(),
          test_splits=("test",),
      ),
      vocab,
  )
  config = tiny_config("mnli")
  config.eval.batch_size = 8  # one batch of 5 examples and 3 padding rows
  diagnostics = tmp_path / "diagnostic-full.tsv"
  gold = ["entailment", "neutral", "contradiction", "entailment", "contradiction"]
  with open(diagnostics, "w", encoding="utf-8") as f:
    f.write(
        "Lexical Semantics\tPredicate-Argument Structure\tLogic\tKnowledge\tDomain\tPremise\tHypothesis\tLabel\n"
    )
    for i, label in enumerate(gold):
      knowledge = "World knowledge" if i % 2 == 0 else ""
      f.write(f"\t\tNegation\t{knowledge}\tnews\t{premises[i]}\tthe weather changes\t{label}\n")
  config.eval.glue_diagnostics_file = str(diagnostics)

  def fake_eval(params, batch):  # predicts (first word piece id) mod 3
    return {"logits": jax.nn.one_hot(batch["input_ids"][:, 1] % 3, 3)}

  batches = finetune.read_eval_batches(downstream.get_downstream_spec("tiny_ax"), "test", config)
  mesh = sharding.make_mesh(config.mesh)
  scores = finetune.glue_diagnostics(batches, None, fake_eval, config, mesh, str(tmp_path / "out"))
  predicted = [vocab.tokens.index(p.split()[0]) % 3 for p in premises]
  lines = (tmp_path / "out" / "AX.tsv").read_text().splitlines()
  assert lines == ["index\tprediction"] + [
      f"{i}\t{metrics.MNLI_LABELS[k]}" for i, k in enumerate(predicted)
  ]
  expected = metrics.glue_diagnostic_breakdown(str(diagnostics), predicted)
  assert scores["ax/Knowledge/r3"] == pytest.approx(expected["Knowledge"]["r3"])
  assert scores["ax/Knowledge/World knowledge/r3"] == pytest.approx(
      expected["Knowledge/World knowledge"]["r3"]
  )
  assert scores["ax/all/r3"] == pytest.approx(expected["all"]["r3"])


def test_scores_drop_padding_rows_and_read_regression_scores():
  downstream.register_downstream_tasks()
  config = configlib.load("finetune", "task=stsb,size=tiny")
  labels = np.array([0.5, 2.0, 4.0, 0.0], np.float32)
  batches = [
      {"label": labels[:2], "valid": np.array([1, 1])},
      {"label": labels[2:], "valid": np.array([1, 0])},
  ]  # the last row is padding
  logits = np.array([[1.0], [2.0], [3.0], [-50.0]], np.float32)
  scores = finetune.score(
      downstream.get_downstream_spec("glue_stsb"), "validation", {"logits": logits}, batches, config
  )
  assert scores["pearson"] == pytest.approx(100 * np.corrcoef(labels[:3], logits[:3, 0])[0, 1])
  assert scores["spearman"] == pytest.approx(100.0)
  batches = [{"label": np.array([0, 1, 1, 0]), "valid": np.array([1, 1, 1, 0])}]
  cola = downstream.get_downstream_spec("glue_cola")
  logits = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 9.0]], np.float32)
  assert finetune.score(cola, "validation", {"logits": logits}, batches, config) == cola.metric_fn(
      np.array([0, 1, 1]), np.array([0, 1, 0])
  )
  assert finetune.majority_baseline(cola, np.array([3, 7]), batches) == cola.metric_fn(
      np.array([0, 1, 1]), np.array([1, 1, 1])
  )
