"""The VidLanKD teacher: a BERT language encoder with its MLM head, and a video encoder."""

from __future__ import annotations

import jax
from flax import nnx

from vidlankd_jax.models.bert import BertConfig, BertForMaskedLM
from vidlankd_jax.models.video import VideoEncoder
from vidlankd_jax.ops import l2_normalize

Array = jax.Array


class Teacher(nnx.Module):
  """`language` (BertForMaskedLM) + `video` (VideoEncoder); params live under those names."""

  def __init__(
      self,
      language_cfg: BertConfig,
      video_cfg: BertConfig,
      *,
      video_input_dim: int,
      video_projection_dim: int,
      video_max_steps: int,
      clip_mlp_dropout: float,
      video_embedding_passes: int = 1,
      video_mask_rule: str = "steps",
      rngs: nnx.Rngs,
  ):
    self.language = BertForMaskedLM(language_cfg, rngs=rngs)
    self.video = VideoEncoder(
        video_cfg,
        input_dim=video_input_dim,
        projection_dim=video_projection_dim,
        max_steps=video_max_steps,
        clip_mlp_dropout=clip_mlp_dropout,
        embedding_passes=video_embedding_passes,
        mask_rule=video_mask_rule,
        rngs=rngs,
    )

  @classmethod
  def from_config(cls, config, *, dtype: str | None = None, rngs: nnx.Rngs) -> "Teacher":
    """Builds from a teacher config (`config.model`, `config.video`); both towers compute in
    `dtype`, else in the config's own `dtype`."""
    dtype = dtype or config.get("dtype")
    return cls(
        BertConfig.from_config(config.model, dtype=dtype),
        BertConfig.from_config(config.video, dtype=dtype),
        video_input_dim=config.video.input_dim,
        video_projection_dim=config.video.projection_dim,
        video_max_steps=config.video.max_steps,
        clip_mlp_dropout=config.video.clip_mlp_dropout,
        video_embedding_passes=config.video.get("embedding_passes", 1),
        video_mask_rule=config.video.get("mask_rule", "steps"),
        rngs=rngs,
    )

  def __call__(self, batch: dict, *, rngs: nnx.Rngs | None = None) -> dict[str, Array]:
    """Token states (L2-normalised), MLM logits at the masked positions, and clip vectors."""
    hidden, mlm_logits = self.language(
        batch["input_ids"],
        batch["attention_mask"],
        batch["token_type_ids"],
        batch["mlm_positions"],
        rngs=rngs,
    )
    clip, steps = self.video(batch["video_features"], batch["video_mask"], rngs=rngs)
    return {"tokens": l2_normalize(hidden), "mlm_logits": mlm_logits, "clip": clip, "steps": steps}

  def text_states(
      self, input_ids: Array, attention_mask: Array, token_type_ids: Array | None = None
  ) -> Array:
    """What distillation reads: last-layer token states, L2-normalised; no vocabulary head."""
    return l2_normalize(self.language.bert.encode(input_ids, attention_mask, token_type_ids))
