"""BERT in flax.nnx: embeddings, post-LN transformer, pooler and a tied MLM head.

Every weight carries logical axis names (`nnx.with_partitioning`); the mesh rules in the config
map them to mesh axes. Parameters are float32; `dtype` sets the compute dtype ("auto": bfloat16
on GPUs and TPUs, float32 on CPUs, where bf16 matmuls are slow). The numerics follow Hugging
Face's `BertModel` (exact-erf GELU, LayerNorm eps 1e-12) so that real checkpoints import exactly
(see `vidlankd_jax.interop.hf_bert`).

The layers are held stacked in memory (`TransformerStack`: every layer weight one array with a
leading layer axis) and run under one `jax.lax.scan` (`scan_layers`): the program holds one layer
whatever the depth, so compile time does not grow with it. Checkpoints and the weight import and
export see one entry per layer (`encoder/layers/<i>/...`); `vidlankd_jax.models.layout` converts
between the two. `remat` chooses what the backward pass recomputes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vidlankd_jax import errors

Array = jax.Array

# What a layer's backward pass may keep from its forward pass (the rest is recomputed).
REMAT_POLICIES = {
    "none": None,  # keep everything: fastest, most memory
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer
}
DTYPES = ("auto", "float32", "bfloat16")


def target_platform() -> str:
  """The platform the model is built for: that of the current mesh's devices (`jax.set_mesh`,
  as `sharding.create_sharded` sets it; a TPU topology's when compiling ahead of time on a CPU
  host), else this process's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def resolve_dtype(name: str, platform: str | None = None) -> str:
  """The compute dtype a config's `dtype` names: "auto" is bfloat16 when the target (`platform`,
  default `target_platform()`) is an accelerator, float32 on CPU."""
  if name not in DTYPES:
    raise errors.ConfigError(f"config dtype {name!r} is not one of {DTYPES}")
  if name == "auto":
    return "bfloat16" if (platform or target_platform()) in ("gpu", "tpu") else "float32"
  return name


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Sizes and numerics of a BERT encoder."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  dtype: str = "float32"
  # None: the fused dot_product_attention picks its kernel; "cudnn" / "xla" force one.
  attention_impl: str | None = None
  scan_layers: bool = True
  remat: str = "none"

  def __post_init__(self):
    if isinstance(self.remat, bool):  # configs written before the policies existed
      object.__setattr__(self, "remat", "full" if self.remat else "none")
    if self.remat not in REMAT_POLICIES:
      raise errors.ConfigError(f"remat {self.remat!r} is not one of {sorted(REMAT_POLICIES)}")
    object.__setattr__(self, "dtype", resolve_dtype(self.dtype))

  @classmethod
  def from_config(cls, cfg: Any, **overrides) -> "BertConfig":
    """Builds from an ml_collections model config (extra keys such as `size` are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dict(cfg).items() if k in names}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


def dense(
    cfg: BertConfig, in_features: int, out_features: int, axes: tuple, *, rngs: nnx.Rngs
) -> nnx.Linear:
  """A Linear layer with truncated-normal init and logical axes `axes` = (in, out)."""
  return nnx.Linear(
      in_features,
      out_features,
      kernel_init=nnx.with_partitioning(
          nnx.initializers.truncated_normal(cfg.initializer_range), axes
      ),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
      dtype=cfg.compute_dtype,
      param_dtype=jnp.float32,
      rngs=rngs,
  )


def layer_norm(cfg: BertConfig, features: int, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(
      features,
      epsilon=cfg.layer_norm_eps,
      dtype=cfg.compute_dtype,
      param_dtype=jnp.float32,
      scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)),
      rngs=rngs,
  )


def embedding(
    cfg: BertConfig, num: int, features: int, axes: tuple, *, rngs: nnx.Rngs
) -> nnx.Embed:
  return nnx.Embed(
      num,
      features,
      embedding_init=nnx.with_partitioning(
          nnx.initializers.truncated_normal(cfg.initializer_range), axes
      ),
      dtype=cfg.compute_dtype,
      param_dtype=jnp.float32,
      rngs=rngs,
  )


def gelu(x: Array) -> Array:
  """BERT's exact (erf) GELU."""
  return jax.nn.gelu(x, approximate=False)


class BertEmbeddings(nnx.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.word_embeddings = embedding(
        cfg, cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), rngs=rngs
    )
    self.position_embeddings = embedding(
        cfg, cfg.max_position_embeddings, cfg.hidden_size, (None, "embed"), rngs=rngs
    )
    self.token_type_embeddings = embedding(
        cfg, cfg.type_vocab_size, cfg.hidden_size, (None, "embed"), rngs=rngs
    )
    self.layer_norm = layer_norm(cfg, cfg.hidden_size, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.hidden_dropout)

  @jax.named_scope("embeddings")
  def __call__(
      self, input_ids: Array, token_type_ids: Array, *, rngs: nnx.Rngs | None = None
  ) -> Array:
    positions = jnp.arange(input_ids.shape[-1])
    x = (
        self.word_embeddings(input_ids)
        + self.position_embeddings(positions)[None]
        + self.token_type_embeddings(token_type_ids)
    )
    return self.dropout(self.layer_norm(x), deterministic=rngs is None, rngs=rngs)


class BertSelfAttention(nnx.Module):
  """Multi-head self-attention with a padding mask, then output projection, residual and LN."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    h = cfg.hidden_size
    if h % cfg.num_heads:
      raise ValueError(f"hidden_size {h} is not divisible by num_heads {cfg.num_heads}")
    self.num_heads = cfg.num_heads
    self.impl = cfg.attention_impl
    self.query = dense(cfg, h, h, ("embed", "heads"), rngs=rngs)
    self.key = dense(cfg, h, h, ("embed", "heads"), rngs=rngs)
    self.value = dense(cfg, h, h, ("embed", "heads"), rngs=rngs)
    self.output = dense(cfg, h, h, ("heads", "embed"), rngs=rngs)
    self.layer_norm = layer_norm(cfg, h, rngs=rngs)
    self.attention_dropout = cfg.attention_dropout
    self.dropout = nnx.Dropout(cfg.hidden_dropout)

  @jax.named_scope("attention")
  def __call__(self, x: Array, mask: Array, *, rngs: nnx.Rngs | None = None) -> Array:
    b, l, h = x.shape
    split = lambda t: t.reshape(b, l, self.num_heads, h // self.num_heads)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    key_mask = mask[:, None, None, :].astype(bool)  # [B, 1, 1, L] broadcast over heads and queries
    if rngs is None or self.attention_dropout == 0.0:
      # The fused kernel (cuDNN flash attention on NVIDIA GPUs, XLA's elsewhere).
      context = jax.nn.dot_product_attention(q, k, v, mask=key_mask, implementation=self.impl)
    else:
      # Dropout on the attention probabilities (BERT's recipe) needs the probabilities: no fused
      # kernel offers it with a per-step seed, so this path is the plain XLA formulation.
      # `attention_dropout=0` trades the recipe for the fused kernel.
      scale = 1.0 / jnp.sqrt(jnp.float32(h // self.num_heads))
      scores = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) * scale
      scores = jnp.where(key_mask, scores, jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(scores, axis=-1)
      keep = jax.random.bernoulli(rngs.dropout(), 1.0 - self.attention_dropout, probs.shape)
      probs = jnp.where(keep, probs * (1.0 / (1.0 - self.attention_dropout)), 0.0)
      context = jnp.einsum("bnqk,bknd->bqnd", probs.astype(v.dtype), v)
    out = self.output(context.reshape(b, l, h))
    out = self.dropout(out, deterministic=rngs is None, rngs=rngs)
    return self.layer_norm(out + x)


class BertLayer(nnx.Module):
  """Post-LN transformer layer: attention block then feed-forward block."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.attention = BertSelfAttention(cfg, rngs=rngs)
    self.intermediate = dense(
        cfg, cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), rngs=rngs
    )
    self.output = dense(cfg, cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), rngs=rngs)
    self.layer_norm = layer_norm(cfg, cfg.hidden_size, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.hidden_dropout)

  def __call__(self, x: Array, mask: Array, *, rngs: nnx.Rngs | None = None) -> Array:
    x = self.attention(x, mask, rngs=rngs)
    with jax.named_scope("mlp"):
      y = self.output(gelu(self.intermediate(x)))
      y = self.dropout(y, deterministic=rngs is None, rngs=rngs)
      return self.layer_norm(y + x)


class TransformerStack(nnx.Module):
  """`num_layers` BertLayers held stacked (each weight one array with a leading layer axis);
  returns the last hidden states.

  `scan_layers` runs them with one `lax.scan` (the program holds one layer whatever the depth);
  otherwise a Python loop indexes the stack. Each layer's dropout key is its slot of one split
  of the caller's key in both forms, so the two compute the same function. Checkpoints and weight
  interop see one entry per layer (`vidlankd_jax.models.layout`).
  """

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
    def make_layers(rngs):
      return BertLayer(cfg, rngs=rngs)

    self.layers = make_layers(rngs)
    self.num_layers = cfg.num_layers
    self.scan_layers = cfg.scan_layers
    self.remat = cfg.remat

  def __call__(self, x: Array, mask: Array, *, rngs: nnx.Rngs | None = None) -> Array:
    keys = None if rngs is None else jax.random.split(rngs.dropout(), self.num_layers)
    graphdef, stacked = nnx.split(self.layers)

    def apply(state, h, key):
      layer = nnx.merge(graphdef, state)
      return layer(h, mask, rngs=None if key is None else nnx.Rngs(dropout=key))

    if self.remat != "none":
      apply = jax.checkpoint(apply, policy=REMAT_POLICIES[self.remat])
    if not self.scan_layers:
      for i in range(self.num_layers):
        state = jax.tree.map(lambda w: w[i], stacked)
        with jax.named_scope(f"layer_{i}"):
          x = apply(state, x, None if keys is None else keys[i])
      return x

    def body(h, layer_inputs):
      state, key = layer_inputs
      with jax.named_scope("layer"):  # the scanned body: every layer of the stack
        return apply(state, h, key), None

    with jax.named_scope("layers"):
      x, _ = jax.lax.scan(body, x, (stacked, keys))
    return x


class BertModel(nnx.Module):
  """BERT encoder: returns (last hidden states [B, L, H], pooled [CLS] output [B, H])."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embeddings = BertEmbeddings(cfg, rngs=rngs)
    self.encoder = TransformerStack(cfg, rngs=rngs)
    self.pooler = dense(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", None), rngs=rngs)

  def __call__(
      self,
      input_ids: Array,
      attention_mask: Array,
      token_type_ids: Array | None = None,
      *,
      rngs: nnx.Rngs | None = None,
  ) -> tuple[Array, Array]:
    hidden = self.encode(input_ids, attention_mask, token_type_ids, rngs=rngs)
    return hidden, self.pool(hidden)

  @jax.named_scope("bert")
  def encode(
      self,
      input_ids: Array,
      attention_mask: Array,
      token_type_ids: Array | None = None,
      *,
      rngs: nnx.Rngs | None = None,
  ) -> Array:
    """Last hidden states only (no pooler): what distillation and token-level losses read."""
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = self.embeddings(input_ids, token_type_ids, rngs=rngs)
    return self.encoder(x, attention_mask, rngs=rngs)

  @jax.named_scope("pooler")
  def pool(self, hidden: Array) -> Array:
    return jnp.tanh(self.pooler(hidden[:, 0]))


def gather_positions(hidden: Array, positions: Array) -> Array:
  """hidden [B, L, H], positions [B, P] -> [B, P, H]."""
  return jnp.take_along_axis(hidden, positions[..., None].astype(jnp.int32), axis=1)


class MlmHead(nnx.Module):
  """Dense + GELU + LayerNorm, then logits through the (tied) word embeddings plus a bias."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.transform = dense(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", None), rngs=rngs)
    self.layer_norm = layer_norm(cfg, cfg.hidden_size, rngs=rngs)
    self.bias = nnx.Param(
        nnx.with_partitioning(nnx.initializers.zeros_init(), ("vocab",))(
            rngs.params(), (cfg.vocab_size,), jnp.float32
        )
    )

  @jax.named_scope("mlm_head")
  def __call__(
      self, hidden: Array, word_embeddings: nnx.Embed, positions: Array | None = None
  ) -> Array:
    """Vocabulary logits (float32) at `positions` [B, P] if given (the masked ones), else everywhere."""
    if positions is not None:
      hidden = gather_positions(hidden, positions)
    h = self.layer_norm(gelu(self.transform(hidden)))
    logits = word_embeddings.attend(h)
    return logits.astype(jnp.float32) + self.bias[...]


class BertForMaskedLM(nnx.Module):
  """BERT with its MLM head: returns (last hidden states, logits at `mlm_positions`)."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.bert = BertModel(cfg, rngs=rngs)
    self.mlm = MlmHead(cfg, rngs=rngs)

  def __call__(
      self,
      input_ids: Array,
      attention_mask: Array,
      token_type_ids: Array | None = None,
      mlm_positions: Array | None = None,
      *,
      rngs: nnx.Rngs | None = None,
  ) -> tuple[Array, Array]:
    hidden = self.bert.encode(input_ids, attention_mask, token_type_ids, rngs=rngs)
    return hidden, self.mlm(hidden, self.bert.embeddings.word_embeddings, mlm_positions)
