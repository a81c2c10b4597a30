"""Video encoder: a BERT-style transformer over per-second video features.

Features [B, T, D] (D = 4096: 2D ResNet-152 + 3D ResNeXt-101 per second, or another width from the
data) are projected D -> 1024 -> H (two linear maps, no nonlinearity between, as the reference),
given position and token-type embeddings once (the reference adds them twice, each time followed
by the same LayerNorm: `embedding_passes=2` reproduces that for imported checkpoints), LayerNorm and
dropout, then a transformer whose size is set independently of the language side. The clip vector
is the pooled first position through an MLP (H->H, ReLU, dropout 0.3, H->H), L2-normalised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vidlankd_jax import errors
from vidlankd_jax.ops import l2_normalize
from vidlankd_jax.models.bert import BertConfig, TransformerStack, dense, embedding, layer_norm

Array = jax.Array


# "steps": the clip's stored steps are real; "last_channel": also masks a step whose last feature
# is 0, as the released training loop (`voken_masks = (voken_labels != 0)[:, :, -1]`).
MASK_RULES = ("steps", "last_channel")


class VideoEncoder(nnx.Module):
  """Returns (clip vector [B, H], L2-normalised; per-step hidden states [B, T, H])."""

  def __init__(
      self,
      cfg: BertConfig,
      *,
      input_dim: int,
      projection_dim: int,
      max_steps: int,
      clip_mlp_dropout: float = 0.3,
      embedding_passes: int = 1,
      mask_rule: str = "steps",
      rngs: nnx.Rngs,
  ):
    if embedding_passes not in (1, 2):
      raise errors.ConfigError(
          f"embedding_passes must be 1 or 2 (config.video.embedding_passes), "
          f"got {embedding_passes}"
      )
    if mask_rule not in MASK_RULES:
      raise ValueError(
          f"mask_rule {mask_rule!r} is not one of {MASK_RULES} (config.video.mask_rule)"
      )
    h = cfg.hidden_size
    self.mask_rule = mask_rule
    self.config = cfg
    self.input_dim = input_dim
    self.embedding_passes = embedding_passes
    self.projection_in = dense(cfg, input_dim, projection_dim, (None, "mlp"), rngs=rngs)
    self.projection_out = dense(cfg, projection_dim, h, ("mlp", "embed"), rngs=rngs)
    self.position_embeddings = embedding(cfg, max_steps, h, (None, "embed"), rngs=rngs)
    self.token_type_embeddings = embedding(cfg, cfg.type_vocab_size, h, (None, "embed"), rngs=rngs)
    self.layer_norm = layer_norm(cfg, h, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.hidden_dropout)
    self.encoder = TransformerStack(cfg, rngs=rngs)
    self.pooler = dense(cfg, h, h, ("embed", None), rngs=rngs)
    self.clip_mlp_in = dense(cfg, h, h, ("embed", "mlp"), rngs=rngs)
    self.clip_mlp_out = dense(cfg, h, h, ("mlp", "embed"), rngs=rngs)
    self.clip_dropout = nnx.Dropout(clip_mlp_dropout)

  @jax.named_scope("video_encoder")
  def __call__(
      self, features: Array, mask: Array, *, rngs: nnx.Rngs | None = None
  ) -> tuple[Array, Array]:
    if features.shape[-1] != self.input_dim:
      raise ValueError(
          f"video features have width {features.shape[-1]}, the encoder expects "
          f"{self.input_dim} (config.video.input_dim)"
      )
    deterministic = rngs is None
    steps = self.encode_steps(features, mask, rngs=rngs)
    with jax.named_scope("clip_head"):
      pooled = jnp.tanh(self.pooler(steps[:, 0]))
      h = jax.nn.relu(self.clip_mlp_in(pooled))
      h = self.clip_mlp_out(self.clip_dropout(h, deterministic=deterministic, rngs=rngs))
      return l2_normalize(h), steps

  def encode_steps(self, features: Array, mask: Array, *, rngs: nnx.Rngs | None = None) -> Array:
    """Per-step hidden states [B, T, H]; padding steps (mask 0) are never attended to, nor with
    `mask_rule="last_channel"` steps whose last feature (the 3D stream's last channel) is 0."""
    if self.mask_rule == "last_channel":
      mask = mask * (features[..., -1] != 0).astype(mask.dtype)
    return self.encoder(self.embed(features, rngs), mask, rngs=rngs)

  @jax.named_scope("video_embeddings")
  def embed(self, features: Array, rngs: nnx.Rngs | None) -> Array:
    """The projected features plus position and type embeddings, normalised: [B, T, H]."""
    x = self.projection_out(self.projection_in(features.astype(self.config.compute_dtype)))
    t = features.shape[1]
    added = self.position_embeddings(jnp.arange(t))[None] + self.token_type_embeddings(
        jnp.zeros(features.shape[:2], jnp.int32)
    )
    for _ in range(self.embedding_passes):
      x = self.dropout(self.layer_norm(x + added), deterministic=rngs is None, rngs=rngs)
    return x
