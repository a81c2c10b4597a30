"""The VidLanKD student: a BERT with its MLM head plus one head per distillation objective.

Params live under `language` (a `BertForMaskedLM`; fine-tuning reads `params["language"]["bert"]`)
and `kd_heads` (an `nnx.Dict`, objective name -> head):

* an objective declared with the feature head (`vidlankd_jax.objectives`: NST, NT-Xent, CRD,
  MSE, cosine) reads the student's last hidden states through its own `DistillationHead`:
  Linear H->H, GELU, LayerNorm, Linear H->H_teacher, then L2 normalisation per token. The last
  layer maps to the teacher's width, so a teacher larger (or smaller) than the student can be
  distilled;
* an objective with the voken head (the vokenization baseline) has a `VokenClassifier`:
  vokenization's head (Linear H->H, GELU, LayerNorm, Linear H->K), scores over a finite set of K
  vokens.

Objectives without a head (soft-label KD on the MLM logits) and the text-only baseline add none.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vidlankd_jax import objectives as kd_objectives
from vidlankd_jax import errors
from vidlankd_jax.models.bert import BertConfig, BertForMaskedLM, dense, gelu, layer_norm
from vidlankd_jax.ops import l2_normalize

Array = jax.Array


class TransformHead(nnx.Module):
  """Linear H->H, GELU, LayerNorm, Linear H->`out_features`: the released heads' shape."""

  def __init__(self, cfg: BertConfig, out_features: int, output_axes: tuple, *, rngs: nnx.Rngs):
    self.transform = dense(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", None), rngs=rngs)
    self.layer_norm = layer_norm(cfg, cfg.hidden_size, rngs=rngs)
    self.output = dense(cfg, cfg.hidden_size, out_features, output_axes, rngs=rngs)

  def __call__(self, hidden: Array) -> Array:
    return self.output(self.layer_norm(gelu(self.transform(hidden))))


class DistillationHead(TransformHead):
  """The transform head to `out_features`, L2-normalised per token."""

  def __init__(self, cfg: BertConfig, out_features: int, *, rngs: nnx.Rngs):
    super().__init__(cfg, out_features, (None, "embed"), rngs=rngs)

  def __call__(self, hidden: Array) -> Array:
    return l2_normalize(super().__call__(hidden))


class VokenClassifier(TransformHead):
  """Scores [..., K] (float32) of each token over the K vokens, through vokenization's
  classification head (its `BertVLMClassificationHead`)."""

  def __init__(self, cfg: BertConfig, num_vokens: int, *, rngs: nnx.Rngs):
    super().__init__(cfg, num_vokens, (None, None), rngs=rngs)

  def __call__(self, hidden: Array) -> Array:
    return super().__call__(hidden).astype(jnp.float32)


class Student(nnx.Module):
  """`language` (BertForMaskedLM) + `kd_heads` (one head per objective that needs one)."""

  def __init__(
      self,
      cfg: BertConfig,
      objectives: Sequence[str],
      *,
      teacher_hidden_size: int,
      num_vokens: int = 0,
      rngs: nnx.Rngs,
  ):
    self.config = cfg
    self.language = BertForMaskedLM(cfg, rngs=rngs)
    heads = {}
    for name in objectives:
      head = kd_objectives.OBJECTIVES[name].head
      if head == kd_objectives.FEATURE_HEAD:
        heads[name] = DistillationHead(cfg, teacher_hidden_size, rngs=rngs)
      elif head == kd_objectives.VOKEN_HEAD:
        if num_vokens <= 0:
          raise errors.ConfigError(
              f"the voken objective needs a positive number of vokens, got {num_vokens}"
          )
        heads[name] = VokenClassifier(cfg, num_vokens, rngs=rngs)
    self.kd_heads = nnx.Dict(heads)

  def __call__(
      self,
      input_ids: Array,
      attention_mask: Array,
      token_type_ids: Array | None = None,
      mlm_positions: Array | None = None,
      *,
      rngs: nnx.Rngs | None = None,
  ) -> tuple[Array, Array, dict[str, Array]]:
    """(last hidden states [B, L, H], MLM logits at `mlm_positions`, head outputs by objective).

    A distillation head's output is [B, L, H_teacher], unit norm per token; the voken
    classifier's [B, L, K].
    """
    hidden, mlm_logits = self.language(
        input_ids, attention_mask, token_type_ids, mlm_positions, rngs=rngs
    )
    outputs = {}
    for name, head in self.kd_heads.items():
      with jax.named_scope(f"{name}_head"):
        outputs[name] = head(hidden)
    return hidden, mlm_logits, outputs
