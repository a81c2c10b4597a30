"""The distillation objectives, each declared once.

An `Objective` is everything the rest of the code reads about one KD objective: its name, its
term (a function of the student head's output, the teacher's outputs and the batch; the math is
in `vidlankd_jax.losses`), its default per-example weight with the arithmetic behind it, the head
the student reads it through, what the teacher computes for it, its settings under `config.kd`
with their defaults, and the checks on them. configs/distill.py (weights and settings),
`configlib.validate` and the distillation step (`check`), the student's heads
(models/student.py), the step's dispatch (`train/distill.py`, `Objective.term`), docs/recipe.md
(its generated table, `recipe_table`, checked by tests/test_recipe.py) and the demo read
`OBJECTIVES`. Adding an objective is one declaration here, its loss in `losses` and its test.

Weights are per example: every term is a mean over the batch's examples (sequences, tokens or
masked positions), so `weight * term` is the same objective at any global batch, device count,
gradient accumulation and sequence length. A weight is the strength of the released run at its
own shapes (`RELEASED_CALL_SEQUENCES` sequences of `RELEASED_SEQ_LEN` tokens per GPU call);
`released_weight` gives the per-example strength the released code's normalisation amounts to
at other shapes (the tiny config and the demo distil at that strength).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vidlankd_jax import errors
from vidlankd_jax import losses
from vidlankd_jax.ops import l2_normalize, masked_mean_pool

# The released distillation's call: 32 sequences per GPU (4 GPUs, 2 accumulation steps: 256 a
# step) of 126 word pieces plus [CLS] and [SEP] (scripts/base_vlm_wiki.bash).
RELEASED_CALL_SEQUENCES = 32
RELEASED_SEQ_LEN = 128

# Heads (models/student.py): "feature" maps each token to the teacher's width, unit norm;
# "voken" scores each token over the voken bank; None reads no head of its own.
FEATURE_HEAD = "feature"
VOKEN_HEAD = "voken"
# What the teacher computes for an objective: "states" its unit token states on the input
# `config.teacher.input` names; "unmasked_states" the same on the unmasked text; "logits" its
# MLM logits at the masked positions.
TEACHER_OUTPUTS = ("states", "unmasked_states", "logits")


class TermInputs(NamedTuple):
  """What a term reads: the student's head output, the teacher's outputs, the batch, state."""

  head: Any  # the objective's head output (None without a head)
  targets: Any  # the teacher's unit token states [B, L, H_t] (None without a teacher)
  batch: Mapping
  settings: Mapping  # config.kd
  extra: Mapping | None = None  # TrainState.extra: the CRD memory, the voken bank
  key: Any = None  # PRNG key of the step
  mlm_logits: Any = None  # the student's MLM logits [B, P, V] at the masked positions
  teacher_logits: Any = None  # the teacher's, same shape
  voken_targets: Any = None  # the teacher's unit token states on the unmasked text


class Term(NamedTuple):
  """An objective's unweighted per-example loss, its metrics and its new `extra` entry."""

  value: Any
  metrics: Mapping = {}
  update: Any = None


@dataclasses.dataclass(frozen=True)
class Objective:
  """One KD objective (by default: weight 1, the feature head, the teacher's token states).
  `settings` are its keys under `config.kd` with their defaults (a dict value is a section); `check(config)` raises `errors.ConfigError` naming the key at fault;
  `released_weight(config)` is the per-example weight the released code's normalisation gives
  at the config's shapes (None: `weight` at any shapes)."""

  name: str
  summary: str
  term: Callable[[TermInputs], Term]
  weight_derivation: str
  weight: float = 1.0
  head: str | None = FEATURE_HEAD
  teacher: tuple[str, ...] = ("states",)
  settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  check: Callable[[Any], None] | None = None
  released_weight: Callable[[Any], float] | None = None


# ---------------------------------------------------------------------------------------------
# Pure helpers of the terms.


_HASH_MULTIPLIER = 0x01000193  # FNV-1a 32-bit prime


def sequence_hash(ids):
  """[B, L] int -> [B] uint32: a polynomial hash of each row, mixed by murmur3's finaliser.

  Depends only on the token ids, so a sequence keeps its hash whatever its masking or epoch.
  """
  length = ids.shape[-1]
  powers = np.array(
      [pow(_HASH_MULTIPLIER, length - 1 - i, 1 << 32) for i in range(length)], np.uint32
  )
  h = jnp.sum(ids.astype(jnp.uint32) * jnp.asarray(powers), axis=-1, dtype=jnp.uint32)
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def memory_rows(batch, num_rows: int, hash_rows: bool = False):
  """The CRD memory row of each example: its dense `example_id`, or with `hash_rows` a hash of
  its token ids modulo `num_rows` (examples then share rows: `distill.expected_row_sharing`)."""
  if hash_rows:
    return (sequence_hash(batch["unmasked_ids"]) % jnp.uint32(num_rows)).astype(jnp.int32)
  if "example_id" not in batch:
    raise errors.ConfigError(
        "the CRD memory needs each text block's example_id, which this batch lacks: write the "
        "text with tools/make_text_tfrecords.py, or set config.kd.crd.hash_rows=True"
    )
  return batch["example_id"].astype(jnp.int32)


def grouped_nt_xent(student, teacher, temperature, mask, group_size: int):
  """NT-Xent within consecutive groups of `group_size` sequences, averaged over the groups.

  Each group is one released per-GPU call: its anchors' negatives are the 2G - 2 other vectors
  of the group at that position, so the value does not depend on the global batch size, the
  devices or gradient accumulation. `group_size` 0 takes the whole batch as one group.
  """
  batch = student.shape[0]
  if not group_size or group_size == batch:
    return losses.nt_xent_loss(student, teacher, temperature, mask)
  regroup = lambda x: x.reshape((batch // group_size, group_size) + x.shape[1:])
  per_group = jax.vmap(losses.nt_xent_loss, in_axes=(0, 0, None, 0))(
      regroup(student), regroup(teacher), temperature, regroup(mask)
  )
  return jnp.mean(per_group)


def content_token_mask(attention_mask):
  """[B, L] -> 1.0 on real tokens other than the first ([CLS]) and the last ([SEP]) of each
  sequence: the tokens vokenization labels (it gives its special tokens the ignored label)."""
  lengths = jnp.sum(attention_mask, axis=-1, keepdims=True)
  positions = jnp.arange(attention_mask.shape[-1])
  content = (attention_mask > 0) & (positions > 0) & (positions < lengths - 1)
  return content.astype(jnp.float32)


def voken_labels(token_states, bank):
  """[B, L, H] unit token states, [K, H] unit voken vectors -> [B, L] nearest voken ids."""
  scores = jnp.einsum("blh,kh->blk", token_states.astype(jnp.float32), bank.astype(jnp.float32))
  return jnp.argmax(scores, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# The terms.


def _nst(x: TermInputs) -> Term:
  if x.settings["nst_variant"] == "mmd":
    return Term(losses.nst_mmd_loss(x.head, x.targets, x.batch["attention_mask"]))
  return Term(losses.nst_loss(x.head, x.targets))


def _ntxent(x: TermInputs) -> Term:
  s = x.settings
  return Term(
      grouped_nt_xent(
          x.head,
          x.targets,
          s["ntxent_temperature"],
          x.batch["attention_mask"],
          int(s["ntxent_group_size"]),
      )
  )


def _crd(x: TermInputs) -> Term:
  crd, mask, memory = x.settings["crd"], x.batch["attention_mask"], x.extra["crd"]
  value, new_memory = losses.crd_loss(
      l2_normalize(masked_mean_pool(x.head, mask)),
      l2_normalize(masked_mean_pool(x.targets, mask)),
      memory_rows(x.batch, memory.student_memory.shape[0], bool(crd["hash_rows"])),
      memory,
      x.key,
      num_negatives=int(crd["num_negatives"]),
      temperature=crd["temperature"],
      momentum=crd["momentum"],
  )
  return Term(value, update=new_memory)


def _soft_label(x: TermInputs) -> Term:
  return Term(
      losses.soft_label_kd_loss(
          x.mlm_logits,
          jax.lax.stop_gradient(x.teacher_logits),
          x.settings["soft_label_temperature"],
          x.batch["mlm_weights"],
      )
  )


def _mse(x: TermInputs) -> Term:
  return Term(losses.hidden_mse_loss(x.head, x.targets, x.batch["attention_mask"]))


def _cos(x: TermInputs) -> Term:
  return Term(losses.hidden_cosine_loss(x.head, x.targets, x.batch["attention_mask"]))


def _voken(x: TermInputs) -> Term:
  if x.voken_targets is None:
    raise errors.ConfigError("voken labels need the teacher's token states on the unmasked text")
  labels = voken_labels(x.voken_targets, x.extra["voken_bank"])
  content = content_token_mask(x.batch["attention_mask"])
  return Term(
      losses.voken_classification_loss(x.head, labels, content),
      metrics={"voken_accuracy": losses.weighted_accuracy(x.head, labels, content)},
  )


# ---------------------------------------------------------------------------------------------
# Checks and released normalisations.


NST_VARIANTS = ("released", "mmd")


def _check_nst(config) -> None:
  if config.kd.nst_variant not in NST_VARIANTS:
    raise errors.ConfigError(
        f"{config.kd.nst_variant!r} is not an NST variant",
        "config.kd.nst_variant",
        f"use one of {NST_VARIANTS}",
    )


def _check_ntxent(config) -> None:
  group = int(config.kd.ntxent_group_size)
  if not group:
    return
  micro = config.train.batch_size // config.optimizer.grad_accum_steps
  for what, size in (
      ("the micro-batch", micro),
      ("config.eval.batch_size", config.eval.batch_size),
  ):
    if group < 0 or size % group:
      raise errors.ConfigError(
          f"{group} does not divide {what} ({size}): NT-Xent's negatives are drawn within "
          "groups of that many sequences",
          "config.kd.ntxent_group_size",
          "use a divisor of both batches, or 0 for the whole micro-batch",
      )


def _check_crd(config) -> None:
  if config.optimizer.grad_accum_steps != 1:
    raise errors.ConfigError(
        "grad_accum_steps must be 1 with the crd objective: the memory update needs every "
        "example's embeddings of the step at once",
        "config.optimizer.grad_accum_steps",
        "set it to 1",
    )


def _check_voken(config) -> None:
  if not config.kd.voken.data_dir:
    raise errors.ConfigError(
        "config.kd.voken.data_dir is empty: the voken bank is made of the teacher's clip "
        "vectors of that data dir's held-out video clips",
        "config.kd.voken.data_dir",
        "name the teacher's HowTo100M-layout data dir",
    )


def _released_nst_weight(config) -> float:
  return RELEASED_CALL_SEQUENCES / int(config.data.seq_len)


def _released_ntxent_weight(config) -> float:
  group = int(config.kd.ntxent_group_size)
  return 1.0 / (2 * group) if group else OBJECTIVES["ntxent"].weight


# ---------------------------------------------------------------------------------------------
# The declarations.


_DECLARATIONS = (
    Objective(
        name="nst",
        summary="neuron selectivity transfer (the released models' objective)",
        term=_nst,
        weight=RELEASED_CALL_SEQUENCES / RELEASED_SEQ_LEN,
        weight_derivation=(
            "the released call sums NST over its b = 32 sequences and divides by L = 128; the "
            "step averages its 8 calls: (1/8) x 8 x (32/128) x mean NST = b / L = 0.25 x the "
            "per-sequence mean (`losses.released_nst_per_call` is that call's value)"
        ),
        # "released": padding included, teacher-teacher term dropped (the released value, per
        # sequence); "mmd": the masked squared MMD (>= 0).
        settings={"nst_variant": "released"},
        check=_check_nst,
        released_weight=_released_nst_weight,
    ),
    Objective(
        name="ntxent",
        summary='in-batch NT-Xent at every token position (the released "CRD")',
        term=_ntxent,
        weight=1.0 / (2 * RELEASED_CALL_SEQUENCES),
        weight_derivation=(
            "the released call divides its mean cross-entropy over the 2b = 64 anchors by 2b "
            "again: 1 / 64 x the mean, negatives within groups of 32 (`kd.ntxent_group_size`)"
        ),
        settings={
            "ntxent_temperature": 1.0,
            # Negatives are drawn within groups of this many sequences: 32, the released per-GPU
            # batch (2 x 32 - 2 = 62 negatives per anchor); 0: the whole (micro-)batch.
            "ntxent_group_size": RELEASED_CALL_SEQUENCES,
        },
        check=_check_ntxent,
        released_weight=_released_ntxent_weight,
    ),
    Objective(
        name="crd",
        summary="memory-bank CRD (Tian et al.), the memory in the training state",
        term=_crd,
        weight_derivation="NCE summed over the batch and divided by its size, as `vlm/crd.py`",
        settings={
            "crd": {
                # Rows of each memory (student and teacher), sharded over the data axes: one per
                # example, an example's row its `example_id` (tools/make_text_tfrecords.py writes
                # them). 0: as many as the corpus has examples (its summary JSON); a smaller size
                # is an error. Memory: 2 x rows x teacher hidden x 4 bytes.
                "memory_size": 0,
                # True: rows from a hash of the token ids instead, modulo memory_size (> 0);
                # examples share rows and read each other's memory as positives (the expected
                # rate is printed).
                "hash_rows": False,
                "num_negatives": 16_384,
                "temperature": 0.07,
                "momentum": 0.5,
            }
        },
        check=_check_crd,
    ),
    Objective(
        name="kd",
        summary="soft-label KD: KL between the teacher's and student's MLM distributions",
        term=_soft_label,
        weight_derivation="a mean over the masked positions, like MLM",
        head=None,
        teacher=("states", "logits"),
        settings={"soft_label_temperature": 1.0},
    ),
    Objective(
        name="mse",
        summary="hidden-state regression",
        term=_mse,
        weight_derivation="a mean over the real tokens",
    ),
    Objective(
        name="cos",
        summary="cosine distance",
        term=_cos,
        weight_derivation="a mean over the real tokens",
    ),
    Objective(
        name="voken",
        summary="the vokenization baseline: voken classification against teacher clip vectors",
        term=_voken,
        weight_derivation="a mean over the content tokens, as vokenization's cross-entropy",
        head=VOKEN_HEAD,
        teacher=("unmasked_states",),
        settings={
            "voken": {
                # A HowTo100M-layout data dir (the teacher's): the teacher's clip vectors of its
                # held-out (validation) clips form the voken bank.
                "data_dir": "",
                "num_clips": 10_000,
                # 0: every clip vector is a voken; > 0: that many spherical k-means centroids.
                "num_vokens": 0,
                "kmeans_iters": 20,
            }
        },
        check=_check_voken,
    ),
)
OBJECTIVES: dict[str, Objective] = {o.name: o for o in _DECLARATIONS}
NAMES = tuple(OBJECTIVES)
# Objectives whose loss compares the student's token states (through a head) with the teacher's.
FEATURE_OBJECTIVES = tuple(n for n, o in OBJECTIVES.items() if o.head == FEATURE_HEAD)
VOKEN_OBJECTIVE = next(n for n, o in OBJECTIVES.items() if o.head == VOKEN_HEAD)


def parse_objectives(spec: str) -> tuple[str, ...]:
  """`config.kd.objectives` ("nst", "nst+crd", "none", ...) -> the active KD objectives."""
  names = tuple(n.strip() for n in str(spec).split("+") if n.strip())
  if names == ("none",):
    return ()
  unknown = [n for n in names if n not in OBJECTIVES]
  if not names or unknown or len(set(names)) != len(names):
    raise errors.ConfigError(
        f"config.kd.objectives {spec!r}: expected 'none' or distinct names from "
        f"{NAMES} joined by '+'" + (f"; unknown: {unknown}" if unknown else "")
    )
  return names


def default_weights() -> dict[str, float]:
  """`config.kd.weights`: every objective's per-example weight."""
  return {name: o.weight for name, o in OBJECTIVES.items()}


def released_weights(config) -> dict[str, float]:
  """Every objective's per-example weight that the released code's normalisation amounts to at
  `config`'s shapes (`weight` itself at the released shapes)."""
  return {
      name: o.weight if o.released_weight is None else o.released_weight(config)
      for name, o in OBJECTIVES.items()
  }


def default_settings() -> dict[str, Any]:
  """Every objective's settings under `config.kd`, with their defaults."""
  out = {}
  for o in OBJECTIVES.values():
    out.update(o.settings)
  return out


def teacher_outputs(names) -> set[str]:
  """What the teacher must compute for the objectives `names` (`TEACHER_OUTPUTS`)."""
  return {output for name in names for output in OBJECTIVES[name].teacher}


def check(config) -> tuple[str, ...]:
  """The active objectives of `config.kd`, after checking that each has its weight and settings
  (an older run's config.json may lack a newer key) and passes its own checks; raises
  `errors.ConfigError` naming the key."""
  try:
    names = parse_objectives(config.kd.objectives)
  except ValueError as e:
    raise errors.ConfigError(str(e), "config.kd.objectives", "e.g. nst, nst+crd or none") from None
  for name in names:
    objective = OBJECTIVES[name]
    if name not in config.kd.get("weights", {}):
      raise errors.ConfigError(
          "missing (a config written before this objective had a weight)",
          f"config.kd.weights.{name}",
          f"set it (default {objective.weight!r})",
      )
    for key, default in objective.settings.items():
      present = config.kd.get(key)
      missing = [key] if present is None else []
      if isinstance(default, dict) and present is not None:
        missing = [f"{key}.{k}" for k in default if k not in present]
      if missing:
        raise errors.ConfigError(
            "missing (a config written before this setting existed)",
            f"config.kd.{missing[0]}",
            "set it (configs/distill.py has its default)",
        )
    if objective.check is not None:
      objective.check(config)
  return names


# ---------------------------------------------------------------------------------------------
# docs/recipe.md's table of the objectives, generated from the declarations.


RECIPE_BEGIN = (
    "<!-- objectives table: generated by `python -m vidlankd_jax.objectives docs/recipe.md` -->"
)
RECIPE_END = "<!-- end of the objectives table -->"


def _claims(prefix: str, settings: Mapping) -> list[str]:
  out = []
  for key, value in settings.items():
    if isinstance(value, dict):
      out += _claims(f"{prefix}{key}.", value)
    else:
      text = repr(value) if value != "" and not isinstance(value, str) else value or '""'
      out.append(f"`{prefix}{key} = {text}`")
  return out


def recipe_table() -> str:
  """The block of docs/recipe.md between `RECIPE_BEGIN` and `RECIPE_END` (markers included):
  one row per objective, its `ours` cell claiming the configs' weight and settings, the same
  with `recipe=released` (the recipe test checks them against configs/distill.py at size=base)."""
  configs = " ; ".join(f"configs/distill.py:size=base,objectives={n}" for n in OBJECTIVES)
  lines = [
      RECIPE_BEGIN,
      f"<!-- recipe: {configs} -->",
      "| objective | per-example weight: the released arithmetic | head | teacher computes "
      "| ours | ours, `recipe=released` |",
      "|---|---|---|---|---|---|",
  ]
  for name, o in OBJECTIVES.items():
    claims = [f"`kd.weights.{name} = {o.weight!r}`"] + _claims("kd.", o.settings)
    lines.append(
        f"| `{name}`: {o.summary} | {o.weight_derivation} | {o.head or '—'} "
        f"| {', '.join(o.teacher)} | {', '.join(claims)} | = |"
    )
  return "\n".join(lines + [RECIPE_END])


def write_recipe_table(path: str) -> None:
  """Rewrites the generated block of the markdown file `path`."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  start, end = text.find(RECIPE_BEGIN), text.find(RECIPE_END)
  if start < 0 or end < start:
    raise ValueError(f"{path}: no {RECIPE_BEGIN!r} ... {RECIPE_END!r} block")
  text = text[:start] + recipe_table() + text[end + len(RECIPE_END) :]
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


if __name__ == "__main__":
  write_recipe_table(sys.argv[1])
