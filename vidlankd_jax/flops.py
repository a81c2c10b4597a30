"""Analytic FLOPs of each stage's training step, term by term (what MFU and the pod plan's
replication factor are counted against).

Matmul FLOPs only (biases, LayerNorm, softmax, the losses and the optimiser update are left out):

    encoder(n, H, F)  = n (4 H^2 + 2 H F)       weights a token passes through in n layers
    attention(n, L, H) = 4 n L H                 QKᵀ and AV FLOPs per token over L positions
    forward of a model on T tokens = 2 T encoder + T attention (+ its heads)
    training = 3 x forward (the backward pass is twice the forward), i.e. 6 N T + attention;
    a matmul whose input is the data (the teacher's video projection) 2 x forward: its
    backward has no input gradient;
    a frozen model (the distillation teacher) costs its forward only.

Every function returns {term: FLOPs of the whole global batch}; `total` sums them.
"""

from __future__ import annotations

TRAIN = 3.0  # forward + backward (2x forward)


def encoder_flops(m) -> int:
  """encoder(n, H, F): matmul weights a token passes through in `m`'s layers (2 FLOPs each)."""
  return m.num_layers * (4 * m.hidden_size**2 + 2 * m.hidden_size * m.intermediate_size)


def attention_flops(m, seq_len: int) -> int:
  """attention(n, L, H): QKᵀ and AV FLOPs per token of encoder `m` over `seq_len` positions."""
  return 4 * m.num_layers * seq_len * m.hidden_size


def mlm_head_flops(m, positions: int) -> int:
  """Forward FLOPs of the MLM head (transform H x H, tied decoder H x V) at `positions`."""
  return 2 * positions * (m.hidden_size**2 + m.vocab_size * m.hidden_size)


def encoder_forward(m, tokens: int, seq_len: int) -> int:
  """Forward matmul FLOPs of encoder `m` over `tokens` tokens in sequences of `seq_len`."""
  return 2 * tokens * encoder_flops(m) + tokens * attention_flops(m, seq_len)


def total(terms: dict[str, float]) -> float:
  return float(sum(terms.values()))


def distill_step(config) -> dict[str, float]:
  """Student trained (encoder, distillation heads H_s x H_s + H_s x H_t each, MLM head at the
  masked positions) and the frozen teacher's language encoder forward (no vocabulary head but
  for soft-label KD)."""
  from vidlankd_jax.objectives import FEATURE_OBJECTIVES, parse_objectives

  b, l, p = config.train.batch_size, config.data.seq_len, config.data.max_predictions
  s, t = config.model, config.teacher.model
  tokens = b * l
  objectives = parse_objectives(config.kd.objectives)
  heads = sum(1 for o in objectives if o in FEATURE_OBJECTIVES)
  terms = {
      "student encoder (train)": TRAIN * encoder_forward(s, tokens, l),
      "student MLM head (train)": TRAIN * mlm_head_flops(s, b * p),
  }
  if heads:
    head = 2 * tokens * (s.hidden_size**2 + s.hidden_size * t.hidden_size)
    terms["student distillation heads (train)"] = TRAIN * heads * head
  if objectives:
    terms["teacher encoder (forward)"] = float(encoder_forward(t, tokens, l))
    if "kd" in objectives:
      terms["teacher MLM head (forward)"] = float(mlm_head_flops(t, b * p))
  return terms


def teacher_step(config) -> dict[str, float]:
  """Both towers trained (the video tower counted at its forward only when frozen): text encoder
  and MLM head; video projection (D x Q, Q x H), encoder, pooler and the two-layer clip MLP on
  the first step."""
  b, l, p = config.train.batch_size, config.data.seq_len, config.data.max_predictions
  m, v, steps = config.model, config.video, config.video.max_steps
  rows = 2 * b * steps
  video_passes = 1.0 if v.frozen else TRAIN
  # The first projection's input is the data: its backward is the weight gradient only.
  first_passes = 1.0 if v.frozen else TRAIN - 1.0
  return {
      "text encoder (train)": TRAIN * encoder_forward(m, b * l, l),
      "text MLM head (train)": TRAIN * mlm_head_flops(m, b * p),
      "video projection (train)": first_passes * rows * v.input_dim * v.projection_dim
      + video_passes * rows * v.projection_dim * v.hidden_size,
      "video encoder (train)": video_passes * encoder_forward(v, b * steps, steps),
      "video pooler and clip MLP (train)": video_passes * 2 * b * 3 * v.hidden_size**2,
  }


def finetune_step(config, kind: str, num_labels: int, seq_len: int) -> dict[str, float]:
  """The encoder and its task head trained on the batch's rows (B x C rows for multiple
  choice)."""
  b, m = config.train.batch_size, config.model
  rows = b * (num_labels if kind == "multiple_choice" else 1)
  h = m.hidden_size
  if kind == "span":
    head = 2 * rows * seq_len * h * 2
  else:  # the pooler (H x H) and the Linear (H x K, K = 1 for regression and choices)
    head = 2 * rows * (h * h + h * (num_labels if kind == "classification" else 1))
  return {
      "encoder (train)": TRAIN * encoder_forward(m, rows * seq_len, seq_len),
      "task head (train)": TRAIN * head,
  }
