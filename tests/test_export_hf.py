"""Hugging Face export of a student checkpoint: transformers loads it cleanly and agrees with us."""

import os

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from vidlankd_jax import configlib
from vidlankd_jax import sharding
from vidlankd_jax.models.bert import BertConfig
from vidlankd_jax.models.student import Student
from vidlankd_jax import train_state as common


@pytest.fixture(scope="module")
def student_run(tmp_path_factory, load_tool):
  """A tiny distillation workdir (random student with an NST head), as the distill stage writes it."""
  config = configlib.load("distill", "size=tiny,objectives=nst")
  student = sharding.create_sharded(
      lambda: Student(
          BertConfig.from_config(config.model), ("nst",), teacher_hidden_size=64, rngs=nnx.Rngs(3)
      ),
      sharding.single_device_mesh(),
      sharding.DEFAULT_RULES,
  )
  rng = np.random.default_rng(0)  # a non-zero MLM bias and LayerNorms, so every tensor matters
  for path, var in nnx.to_flat_state(nnx.state(student, nnx.Param)):
    if path[-1] in ("bias", "scale"):
      var.set_value(
          var.get_value() + 0.1 * rng.standard_normal(var.get_value().shape).astype(np.float32)
      )
  workdir = str(tmp_path_factory.mktemp("student"))
  load_tool("import_vidlankd").write_workdir(
      config, student, common.make_optimizer(config.optimizer, config.train.steps), workdir
  )
  return workdir, student


def load_quietly(cls, directory, capfd):
  """`cls.from_pretrained` with its load report; fails on any missing/unexpected/misshapen weight."""
  transformers.logging.set_verbosity_warning()
  model, info = cls.from_pretrained(
      directory, output_loading_info=True, attn_implementation="eager"
  )
  log = capfd.readouterr()
  assert (
      not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  ), info
  for word in ("MISSING", "UNEXPECTED", "MISMATCH", "newly initialized", "not used"):
    assert word not in log.err + log.out, log.err
  return model.eval()


def inputs():
  rng = np.random.default_rng(1)
  ids = rng.integers(1000, 30000, (2, 12))
  mask = np.ones_like(ids)
  mask[1, 7:] = 0
  return ids, mask, np.zeros_like(ids)


def test_masked_lm_export_loads_cleanly_and_gives_our_logits(
    student_run, tmp_path, capfd, load_tool
):
  workdir, student = student_run
  out = str(tmp_path / "hf")
  assert load_tool("export_hf").main(["--workdir", workdir, "--output_dir", out]) == 0
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "vocab.txt"]
  assert len(open(os.path.join(out, "vocab.txt")).read().split("\n")) >= 30522
  model = load_quietly(transformers.BertForMaskedLM, out, capfd)
  ids, mask, types = inputs()
  with torch.no_grad():
    ref = model(
        input_ids=torch.tensor(ids),
        attention_mask=torch.tensor(mask),
        token_type_ids=torch.tensor(types),
    ).logits.numpy()
  _, logits, _ = nnx.jit(lambda m, a, b, c: m(a, b, c))(student, ids, mask, types)
  real = mask.astype(bool)
  assert np.abs(np.asarray(logits) - ref)[real].max() < 1e-4
  assert np.abs(ref).max() > 0.1  # real logits, not an all-zero head


def test_encoder_only_export_loads_cleanly_in_bert_model(student_run, tmp_path, capfd, load_tool):
  workdir, student = student_run
  out = str(tmp_path / "hf_encoder")
  assert (
      load_tool("export_hf").main(["--workdir", workdir, "--output_dir", out, "--encoder_only"])
      == 0
  )
  model = load_quietly(transformers.BertModel, out, capfd)
  ids, mask, types = inputs()
  with torch.no_grad():
    ref = model(
        input_ids=torch.tensor(ids),
        attention_mask=torch.tensor(mask),
        token_type_ids=torch.tensor(types),
    )
  hidden, pooled = nnx.jit(lambda m, a, b, c: m(a, b, c))(student.language.bert, ids, mask, types)
  real = mask.astype(bool)
  assert np.abs(np.asarray(hidden) - ref.last_hidden_state.numpy())[real].max() < 1e-4
  assert np.abs(np.asarray(pooled) - ref.pooler_output.numpy()).max() < 1e-4


def test_export_errors_name_what_is_wrong(student_run, tmp_path, load_tool):
  tool = load_tool("export_hf")
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    tool.export(str(tmp_path / "nothing"), str(tmp_path / "out"))
  small_vocab = tmp_path / "vocab.txt"
  small_vocab.write_text(
      "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(40000)])
  )
  with pytest.raises(ValueError, match="40005 entries"):
    tool.export(student_run[0], str(tmp_path / "out"), vocab_file=str(small_vocab))
