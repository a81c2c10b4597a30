"""The released VidLanKD PyTorch checkpoints -> our Teacher and Student.

A released teacher folder holds `config.json` (Hugging Face BERT config), `pytorch_model.bin` (the
language model, a `BertForMaskedLM` subclass) and `visn_model.chkpt` (the video model, saved as
`torch.save(DistributedDataParallel(VisnModel).state_dict())`). The video model is a
`VisnModel`: `backbone` (a `VideoBert` = `BertModel` run on `inputs_embeds`, plus a
`video_encoder` projection) and `mlp_map`. Its keys (a `module.` prefix is dropped) map to our
`VideoEncoder`:

  backbone.video_encoder.new_video_embeddings.0.{weight,bias}  [1024, D]  -> projection_in (T)
  backbone.video_encoder.new_video_embeddings.1.{weight,bias}  [H, 1024]  -> projection_out (T)
  backbone.bert.embeddings.position_embeddings.weight          [P, H]     -> position_embeddings,
      its first max_steps rows (released: P = 512; our video inputs have at most max_steps steps)
  backbone.bert.embeddings.token_type_embeddings.weight        [2, H]     -> token_type_embeddings,
      rows swapped: the released code gives every video step token type 1, ours type 0
  backbone.bert.embeddings.LayerNorm.{weight,bias}                        -> layer_norm
  backbone.bert.encoder.layer.N.*  (Hugging Face BERT layer names)        -> encoder.layers[N]
  backbone.bert.pooler.dense.{weight,bias}                                -> pooler (T)
  mlp_map.0.{weight,bias}, mlp_map.3.{weight,bias}  (Linear, ReLU, Dropout, Linear)
                                                                          -> clip_mlp_in, clip_mlp_out (T)
  backbone.bert.embeddings.word_embeddings.weight, ...position_ids         unused (video has no words)

(T): PyTorch Linear weights are [out, in], ours [in, out]. The released `VideoBert` adds the
position and token-type embeddings and applies the LayerNorm once itself and again inside
`BertModel`: an imported teacher sets `video.embedding_passes = 2`, which does the same.

The language model's keys are Hugging Face BertForMaskedLM names (`bert.`, `cls.predictions.`;
mapped by `hf_bert`); the teacher's also holds an unused `visual_hinge_head.` (its hinge loss reads
the normalised hidden states directly). A released student is a BertForMaskedLM with its
distillation heads: `kd1_student_head.` (NST) and `kd2_student_head.` (the in-batch contrastive
"CRD", our `ntxent`), each `dense`, `layer_norm`, `decoder` -> our head's `transform`,
`layer_norm`, `output`; `kd2_teacher_head.` (a head on the teacher side) has no counterpart here.
Any other key, a missing key or a tensor of the wrong shape is an error naming it.
"""

from __future__ import annotations

import json
import os

import numpy as np

from vidlankd_jax import errors
from vidlankd_jax.interop import hf_bert
from vidlankd_jax.models.bert import BertForMaskedLM
from vidlankd_jax.models.student import Student
from vidlankd_jax.models.video import VideoEncoder

LANGUAGE_FILE = "pytorch_model.bin"
VIDEO_FILE = "visn_model.chkpt"

# Released keys that carry no weight of our models (prefixes).
UNUSED_TEACHER_LANGUAGE = ("visual_hinge_head.",)
UNUSED_STUDENT = ("kd2_teacher_head.",)
UNUSED_VIDEO = (
    "backbone.bert.embeddings.word_embeddings.",
    "backbone.bert.embeddings.position_ids",
)

# Released student head prefix -> our objective name; released head layer -> ours.
STUDENT_HEADS = {"kd1_student_head.": "nst", "kd2_student_head.": "ntxent"}
_HEAD_LAYERS = {"dense": "transform", "layer_norm": "layer_norm", "decoder": "output"}

_VIDEO_BERT = "backbone.bert."
_TRANSPOSE, _SWAP_ROWS, _FIRST_ROWS = "transpose", "swap_rows", "first_rows"


def video_key_map(num_layers: int) -> dict[str, tuple[tuple, str | None]]:
  """Released video key -> (path in our VideoEncoder, transform: transpose, swap_rows,
  first_rows or None)."""

  def linear(prefix, ours):
    return {
        f"{prefix}.weight": ((ours, "kernel"), _TRANSPOSE),
        f"{prefix}.bias": ((ours, "bias"), None),
    }

  table = {
      **linear("backbone.video_encoder.new_video_embeddings.0", "projection_in"),
      **linear("backbone.video_encoder.new_video_embeddings.1", "projection_out"),
      **linear("mlp_map.0", "clip_mlp_in"),
      **linear("mlp_map.3", "clip_mlp_out"),
      _VIDEO_BERT
      + "embeddings.position_embeddings.weight": (
          ("position_embeddings", "embedding"),
          _FIRST_ROWS,
      ),
      _VIDEO_BERT
      + "embeddings.token_type_embeddings.weight": (
          ("token_type_embeddings", "embedding"),
          _SWAP_ROWS,
      ),
      _VIDEO_BERT + "embeddings.LayerNorm.weight": (("layer_norm", "scale"), None),
      _VIDEO_BERT + "embeddings.LayerNorm.bias": (("layer_norm", "bias"), None),
  }
  for key, (path, transpose) in hf_bert.encoder_key_map(num_layers).items():
    if key.startswith(("encoder.", "pooler.")):  # our VideoEncoder has both under the same names
      table[_VIDEO_BERT + key] = (path, _TRANSPOSE if transpose else None)
  return table


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
  """A released `.bin`/`.chkpt` file as numpy arrays, `module.` prefixes and old names normalised."""
  if not os.path.isfile(path):
    raise errors.MissingFileError(f"{path}: no such file")
  return hf_bert.normalise_keys(hf_bert.read_torch_state_dict(path))


def _unknown(keys, unused: tuple[str, ...]) -> list[str]:
  return sorted(k for k in keys if not k.startswith(unused))


def _check_all_used(where: str, unknown: list[str]) -> None:
  if unknown:
    raise errors.DataError(
        f"{where}: {len(unknown)} tensor(s) this import does not know: {unknown[:8]}"
        + (" ..." if len(unknown) > 8 else "")
    )


def video_architecture(state_dict: dict[str, np.ndarray], where: str) -> dict[str, int]:
  """Sizes of a released video model read off its tensor shapes (all but the number of heads)."""

  def shape(key):
    if key not in state_dict:
      raise errors.DataError(
          f"{where}: lacks {key!r}; is this a released VidLanKD visn_model.chkpt?"
      )
    return state_dict[key].shape

  projection, input_dim = shape("backbone.video_encoder.new_video_embeddings.0.weight")
  max_steps, hidden = shape(_VIDEO_BERT + "embeddings.position_embeddings.weight")
  layers = {
      int(k.split(".")[4]) for k in state_dict if k.startswith(_VIDEO_BERT + "encoder.layer.")
  }
  return {
      "input_dim": int(input_dim),
      "projection_dim": int(projection),
      "max_steps": int(max_steps),
      "hidden_size": int(hidden),
      "num_layers": len(layers),
      "intermediate_size": int(shape(_VIDEO_BERT + "encoder.layer.0.intermediate.dense.weight")[0]),
      "type_vocab_size": int(shape(_VIDEO_BERT + "embeddings.token_type_embeddings.weight")[0]),
  }


def load_video(video: VideoEncoder, state_dict: dict[str, np.ndarray], where: str) -> None:
  """Copies a released video model's tensors into `video` in place; every key must be accounted for."""
  table = video_key_map(video.config.num_layers)
  missing = sorted(k for k in table if k not in state_dict)
  if missing:
    raise errors.DataError(
        f"{where}: lacks {len(missing)} tensor(s) the video encoder needs: {missing[:8]}"
        + (" ..." if len(missing) > 8 else "")
    )
  _check_all_used(where, _unknown((k for k in state_dict if k not in table), UNUSED_VIDEO))
  for key, (path, transform) in table.items():
    value = state_dict[key]
    if transform == _TRANSPOSE:
      value = value.T
    elif transform == _FIRST_ROWS:  # a table longer than our max_steps: the steps we can read
      value = value[: hf_bert.variable(video, path).get_value().shape[0]]
    elif transform == _SWAP_ROWS:
      if value.shape[0] < 2:
        raise errors.DataError(
            f"{where}: {key!r} has {value.shape[0]} row(s); video steps use token type 1"
        )
      value = np.concatenate([value[1:2], value[0:1], value[2:]])
    hf_bert.assign(video, path, value, f"{where}: {key}")


def load_language(
    model: BertForMaskedLM,
    state_dict: dict[str, np.ndarray],
    where: str,
    unused: tuple[str, ...] = UNUSED_TEACHER_LANGUAGE,
) -> None:
  """Copies a released language model (BertForMaskedLM names) into `model`; unknown keys are errors."""
  if not any(k.startswith("cls.predictions.") for k in state_dict):
    raise errors.DataError(
        f"{where}: has no MLM head (cls.predictions.*); the released language models have one"
    )
  try:
    leftover = hf_bert.load_state_dict(model, state_dict)
  except ValueError as e:
    raise errors.DataError(f"{where}: {e}") from e
  _check_all_used(where, _unknown(leftover, unused))


def student_objectives(state_dict: dict[str, np.ndarray]) -> tuple[str, ...]:
  """Our objective names for the distillation heads a released student carries."""
  return tuple(
      name
      for prefix, name in STUDENT_HEADS.items()
      if any(k.startswith(prefix) for k in state_dict)
  )


def head_output_size(state_dict: dict[str, np.ndarray]) -> int | None:
  """Width the student's heads map to (the teacher's hidden size), or None without heads."""
  for prefix in STUDENT_HEADS:
    key = f"{prefix}decoder.weight"
    if key in state_dict:
      return int(state_dict[key].shape[0])
  return None


def load_student(student: Student, state_dict: dict[str, np.ndarray], where: str) -> None:
  """Copies a released student (BertForMaskedLM + distillation heads) into `student` in place."""
  heads = {prefix: name for prefix, name in STUDENT_HEADS.items() if name in student.kd_heads}
  language = {k: v for k, v in state_dict.items() if not k.startswith(tuple(heads))}
  load_language(student.language, language, where, unused=UNUSED_STUDENT)
  for prefix, name in heads.items():
    for theirs, ours in _HEAD_LAYERS.items():
      norm = theirs == "layer_norm"
      for param, ours_param, transpose in (
          ("weight", "scale" if norm else "kernel", not norm),
          ("bias", "bias", False),
      ):
        key = f"{prefix}{theirs}.{param}"
        if key not in state_dict:
          raise errors.DataError(f"{where}: lacks {key!r} of the {name} distillation head")
        value = state_dict[key].T if transpose else state_dict[key]
        hf_bert.assign(student.kd_heads[name], (ours, ours_param), value, f"{where}: {key}")


def read_hf_config(model_dir: str) -> dict:
  """The released folder's `config.json` (a Hugging Face BERT config) as a dict."""
  path = os.path.join(model_dir, "config.json")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise errors.MissingFileError(
        f"{model_dir}: no config.json (the released folders have one)"
    ) from e
  except json.JSONDecodeError as e:
    raise errors.DataError(f"{path}: not valid JSON ({e})") from e
