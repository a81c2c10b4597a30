"""Losses of VidLanKD as pure, jitted functions over arrays.

Every function here takes arrays and returns arrays: no model, no parameters, no state other
than what is passed in (the CRD memory bank is an explicit pytree argument and result). All of
them are vectorised over the batch and the positions, and they compute in float32 whatever the
input dtype (bf16 activations are upcast before any product or reduction).

Conventions used throughout:

* ``B`` batch, ``L`` sequence length, ``H`` hidden size, ``V`` vocabulary size, ``P`` number of
  gathered (masked) positions, ``D`` projection size, ``N`` number of examples in a memory bank.
* A ``mask`` or ``weights`` array has the shape of its inputs without the last (feature) axis;
  1 marks a real token (or the weight of a position), 0 padding.
* "Masked mean" means ``sum(value * mask) / sum(mask)``, and 0 when ``sum(mask) == 0``.
* The functions are written over the global batch: under ``jax.jit`` with a batch sharded over a
  data-parallel mesh axis, every in-batch negative is drawn from the whole global batch and the
  value equals the one-device value.
* No function stops gradients into its inputs (the caller freezes a teacher if it wants to); only
  the CRD memory bank is gradient-stopped.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from vidlankd_jax.ops import inverse_norm, l2_normalize

# Full float32 precision for the small contractions in the losses (TPUs otherwise default to a
# single bf16 pass for float32 matmuls).
_PRECISION = jax.lax.Precision.HIGHEST

# Logit given to excluded entries of a softmax. Finite (rather than -inf) so that a row with every
# entry excluded stays finite and its zero weight gives zero gradient instead of NaN.
_EXCLUDED_LOGIT = -1e9


def _einsum(subscripts, *operands):
  return jnp.einsum(subscripts, *operands, precision=_PRECISION)


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def _safe_denominator(x):
  """``x`` where it is positive, else 1 (so that an empty masked sum divides to 0)."""
  return jnp.where(x > 0, x, 1.0)


def _masked_mean(values, mask):
  """``sum(values * mask) / sum(mask)`` over all axes; 0 when the mask is empty."""
  mask = jnp.broadcast_to(_f32(mask), values.shape)
  return jnp.sum(values * mask) / _safe_denominator(jnp.sum(mask))


def _hinge(x):
  return jnp.maximum(x, 0.0)


# ---------------------------------------------------------------------------------------------
# Classification losses: MLM (teacher and student) and voken classification.
# ---------------------------------------------------------------------------------------------


def _token_cross_entropy(logits, labels):
  """Per-position ``logsumexp(logits) - logits[label]``; logits [..., V], labels [...]."""
  logits = _f32(logits)
  labels = jnp.clip(labels, 0, logits.shape[-1] - 1)
  true_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - true_logit


@jax.jit
def weighted_cross_entropy(logits, labels, weights):
  """Weighted mean cross-entropy.

  ``loss = sum_p w_p * (logsumexp_v z_{p,v} - z_{p,y_p}) / sum_p w_p`` (0 if ``sum w == 0``).

  Args:
    logits: [..., V] float (any float dtype; computed in float32).
    labels: [...] int. Labels at zero-weight positions may hold any value (e.g. -100); they
      are clipped into range and contribute nothing.
    weights: [...] float, the weight of each position.
  Returns:
    A float32 scalar.
  """
  return _masked_mean(_token_cross_entropy(logits, labels), weights)


@jax.jit
def weighted_accuracy(logits, labels, weights):
  """Weighted accuracy ``sum_p w_p * [argmax_v z_{p,v} == y_p] / sum_p w_p``.

  Shapes as in :func:`weighted_cross_entropy`; returns a float32 scalar.
  """
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return _masked_mean(correct, weights)


@jax.jit
def mlm_loss(logits, labels, weights):
  """Masked-language-modelling loss and accuracy, shared by the teacher and the student.

  The MLM head is run only on the gathered masked positions, so:

  ``loss = sum_{b,p} w_{b,p} * CE(z_{b,p}, y_{b,p}) / sum_{b,p} w_{b,p}``, with
  ``CE(z, y) = logsumexp(z) - z_y``; the accuracy is the same weighted mean of
  ``[argmax z == y]``.

  Args:
    logits: [B, P, V] head outputs at the P gathered positions.
    labels: [B, P] int original token ids.
    weights: [B, P] float, 1 for a masked position, 0 for a padding slot of the gather.
  Returns:
    ``(loss, accuracy)``, float32 scalars (both 0 if every weight is 0).
  """
  return (
      weighted_cross_entropy(logits, labels, weights),
      weighted_accuracy(logits, labels, weights),
  )


@jax.jit
def voken_classification_loss(logits, voken_labels, weights):
  """Voken classification (the vokenization baseline): cross-entropy over a finite voken set.

  ``loss = sum_{b,l} w_{b,l} * CE(z_{b,l}, k_{b,l}) / sum_{b,l} w_{b,l}``: every real token is
  classified into its voken id ``k`` (weights = the attention mask; special tokens may be
  weighted 0 by the caller).

  Args:
    logits: [B, L, K] scores over the K vokens.
    voken_labels: [B, L] int voken ids.
    weights: [B, L] float.
  Returns:
    A float32 scalar.
  """
  return weighted_cross_entropy(logits, voken_labels, weights)


# ---------------------------------------------------------------------------------------------
# Teacher: video-language contrastive losses.
# ---------------------------------------------------------------------------------------------


@jax.jit
def paired_hinge_rank_loss(lang, visn, lang_mask, margin=1.0):
  """Token-level paired hinge ranking loss of the teacher (the released objective).

  The batch is split into halves A = samples [0, h) and B = [h, 2h); sample i of A takes
  sample i of B as its negative and the reverse, i.e. the partner of sample i is
  ``o(i) = (i + h) mod 2h``. With x_{i,t} the normalised token states and v_i the clip vectors:

  ``loss = sum_i sum_t m_{i,t} * max(0, margin - x_{i,t}.v_i + x_{i,t}.v_{o(i)})
           / sum_i sum_t m_{i,t}``

  (0 when there is no real token).

  Odd batch (as the reference code): the last sample is repeated once so that the halves are
  equal (2h = B + 1). For B >= 3 the last sample (index B - 1 = 2h - 2) and its copy (2h - 1)
  both lie in half B, partnered with samples h - 2 and h - 1 of A respectively: the last
  sample's tokens are scored twice (once against each partner's clip), both of those A samples
  take the last clip as their negative, and its real tokens count twice in the denominator.
  For B = 1 the sample is its own negative and every real token contributes exactly
  ``margin``.

  Args:
    lang: [B, L, H] L2-normalised token states.
    visn: [B, H] L2-normalised clip vectors.
    lang_mask: [B, L], 1 for a real token, 0 for padding.
    margin: the hinge margin m (1.0 in the reference).
  Returns:
    A float32 scalar.
  """
  lang, visn, mask = _f32(lang), _f32(visn), _f32(lang_mask)
  if lang.shape[0] % 2:
    lang, visn, mask = (jnp.concatenate([a, a[-1:]], axis=0) for a in (lang, visn, mask))
  half = lang.shape[0] // 2
  visn_other = jnp.roll(visn, half, axis=0)  # row i holds v_{(i + h) mod 2h}
  own = _einsum("blh,bh->bl", lang, visn)
  other = _einsum("blh,bh->bl", lang, visn_other)
  return _masked_mean(_hinge(margin - own + other), mask)


@jax.jit
def batchwise_hinge_rank_loss(lang, visn, lang_mask, margin=1.0):
  """Batch-wise hinge ranking loss: every other clip / sentence of the batch is a negative.

  With s_{i,j,t} = x_{i,t}.v_j (token t of sentence i against clip j) and positives
  p_{i,t} = s_{i,i,t}:

  * token -> other clips: ``T = sum_{i,j != i,t} m_{i,t} max(0, margin - p_{i,t} + s_{i,j,t})``
  * clip -> other sentences' tokens (position-aligned, as the reference): clip j ranks its own
    sentence's token t above token t of every other sentence i:
    ``C = sum_{j,i != j,t} m_{i,t} m_{j,t} max(0, margin - p_{j,t} + s_{i,j,t})``
    (both tokens must be real; the reference weighted by m_{i,t} only, which lets padding
    positions of sentence j act as positives).

  ``loss = (T + C) / max(B * sum_{i,t} m_{i,t}, 1)``: the reference's normalisation, where each
  sentence's tokens are counted once per clip of the batch, the diagonal j = i included (those
  terms are zero by construction), so a denominator of B rather than B - 1 copies.

  Args:
    lang: [B, L, H] L2-normalised token states.
    visn: [B, H] L2-normalised clip vectors.
    lang_mask: [B, L], 1 for a real token.
    margin: the hinge margin.
  Returns:
    A float32 scalar.
  """
  lang, visn, mask = _f32(lang), _f32(visn), _f32(lang_mask)
  batch = lang.shape[0]
  scores = _einsum("ilh,jh->ijl", lang, visn)  # [B(lang), B(clip), L]
  positive = _einsum("ilh,ih->il", lang, visn)  # [B, L]
  off_diagonal = 1.0 - jnp.eye(batch, dtype=jnp.float32)[:, :, None]
  token_to_clip = _hinge(margin - positive[:, None, :] + scores) * mask[:, None, :]
  clip_to_token = (
      _hinge(margin - positive[None, :, :] + scores) * mask[:, None, :] * mask[None, :, :]
  )
  total = jnp.sum((token_to_clip + clip_to_token) * off_diagonal)
  return total / jnp.maximum(batch * jnp.sum(mask), 1.0)


@jax.jit
def info_nce_loss(lang, visn, lang_mask, temperature):
  """Symmetric InfoNCE between sentences (their tokens) and clips, over the global batch.

  With s_{i,j,t} = x_{i,t}.v_j / tau:

  * token -> clip: every real token (i, t) classifies its own clip among all B clips:
    ``L_tc = masked_mean_{i,t}( logsumexp_j s_{i,j,t} - s_{i,i,t} )`` over real tokens.
  * clip -> sentence: a sentence's score for clip j is the mean of its real tokens' scores,
    ``S_{i,j} = sum_t m_{i,t} s_{i,j,t} / sum_t m_{i,t}`` (= the mean-pooled token state against
    the clip, divided by tau); every clip classifies its own sentence among all B sentences:
    ``L_cs = mean_j( logsumexp_i S_{i,j} - S_{j,j} )``.

  ``loss = (L_tc + L_cs) / 2``. Under ``jax.jit`` with the batch sharded over a data axis the
  negatives are the whole global batch.

  Args:
    lang: [B, L, H] L2-normalised token states.
    visn: [B, H] L2-normalised clip vectors.
    lang_mask: [B, L], 1 for a real token.
    temperature: tau > 0.
  Returns:
    A float32 scalar.
  """
  lang, visn, mask = _f32(lang), _f32(visn), _f32(lang_mask)
  scores = _einsum("ilh,jh->ijl", lang, visn) / temperature  # [B(lang), B(clip), L]
  positive = _einsum("ilh,ih->il", lang, visn) / temperature  # [B, L]
  token_to_clip = _masked_mean(jax.nn.logsumexp(scores, axis=1) - positive, mask)
  lengths = _safe_denominator(jnp.sum(mask, axis=1))
  sentence = _einsum("ijl,il->ij", scores, mask) / lengths[:, None]  # [B(sentence), B(clip)]
  clip_to_sentence = jnp.mean(jax.nn.logsumexp(sentence, axis=0) - jnp.diagonal(sentence))
  return 0.5 * (token_to_clip + clip_to_sentence)


# ---------------------------------------------------------------------------------------------
# Distillation: neuron selectivity transfer (NST).
# ---------------------------------------------------------------------------------------------


def _unit_position_gram(x):
  """For x [B, L, H] with each unit's column normalised over L: the L x L Gram Sᵀ S per sequence.

  With S_b = x_bᵀ (H x L), the H x H kernel sums satisfy
  ``sum_{i,j} (s_i.s_j)^2 = ||S Sᵀ||_F^2 = ||Sᵀ S||_F^2`` and
  ``sum_{i,j} (s_i.t_j)^2 = ||S Tᵀ||_F^2 = <Sᵀ S, Tᵀ T>_F``, so only [B, L, L] is formed.
  """
  return _einsum("blh,bmh->blm", x, x)


def _nst_per_sequence(student, teacher):
  """[B]: the released NST value of each sequence (see :func:`nst_loss`)."""
  hidden = student.shape[2]
  gram_s = _unit_position_gram(l2_normalize(student, axis=1))
  gram_t = _unit_position_gram(l2_normalize(teacher, axis=1))
  return jnp.sum(gram_s * (gram_s - 2.0 * gram_t), axis=(1, 2)) / hidden**2


@jax.jit
def nst_loss(student, teacher):
  """Neuron selectivity transfer: the released per-sequence value, averaged over the sequences.

  For sequence b let S_b = student_bᵀ and T_b = teacher_bᵀ (H x L): row i is hidden unit i as a
  vector over the L positions, L2-normalised over the positions. With the polynomial kernel
  k(a, c) = (a.c)^2:

  ``l_b = mean_{i,j} k(s_i, s_j) - 2 * mean_{i,j} k(s_i, t_j)``  (means over the H x H pairs)
  ``loss = mean_b l_b``

  As released, the teacher-teacher term is a constant and is left out, so the value can be
  negative, and padding positions are included. The released code sums l_b over a call's
  sequences and divides by L (:func:`released_nst_per_call`); this mean is that value x L / B,
  the same at any batch and length, and `vidlankd_jax.objectives` carries the released scale
  in the weight. Computed through L x L Gram matrices (see :func:`_unit_position_gram`):
  ``l_b = (||G^s_b||_F^2 - 2 <G^s_b, G^t_b>_F) / H^2`` with G_b = Sᵀ_b S_b, so memory is
  O(B L^2) rather than the O(H^2 L) per sequence of the direct form.

  Args:
    student: [B, L, H] student states (through the distillation head).
    teacher: [B, L, H] teacher states.
  Returns:
    A float32 scalar.
  """
  return jnp.mean(_nst_per_sequence(student, teacher))


@jax.jit
def released_nst_per_call(student, teacher):
  """The released code's NST value of one call (`vlm/model.py`): ``sum_b l_b / L`` with l_b as
  in :func:`nst_loss`. A reference: it grows with the call's batch and shrinks with L."""
  return jnp.sum(_nst_per_sequence(student, teacher)) / student.shape[1]


@jax.jit
def nst_mmd_loss(student, teacher, mask):
  """Masked NST as a true squared MMD with the polynomial kernel, averaged over the batch.

  Padding positions are zeroed before each unit's row is normalised over the positions; then,
  with S_b, T_b as in :func:`nst_loss` and k(a, c) = (a.c)^2:

  ``l_b = mean_{i,j} k(s_i, s_j) - 2 mean_{i,j} k(s_i, t_j) + mean_{i,j} k(t_i, t_j)
        = ||Sᵀ_b S_b - Tᵀ_b T_b||_F^2 / H^2 >= 0``,   ``loss = mean_b l_b``.

  It is 0 exactly when the two Gram matrices agree (e.g. student == teacher).

  Args:
    student: [B, L, H].
    teacher: [B, L, H].
    mask: [B, L], 1 for a real token.
  Returns:
    A float32 scalar.
  """
  hidden = student.shape[-1]
  keep = _f32(mask)[..., None]
  gram_s = _unit_position_gram(l2_normalize(_f32(student) * keep, axis=1))
  gram_t = _unit_position_gram(l2_normalize(_f32(teacher) * keep, axis=1))
  difference = gram_s - gram_t
  return jnp.mean(jnp.sum(difference * difference, axis=(1, 2))) / hidden**2


# ---------------------------------------------------------------------------------------------
# Distillation: in-batch contrastive (NT-Xent) and memory-bank CRD.
# ---------------------------------------------------------------------------------------------


@jax.jit
def nt_xent_loss(student, teacher, temperature=1.0, mask=None):
  """In-batch NT-Xent at every token position, averaged over positions.

  At position t, the 2B anchors z are the student vectors s_{b,t} and the teacher vectors
  u_{b,t} (b = 1..B). With c(a, a') the cosine similarity divided by the temperature tau, the
  positive of s_{b,t} is u_{b,t} and vice versa; every other vector at that position except
  the anchor itself is a negative (2B - 2 of them):

  ``CE(a) = logsumexp_{a' != a} c(a, a') - c(a, partner(a))``
  ``loss = mean over positions t and the 2B anchors of CE``.

  With ``mask`` [B, L] (or [L], broadcast over the batch), a padded (b, t) takes part neither
  as an anchor nor as a negative, and the loss is the mean over the real anchors.

  Computed for all positions at once from the [L, B, B] blocks of raw dot products scaled by
  inverse norms (no normalised copy of the inputs is formed).

  The released code divides each position's mean by 2B once more; that factor is a loss
  weight for the caller to apply, not part of this function.

  Args:
    student: [B, L, H].
    teacher: [B, L, H].
    temperature: tau (1.0 in the released code).
    mask: optional [B, L] or [L], 1 for a position that takes part.
  Returns:
    A float32 scalar.
  """
  batch, seq_len = student.shape[0], student.shape[1]
  s, u = _f32(student), _f32(teacher)
  inv_s, inv_u = inverse_norm(s).T, inverse_norm(u).T  # [L, B]

  def scaled_cosines(a, inv_a, c, inv_c):  # [L, B, B]: cos(a_{b,t}, c_{b',t}) / tau
    dots = _einsum("blh,clh->lbc", a, c)
    return dots * inv_a[:, :, None] * inv_c[:, None, :] / temperature

  ss = scaled_cosines(s, inv_s, s, inv_s)
  su = scaled_cosines(s, inv_s, u, inv_u)
  uu = scaled_cosines(u, inv_u, u, inv_u)
  # Rows 0..B-1 are the student anchors, rows B..2B-1 the teacher anchors.
  similarity = jnp.concatenate(
      [jnp.concatenate([ss, su], axis=2), jnp.concatenate([jnp.swapaxes(su, 1, 2), uu], axis=2)],
      axis=1,
  )  # [L, 2B, 2B]
  valid = (
      jnp.ones((batch, seq_len), jnp.float32)
      if mask is None
      else jnp.broadcast_to(_f32(mask), (batch, seq_len))
  )
  valid = jnp.concatenate([valid, valid], axis=0).T  # [L, 2B]
  not_self = ~jnp.eye(2 * batch, dtype=bool)
  keep = not_self[None, :, :] & (valid[:, None, :] > 0)
  logits = jnp.where(keep, similarity, _EXCLUDED_LOGIT)
  positive = jnp.diagonal(su, axis1=1, axis2=2)  # [L, B]
  positive = jnp.concatenate([positive, positive], axis=1)  # [L, 2B]
  return _masked_mean(jax.nn.logsumexp(logits, axis=-1) - positive, valid)


class CRDMemory(NamedTuple):
  """State of the memory-bank CRD loss: a plain pytree of arrays (shardable, checkpointable).

  Attributes:
    student_memory: [N, D] float32, one L2-normalised student embedding per example.
    teacher_memory: [N, D] float32, one L2-normalised teacher embedding per example.
    z_student: [] float32, NCE normaliser of the student-anchor scores (against the teacher
      memory); negative until estimated on the first batch, then fixed.
    z_teacher: [] float32, the same for the teacher-anchor scores (against the student memory).
  """

  student_memory: jax.Array
  teacher_memory: jax.Array
  z_student: jax.Array
  z_teacher: jax.Array


def init_crd_memory(key, num_examples, dim):
  """A fresh CRD memory: rows uniform on the unit sphere, normalisers unset (-1)."""
  student_key, teacher_key = jax.random.split(key)

  def random_rows(k):
    return l2_normalize(jax.random.normal(k, (num_examples, dim), jnp.float32))

  unset = jnp.array(-1.0, jnp.float32)
  return CRDMemory(random_rows(student_key), random_rows(teacher_key), unset, unset)


def _nce_normaliser(z, logits, num_examples):
  """Z kept if already set (> 0), else estimated as ``N * mean(exp(logits))`` of this batch."""
  estimate = num_examples * jnp.mean(jnp.exp(jax.lax.stop_gradient(logits)))
  return jnp.where(z > 0, z, estimate)


def _nce_loss(logits, z, num_examples):
  """NCE of Tian et al. (eq. 18) for logits [B, 1 + K], column 0 the positive.

  ``P = exp(logit) / Z``, ``c = K / N`` (K noise samples from the uniform noise 1/N):
  ``loss = -(sum_b log(P_b0 / (P_b0 + c)) + sum_{b,k} log(c / (P_bk + c))) / B``,
  evaluated in the log domain: ``log(P/(P+c)) = -softplus(log c - log P)`` and
  ``log(c/(P+c)) = -softplus(log P - log c)``.
  """
  batch, num_negatives = logits.shape[0], logits.shape[1] - 1
  log_p = logits - jnp.log(z)
  log_c = jnp.log(num_negatives / num_examples)
  log_d_positive = -jax.nn.softplus(log_c - log_p[:, 0])
  log_d_negative = -jax.nn.softplus(log_p[:, 1:] - log_c)
  return -(jnp.sum(log_d_positive) + jnp.sum(log_d_negative)) / batch


def _memory_logits(bank, ids, anchors, temperature):
  """``anchors_b . bank[ids_{b,k}] / tau`` -> [B, 1 + K]; no gradient into the bank."""
  rows = jax.lax.stop_gradient(bank[ids])  # [B, 1 + K, D]
  return _einsum("bkd,bd->bk", rows, anchors) / temperature


def _momentum_update(memory, indices, embeddings, momentum):
  """Rows at ``indices`` become ``normalise(momentum * old + (1 - momentum) * embedding)``."""
  rows = momentum * memory[indices] + (1.0 - momentum) * jax.lax.stop_gradient(embeddings)
  return memory.at[indices].set(l2_normalize(rows).astype(memory.dtype))


@functools.partial(jax.jit, static_argnames=("num_negatives",))
def crd_loss(
    student_emb, teacher_emb, indices, memory, key, *, num_negatives, temperature=0.07, momentum=0.5
):
  """Memory-bank contrastive representation distillation (Tian et al. 2020), both directions.

  For example b with id y_b, K negative ids are drawn uniformly from [0, N) (``key``) and put
  after y_b: ids n_{b,0} = y_b, n_{b,1..K}. With the memories read before this step's update
  (gradient-stopped):

  * student anchor: ``a_{b,k} = student_emb_b . teacher_memory[n_{b,k}] / tau``
  * teacher anchor: ``c_{b,k} = teacher_emb_b . student_memory[n_{b,k}] / tau``

  ``loss = NCE(a, Z_s) + NCE(c, Z_t)`` with ``NCE`` as in :func:`_nce_loss`
  (``P = exp(score) / Z``, noise ``K/N``). Each Z is estimated once, on the first batch, as
  ``N * mean(exp(scores))`` and then kept fixed; it lives in its own slot of the state.

  The memories are then updated at ``indices`` only:
  ``student_memory[y_b] <- normalise(momentum * student_memory[y_b] + (1 - momentum) *
  student_emb_b)`` and the same for the teacher; no gradient flows into the new memory. The ids
  of one batch should be distinct (with repeats, one of the updates wins).

  Args:
    student_emb: [B, D] L2-normalised student embeddings (pooled and projected by the caller).
    teacher_emb: [B, D] L2-normalised teacher embeddings.
    indices: [B] int ids of the examples in the memory.
    memory: the :class:`CRDMemory` state.
    key: PRNG key for drawing the negatives.
    num_negatives: K (static).
    temperature: tau of the NCE scores (0.07).
    momentum: memory momentum (0.5).
  Returns:
    ``(loss, new_memory)``: a float32 scalar and the updated :class:`CRDMemory`.
  """
  student_emb, teacher_emb = _f32(student_emb), _f32(teacher_emb)
  num_examples = memory.student_memory.shape[0]
  negatives = jax.random.randint(key, (indices.shape[0], num_negatives), 0, num_examples)
  ids = jnp.concatenate([indices[:, None], negatives], axis=1)  # [B, 1 + K]
  student_logits = _memory_logits(memory.teacher_memory, ids, student_emb, temperature)
  teacher_logits = _memory_logits(memory.student_memory, ids, teacher_emb, temperature)
  z_student = _nce_normaliser(memory.z_student, student_logits, num_examples)
  z_teacher = _nce_normaliser(memory.z_teacher, teacher_logits, num_examples)
  loss = _nce_loss(student_logits, z_student, num_examples) + _nce_loss(
      teacher_logits, z_teacher, num_examples
  )
  new_memory = CRDMemory(
      student_memory=_momentum_update(memory.student_memory, indices, student_emb, momentum),
      teacher_memory=_momentum_update(memory.teacher_memory, indices, teacher_emb, momentum),
      z_student=z_student.astype(memory.z_student.dtype),
      z_teacher=z_teacher.astype(memory.z_teacher.dtype),
  )
  return loss, new_memory


# ---------------------------------------------------------------------------------------------
# Distillation: logits and hidden-state regression.
# ---------------------------------------------------------------------------------------------


@jax.jit
def soft_label_kd_loss(student_logits, teacher_logits, temperature, weights):
  """Soft-label KD: temperature-softened KL(teacher || student), scaled by T^2.

  With p = softmax(z^t / T) and q = softmax(z^s / T) at each position:
  ``KL_p = sum_v p_v (log p_v - log q_v)``, ``loss = T^2 * sum_p w_p KL_p / sum_p w_p``.
  Evaluated in one pass over the vocabulary as
  ``KL_p = sum_v p_v (z^t_v - z^s_v) / T - logsumexp(z^t / T) + logsumexp(z^s / T)``.

  Args:
    student_logits: [..., V].
    teacher_logits: [..., V].
    temperature: T > 0.
    weights: [...] position weights.
  Returns:
    A float32 scalar.
  """
  student_logits = _f32(student_logits) / temperature
  teacher_logits = _f32(teacher_logits) / temperature
  p = jax.nn.softmax(teacher_logits, axis=-1)
  kl = (
      jnp.sum(p * (teacher_logits - student_logits), axis=-1)
      - jax.nn.logsumexp(teacher_logits, axis=-1)
      + jax.nn.logsumexp(student_logits, axis=-1)
  )
  return temperature**2 * _masked_mean(kl, weights)


@jax.jit
def hidden_mse_loss(student, teacher, mask):
  """Hidden-state regression: ``sum_{b,l} m_{b,l} ||s_{b,l} - t_{b,l}||^2 / sum_{b,l} m_{b,l}``.

  The squared error is summed over the hidden units and averaged over the real positions
  (as the reference's regression). Shapes: student, teacher [B, L, H]; mask [B, L].
  """
  difference = _f32(student) - _f32(teacher)
  return _masked_mean(jnp.sum(difference * difference, axis=-1), mask)


@jax.jit
def hidden_cosine_loss(student, teacher, mask):
  """Cosine distance: ``masked_mean_{b,l}(1 - cos(s_{b,l}, t_{b,l}))`` over real positions.

  Shapes: student, teacher [B, L, H]; mask [B, L].
  """
  cosine = jnp.sum(l2_normalize(student) * l2_normalize(teacher), axis=-1)
  return _masked_mean(1.0 - cosine, mask)
