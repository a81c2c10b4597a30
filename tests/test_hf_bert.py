"""Hugging Face BERT import/export: real MiniLM weights against transformers, round trips, errors."""

import json

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from vidlankd_jax import sharding
from vidlankd_jax.interop import hf_bert
from vidlankd_jax.models.bert import BertForMaskedLM


def random_inputs(batch=3, length=24, vocab=30522, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(min(1000, vocab // 2), vocab, (batch, length))
  mask = np.ones((batch, length), np.int64)
  mask[1, length // 2 :] = 0
  mask[-1, 4:] = 0
  types = np.zeros_like(ids)
  types[0, 12:] = 1
  return ids, mask, types


def test_minilm_matches_transformers_within_1e4(minilm_dir):
  ids, mask, types = random_inputs()
  hidden, pooled = hf_bert.encode(minilm_dir, ids, mask, types)
  ref = transformers.BertModel.from_pretrained(minilm_dir).eval()
  with torch.no_grad():
    out = ref(
        input_ids=torch.tensor(ids),
        attention_mask=torch.tensor(mask),
        token_type_ids=torch.tensor(types),
    )
  real = mask[..., None].astype(bool)  # padded positions are not defined outputs
  diff = np.abs(np.where(real, hidden - out.last_hidden_state.numpy(), 0.0)).max()
  assert hidden.shape == (3, 24, 384)
  assert diff < 1e-4, diff
  assert np.abs(pooled - out.pooler_output.numpy()).max() < 1e-4


def test_load_export_load_gives_identical_arrays(minilm_dir, tmp_path):
  model = hf_bert.from_pretrained(minilm_dir)
  hf_bert.save_pretrained(model, str(tmp_path))
  again = hf_bert.from_pretrained(str(tmp_path))
  a = hf_bert.to_state_dict(model)
  b = hf_bert.to_state_dict(again)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  original = hf_bert.read_state_dict(minilm_dir)
  for k in a:  # and the export equals the file we started from
    np.testing.assert_array_equal(a[k], original[k], err_msg=k)


@pytest.fixture(scope="module")
def tiny_hf_mlm(tmp_path_factory):
  """A randomly initialised transformers BertForMaskedLM saved as pytorch_model.bin."""
  cfg = transformers.BertConfig(
      vocab_size=99,
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      intermediate_size=37,
      max_position_embeddings=40,
  )
  torch.manual_seed(0)
  model = transformers.BertForMaskedLM(cfg).eval()
  with torch.no_grad():  # non-trivial LayerNorm and bias values
    for name, p in model.named_parameters():
      if "LayerNorm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("tiny_mlm")
  cfg.to_json_file(str(path / "config.json"))
  torch.save(model.state_dict(), str(path / "pytorch_model.bin"))
  return str(path), model


def test_masked_lm_head_from_pytorch_bin_matches_transformers(tiny_hf_mlm):
  path, ref = tiny_hf_mlm
  ids, mask, types = random_inputs(batch=2, length=16, vocab=99)
  model = hf_bert.from_pretrained(path, with_mlm_head=True)
  hidden, logits = model(ids.astype(np.int32), mask.astype(np.int32), types.astype(np.int32))
  with torch.no_grad():
    out = ref(
        input_ids=torch.tensor(ids),
        attention_mask=torch.tensor(mask),
        token_type_ids=torch.tensor(types),
        output_hidden_states=True,
    )
  real = mask[..., None].astype(bool)
  assert np.abs(np.where(real, np.asarray(logits) - out.logits.numpy(), 0)).max() < 1e-4
  # Gathering the masked positions gives the same logits as the full sequence.
  positions = np.array([[1, 5, 7], [0, 2, 3]], np.int32)
  _, gathered = model(
      ids.astype(np.int32), mask.astype(np.int32), types.astype(np.int32), positions
  )
  np.testing.assert_allclose(
      np.asarray(gathered),
      np.take_along_axis(np.asarray(logits), positions[..., None], 1),
      atol=1e-5,
  )


def test_masked_lm_export_loads_in_transformers_without_missing_keys(tiny_hf_mlm, tmp_path):
  path, ref = tiny_hf_mlm
  model = hf_bert.from_pretrained(path, with_mlm_head=True)
  hf_bert.save_pretrained(model, str(tmp_path))
  loaded, info = transformers.BertForMaskedLM.from_pretrained(
      str(tmp_path), output_loading_info=True
  )
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  for (name, a), b in zip(ref.state_dict().items(), loaded.state_dict().values()):
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=0, err_msg=name)


def test_old_gamma_beta_names_and_missing_or_misshapen_weights(tiny_hf_mlm):
  path, _ = tiny_hf_mlm
  state = hf_bert.read_state_dict(path)
  cfg = hf_bert.read_config(path)
  build = lambda: sharding.create_sharded(
      lambda: BertForMaskedLM(cfg, rngs=nnx.Rngs(1)),
      sharding.single_device_mesh(),
      sharding.DEFAULT_RULES,
  )
  renamed = {
      k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
          "LayerNorm.bias", "LayerNorm.beta"
      ): v
      for k, v in state.items()
  }
  model = build()
  assert hf_bert.load_state_dict(model, renamed) == []
  np.testing.assert_array_equal(
      np.asarray(model.bert.embeddings.layer_norm.scale.get_value()),
      state["bert.embeddings.LayerNorm.weight"],
  )

  missing = dict(state)
  del missing["bert.encoder.layer.1.output.dense.weight"]
  with pytest.raises(ValueError, match=r"encoder\.layer\.1\.output\.dense\.weight"):
    hf_bert.load_state_dict(build(), missing)

  bad = dict(state)
  bad["bert.encoder.layer.0.intermediate.dense.weight"] = np.zeros((5, 5), np.float32)
  with pytest.raises(ValueError, match=r"intermediate\.dense\.weight.*\(5, 5\)"):
    hf_bert.load_state_dict(build(), bad)


def test_unreadable_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hf_bert.read_state_dict(str(tmp_path))
  (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(ValueError, match="model.safetensors"):
    hf_bert.read_state_dict(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"hidden_act": "relu", "vocab_size": 3}))
  with pytest.raises(ValueError, match="hidden_act"):
    hf_bert.read_config(str(tmp_path))
