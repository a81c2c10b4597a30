"""Hugging Face BERT checkpoints <-> our nnx BERT.

Reads a directory with `config.json` and `model.safetensors` or `pytorch_model.bin` in the naming
of `BertModel`, `BertForMaskedLM` (keys under `bert.` and `cls.predictions.`; the VidLanKD
released language models are such state dicts) or sentence-transformers' plain BERT, and writes
ours back in the same format. Weight names and shapes are checked: a missing or misshapen tensor is
an error naming it, never a silent partial load.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vidlankd_jax import errors
from vidlankd_jax import sharding as sharding_lib
from vidlankd_jax.models.bert import BertConfig, BertForMaskedLM, BertModel

# Keys some checkpoints carry that are not weights of the encoder or the MLM head.
IGNORED_KEYS = ("embeddings.position_ids", "cls.seq_relationship.", "cls.predictions.decoder.")

_EMBEDDINGS = {
    "embeddings.word_embeddings.weight": (("embeddings", "word_embeddings", "embedding"), False),
    "embeddings.position_embeddings.weight": (
        ("embeddings", "position_embeddings", "embedding"),
        False,
    ),
    "embeddings.token_type_embeddings.weight": (
        ("embeddings", "token_type_embeddings", "embedding"),
        False,
    ),
    "embeddings.LayerNorm.weight": (("embeddings", "layer_norm", "scale"), False),
    "embeddings.LayerNorm.bias": (("embeddings", "layer_norm", "bias"), False),
    "pooler.dense.weight": (("pooler", "kernel"), True),
    "pooler.dense.bias": (("pooler", "bias"), False),
}

_LAYER = {
    "attention.self.query": ("attention", "query"),
    "attention.self.key": ("attention", "key"),
    "attention.self.value": ("attention", "value"),
    "attention.output.dense": ("attention", "output"),
    "intermediate.dense": ("intermediate",),
    "output.dense": ("output",),
}
_LAYER_NORMS = {
    "attention.output.LayerNorm": ("attention", "layer_norm"),
    "output.LayerNorm": ("layer_norm",),
}

_MLM_HEAD = {
    "cls.predictions.transform.dense.weight": (("transform", "kernel"), True),
    "cls.predictions.transform.dense.bias": (("transform", "bias"), False),
    "cls.predictions.transform.LayerNorm.weight": (("layer_norm", "scale"), False),
    "cls.predictions.transform.LayerNorm.bias": (("layer_norm", "bias"), False),
    "cls.predictions.bias": (("bias",), False),
}


def encoder_key_map(num_layers: int) -> dict[str, tuple[tuple, bool]]:
  """HF encoder key (without `bert.`) -> (path in BertModel, transpose?)."""
  table = dict(_EMBEDDINGS)
  for i in range(num_layers):
    prefix = f"encoder.layer.{i}."
    ours = ("encoder", "layers", i)
    for hf, path in _LAYER.items():
      table[f"{prefix}{hf}.weight"] = (ours + path + ("kernel",), True)
      table[f"{prefix}{hf}.bias"] = (ours + path + ("bias",), False)
    for hf, path in _LAYER_NORMS.items():
      table[f"{prefix}{hf}.weight"] = (ours + path + ("scale",), False)
      table[f"{prefix}{hf}.bias"] = (ours + path + ("bias",), False)
  return table


def config_from_hf(config: dict, **overrides) -> BertConfig:
  """Our BertConfig from a Hugging Face `config.json` dict."""
  act = config.get("hidden_act", "gelu")
  if act != "gelu":
    raise errors.DataError(f"config.json: hidden_act {act!r} is not supported (only exact 'gelu')")
  if config.get("position_embedding_type", "absolute") != "absolute":
    raise errors.DataError("config.json: only absolute position embeddings are supported")
  return BertConfig(
      vocab_size=config["vocab_size"],
      hidden_size=config["hidden_size"],
      num_layers=config["num_hidden_layers"],
      num_heads=config["num_attention_heads"],
      intermediate_size=config["intermediate_size"],
      max_position_embeddings=config.get("max_position_embeddings", 512),
      type_vocab_size=config.get("type_vocab_size", 2),
      hidden_dropout=config.get("hidden_dropout_prob", 0.1),
      attention_dropout=config.get("attention_probs_dropout_prob", 0.1),
      layer_norm_eps=config.get("layer_norm_eps", 1e-12),
      initializer_range=config.get("initializer_range", 0.02),
      **overrides,
  )


def config_to_hf(cfg: BertConfig, architectures: Iterable[str] = ("BertForMaskedLM",)) -> dict:
  return {
      "architectures": list(architectures),
      "model_type": "bert",
      "hidden_act": "gelu",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "intermediate_size": cfg.intermediate_size,
      "max_position_embeddings": cfg.max_position_embeddings,
      "type_vocab_size": cfg.type_vocab_size,
      "hidden_dropout_prob": cfg.hidden_dropout,
      "attention_probs_dropout_prob": cfg.attention_dropout,
      "layer_norm_eps": cfg.layer_norm_eps,
      "initializer_range": cfg.initializer_range,
      "pad_token_id": 0,
      "position_embedding_type": "absolute",
  }


def read_state_dict(model_dir: str) -> dict[str, np.ndarray]:
  """Tensors of `model.safetensors` (preferred) or `pytorch_model.bin`, as float32 numpy arrays."""
  st_path = os.path.join(model_dir, "model.safetensors")
  pt_path = os.path.join(model_dir, "pytorch_model.bin")
  if os.path.exists(st_path):
    from safetensors.numpy import load_file

    try:
      tensors = load_file(st_path)
    except Exception as e:  # safetensors raises several error types for damaged files
      raise errors.DataError(f"{st_path}: not a readable safetensors file ({e})") from e
  elif os.path.exists(pt_path):
    tensors = read_torch_state_dict(pt_path)
  else:
    raise errors.MissingFileError(
        f"{model_dir}: neither model.safetensors nor pytorch_model.bin found"
    )
  return {k: np.asarray(v) for k, v in tensors.items()}


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """A PyTorch state dict file (e.g. the VidLanKD releases) as numpy arrays; needs torch."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        f"{path}: reading PyTorch checkpoints needs torch "
        "(pip install torch, CPU build is enough)"
    ) from e
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several error types for damaged files
    raise errors.DataError(f"{path}: not a readable PyTorch state dict ({e})") from e
  if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
    state = state["state_dict"]
  return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "numpy")}


def normalise_keys(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Old TF-converted names (LayerNorm.gamma/beta) -> weight/bias; `module.` wrappers dropped."""
  out = {}
  for key, value in state_dict.items():
    if key.startswith("module."):
      key = key[len("module.") :]
    key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
        "LayerNorm.beta", "LayerNorm.bias"
    )
    out[key] = value
  return out


class LayerSlice:
  """Layer `index` of a stacked weight, read and written like a variable of its own."""

  def __init__(self, stacked: nnx.Variable, index: int):
    self.stacked, self.index = stacked, index

  def get_value(self):
    return self.stacked.get_value()[self.index]

  def set_value(self, value) -> None:
    whole = self.stacked.get_value()
    self.stacked.set_value(jax.device_put(whole.at[self.index].set(value), whole.sharding))


def variable(module: nnx.Module, path: tuple) -> nnx.Variable | LayerSlice:
  """The variable at `path` (attribute names and list indices) inside `module`; a layer index
  into a stacked `layers` module selects that layer's slice of each weight."""
  node, layer = module, None
  for name in path:
    if isinstance(name, int) and not isinstance(node, (list, nnx.List)):
      layer = name  # stacked layers: resolve the weight, then take its slice
      continue
    node = node[name] if isinstance(name, int) else getattr(node, name)
  return node if layer is None else LayerSlice(node, layer)


def assign(module: nnx.Module, path: tuple, value: np.ndarray, key: str) -> None:
  """Sets the variable at `path` to `value` (checkpoint tensor `key`), keeping its sharding."""
  var = variable(module, path)
  current = var.get_value()
  if tuple(current.shape) != tuple(value.shape):
    raise errors.DataError(
        f"checkpoint tensor {key!r}: shape {tuple(value.shape)} does not fit "
        f"{'.'.join(map(str, path))} of shape {tuple(current.shape)}"
    )
  value = jnp.asarray(value, current.dtype)
  var.set_value(value if isinstance(var, LayerSlice) else jax.device_put(value, current.sharding))


def load_state_dict(
    model: BertModel | BertForMaskedLM, state_dict: dict[str, np.ndarray]
) -> list[str]:
  """Copies a HF-named state dict into `model` in place; returns the keys it did not use.

  Every encoder weight (and, for BertForMaskedLM, every MLM-head weight) must be present with the
  right shape, else a ValueError lists what is missing.
  """
  state_dict = normalise_keys(state_dict)
  encoder = model.bert if isinstance(model, BertForMaskedLM) else model
  prefix = "bert." if any(k.startswith("bert.") for k in state_dict) else ""
  targets: dict[str, tuple[nnx.Module, tuple, bool]] = {
      prefix + k: (encoder, path, transpose)
      for k, (path, transpose) in encoder_key_map(encoder.config.num_layers).items()
  }
  if isinstance(model, BertForMaskedLM):
    targets.update({k: (model.mlm, path, transpose) for k, (path, transpose) in _MLM_HEAD.items()})
  missing = sorted(k for k in targets if k not in state_dict)
  # A pooler is absent from BertForMaskedLM checkpoints: keep the fresh one rather than fail.
  missing = [k for k in missing if not k.endswith(("pooler.dense.weight", "pooler.dense.bias"))]
  if missing:
    raise errors.DataError(
        f"checkpoint lacks {len(missing)} weight(s) the model needs: {missing[:8]}"
        + (" ..." if len(missing) > 8 else "")
    )
  for key, (module, path, transpose) in targets.items():
    if key in state_dict:
      value = state_dict[key]
      assign(module, path, value.T if transpose else value, key)
  return sorted(k for k in state_dict if k not in targets and not any(i in k for i in IGNORED_KEYS))


def to_state_dict(model: BertModel | BertForMaskedLM) -> dict[str, np.ndarray]:
  """HF-named numpy tensors of `model` (`bert.`-prefixed plus `cls.` for BertForMaskedLM).

  A BertForMaskedLM is written as Hugging Face's BertForMaskedLM is: without the pooler, which
  the MLM objective never trains.
  """
  with_head = isinstance(model, BertForMaskedLM)
  encoder = model.bert if with_head else model
  prefix = "bert." if with_head else ""
  out = {}
  for key, (path, transpose) in encoder_key_map(encoder.config.num_layers).items():
    if with_head and key.startswith("pooler."):
      continue
    value = np.asarray(jax.device_get(variable(encoder, path).get_value()), np.float32)
    out[prefix + key] = np.ascontiguousarray(value.T if transpose else value)
  if with_head:
    for key, (path, transpose) in _MLM_HEAD.items():
      value = np.asarray(jax.device_get(variable(model.mlm, path).get_value()), np.float32)
      out[key] = np.ascontiguousarray(value.T if transpose else value)
    # HF ties the decoder to the word embeddings but still stores both names.
    out["cls.predictions.decoder.weight"] = out["bert.embeddings.word_embeddings.weight"]
    out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]
  return out


def save_pretrained(
    model: BertModel | BertForMaskedLM, out_dir: str, vocab_file: str | None = None
) -> None:
  """Writes `config.json` and `model.safetensors` (and `vocab.txt` if given) in HF format."""
  from safetensors.numpy import save_file

  os.makedirs(out_dir, exist_ok=True)
  with_head = isinstance(model, BertForMaskedLM)
  cfg = model.config
  arch = ["BertForMaskedLM"] if with_head else ["BertModel"]
  tensors = to_state_dict(model)
  if with_head:  # safetensors refuses shared memory: store the tied copy separately
    tensors["cls.predictions.decoder.weight"] = tensors["cls.predictions.decoder.weight"].copy()
    tensors["cls.predictions.decoder.bias"] = tensors["cls.predictions.decoder.bias"].copy()
  tmp = os.path.join(out_dir, "model.safetensors.tmp")
  save_file(tensors, tmp, metadata={"format": "pt"})
  os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
  with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config_to_hf(cfg, arch), f, indent=2)
  if vocab_file:
    with (
        open(vocab_file, encoding="utf-8") as src,
        open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8") as dst,
    ):
      dst.write(src.read())


def read_config(model_dir: str, **overrides) -> BertConfig:
  path = os.path.join(model_dir, "config.json")
  try:
    with open(path, encoding="utf-8") as f:
      return config_from_hf(json.load(f), **overrides)
  except FileNotFoundError as e:
    raise errors.MissingFileError(f"{model_dir}: no config.json") from e
  except (json.JSONDecodeError, KeyError) as e:
    raise errors.DataError(f"{path}: not a BERT config ({e})") from e


def from_pretrained(
    model_dir: str, *, with_mlm_head: bool = False, mesh=None, rules=None, **config_overrides
) -> BertModel | BertForMaskedLM:
  """A BertModel (or BertForMaskedLM) built on `mesh` (default: one device) with HF weights."""
  cfg = read_config(model_dir, **config_overrides)
  mesh = mesh or sharding_lib.single_device_mesh()
  cls = BertForMaskedLM if with_mlm_head else BertModel
  model = sharding_lib.create_sharded(
      lambda: cls(cfg, rngs=nnx.Rngs(0)), mesh, rules or sharding_lib.DEFAULT_RULES
  )
  state = read_state_dict(model_dir)
  if with_mlm_head and not any(k.startswith("cls.predictions.") for k in normalise_keys(state)):
    raise errors.DataError(
        f"{model_dir}: has no MLM head (cls.predictions.*); load with with_mlm_head=False"
    )
  load_state_dict(model, state)
  return model


def encode(
    model_dir: str, input_ids, attention_mask, token_type_ids=None
) -> tuple[np.ndarray, np.ndarray]:
  """(last_hidden_state [B, L, H], pooled_output [B, H]) of a HF BERT directory, as numpy."""
  model = from_pretrained(model_dir)
  input_ids = jnp.asarray(input_ids, jnp.int32)
  attention_mask = jnp.asarray(attention_mask, jnp.int32)
  token_type_ids = (
      jnp.zeros_like(input_ids)
      if token_type_ids is None
      else jnp.asarray(token_type_ids, jnp.int32)
  )
  hidden, pooled = nnx.jit(lambda m, a, b, c: m(a, b, c))(
      model, input_ids, attention_mask, token_type_ids
  )
  return np.asarray(hidden), np.asarray(pooled)
