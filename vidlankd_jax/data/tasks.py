"""The seqio registry of pretraining data and the tf.data pipeline of one host's batches.

Tasks (registered by `register_pretraining_tasks(data_dir, vocab_file, ...)`, re-registrable):
  howto100m_video_text  teacher: captions + video features   {data_dir}/howto100m/howto100m-*
  wiki103_mlm           student: WikiText-103 token blocks  {data_dir}/wiki103/wiki103-*
  wikipedia_mlm         student: Wikipedia token blocks     {data_dir}/wikipedia/wikipedia-*
Shard files are named `{prefix}-{split}.tfrecord-NNNNN-of-NNNNN` (splits: train, validation), as
written by tools/convert_howto100m.py and tools/make_text_tfrecords.py.

Every example becomes fixed-shape features (L = seq_len, P = max_predictions, T = max steps):
  input_ids int32 [L]        masked [CLS] tokens [SEP] then [PAD]=0
  attention_mask int32 [L], token_type_ids int32 [L] (zeros), unmasked_ids int32 [L]
  mlm_positions int32 [P], mlm_targets int32 [P], mlm_weights float32 [P] (0 = unused slot)
  video_features float16 [T, D], video_mask int32 [T]   (video-text; the stored precision)
  example_id int32 []        the text block's dense id (text only; -1 for shards without one)
and each batch an int32 `valid` [B]: 0 marks the all-zero rows that pad an evaluation pass.

Masking (BERT), `masking` of the InputSpec: "fixed" picks 15% of the real, non-special tokens
(rounded, at least 1, at most P); "bernoulli" (the reference's collator) picks each of them with
probability 0.15 (at most P: the MLM head reads P gathered positions, so a P that the count
rarely exceeds is needed, e.g. 32 for 126 candidates); of those 80% become [MASK], 10% a random
non-special token, 10% stay. Its randomness is stateless, seeded by (seed, index of the example
in the stream), so a given seed and step always give the same batch, and every epoch sees
fresh masks.

`make_dataset` orders the stream as a function of (seed, epoch): epoch e shuffles this host's
files and records with seeds derived from (seed, e); batches are cut from the concatenated
epochs, so `start_step` starts at example start_step * batch_size exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from vidlankd_jax import errors
from vidlankd_jax.data import batching
from vidlankd_jax.data import shards as shards_lib
from vidlankd_jax.data import text as text_lib
from vidlankd_jax.data import video_text
from vidlankd_jax.data import vocab as vocab_lib

VIDEO_TEXT_TASK = "howto100m_video_text"
WIKI103_TASK = "wiki103_mlm"
WIKIPEDIA_TASK = "wikipedia_mlm"
SPLITS = ("train", "validation")
MASKINGS = ("fixed", "bernoulli")

# task name -> (sub-folder of data_dir, shard file prefix)
TASK_FILES = shards_lib.PRETRAINING_TASK_FILES
assert set(TASK_FILES) == {VIDEO_TEXT_TASK, WIKI103_TASK, WIKIPEDIA_TASK}

TEXT_FEATURES = {
    "input_ids": tf.int32,
    "attention_mask": tf.int32,
    "token_type_ids": tf.int32,
    "unmasked_ids": tf.int32,
    "mlm_positions": tf.int32,
    "mlm_targets": tf.int32,
    "mlm_weights": tf.float32,
}
VIDEO_FEATURES = {"video_features": tf.float16, "video_mask": tf.int32}
# Per example, not per position: rank 0.
TEXT_ID_FEATURE = "example_id"


def task_file_pattern(data_dir: str, task_name: str, split: str) -> str:
  folder, prefix = TASK_FILES[task_name]
  return os.path.join(data_dir, folder, shards_lib.shard_pattern(prefix, split))


# ------------------------------------------------------------------------------------------
# Preprocessors (seqio style: dataset -> dataset, per-example maps)

_AUTOTUNE = tf.data.AUTOTUNE


def _map(ds: tf.data.Dataset, fn) -> tf.data.Dataset:
  return ds.map(fn, num_parallel_calls=_AUTOTUNE, deterministic=True)


def text_block_to_tokens(ds: tf.data.Dataset) -> tf.data.Dataset:
  """{'ids': int64 [block], 'example_id': int64} -> {'tokens': int32 [block], 'example_id':
  int32} (ids past int32 are an error naming the id)."""

  def fn(ex):
    example_id = ex[TEXT_ID_FEATURE]
    check = tf.debugging.assert_less_equal(
        example_id,
        tf.constant(np.iinfo(np.int32).max, tf.int64),
        message="text block example_id does not fit int32",
    )
    with tf.control_dependencies([check]):
      out = {"tokens": tf.cast(ex["ids"], tf.int32), TEXT_ID_FEATURE: tf.cast(example_id, tf.int32)}
    if "mask_seed" in ex:
      out["mask_seed"] = ex["mask_seed"]
    return out

  return _map(ds, fn)


def decode_video_clip(
    ds: tf.data.Dataset,
    sequence_length: Mapping[str, int],
    vocab: vocab_lib.WordPieceVocabulary,
    feature_dim: int,
) -> tf.data.Dataset:
  """Parsed clip -> caption tokens plus video features fitted to T steps with a mask.

  Clips longer than T are uniformly subsampled (the converter already caps them at 384).
  """
  max_steps = sequence_length["video_features"]

  def fn(ex):
    clip = video_text.decode_clip(ex, feature_dim)
    features, steps = clip["features"], clip["num_steps"]
    keep = tf.cast(
        tf.linspace(0.0, tf.cast(steps - 1, tf.float32), tf.minimum(steps, max_steps)), tf.int32
    )
    features = tf.gather(features, keep)
    kept = tf.shape(features)[0]
    features = tf.pad(features, [[0, max_steps - kept], [0, 0]])
    out = {
        "tokens": vocab.encode_tf(clip["caption"]),
        "video_features": tf.ensure_shape(features, [max_steps, feature_dim]),
        "video_mask": tf.cast(tf.range(max_steps) < kept, tf.int32),
    }
    if "mask_seed" in ex:
      out["mask_seed"] = ex["mask_seed"]
    return out

  return _map(ds, fn)


def wrap_with_specials(
    ds: tf.data.Dataset, sequence_length: Mapping[str, int], vocab: vocab_lib.WordPieceVocabulary
) -> tf.data.Dataset:
  """'tokens' -> [CLS] tokens[:L-2] [SEP] padded with [PAD] to L, with attention mask."""
  length = sequence_length["input_ids"]

  def fn(ex):
    ex = dict(ex)
    tokens = ex.pop("tokens")[: length - 2]
    ids = tf.concat([[vocab.cls_id], tokens, [vocab.sep_id]], axis=0)
    n = tf.shape(ids)[0]
    ids = tf.pad(ids, [[0, length - n]], constant_values=vocab.pad_id)
    ex["unmasked_ids"] = tf.ensure_shape(ids, [length])
    ex["attention_mask"] = tf.cast(tf.range(length) < n, tf.int32)
    ex["token_type_ids"] = tf.zeros([length], tf.int32)
    return ex

  return _map(ds, fn)


def add_mask_seeds(ds: tf.data.Dataset, default_seed: int = 0) -> tf.data.Dataset:
  """Gives each example a stateless-RNG seed (seed, position) unless it already has one
  (`make_dataset` sets seeds from the global stream position itself)."""
  if "mask_seed" in ds.element_spec:
    return ds
  return ds.enumerate().map(
      lambda i, ex: {**ex, "mask_seed": tf.stack([tf.constant(default_seed, tf.int64), i])},
      num_parallel_calls=_AUTOTUNE,
      deterministic=True,
  )


def mask_tokens(
    unmasked_ids: tf.Tensor,
    attention_mask: tf.Tensor,
    seed: tf.Tensor,
    *,
    max_predictions: int,
    mask_prob: float,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int],
    masking: str = "fixed",
) -> dict[str, tf.Tensor]:
  """BERT masking of one sequence with stateless randomness from `seed` (int [2]).

  Among real, non-special tokens, `masking` "fixed" picks round(mask_prob * candidates)
  positions (at least 1 when there are candidates), "bernoulli" each one with probability
  `mask_prob`; at most `max_predictions` either way (a uniformly random subset of the chosen).
  Of those, 80% -> [MASK], 10% -> a uniformly random non-special token, 10% unchanged. Returns
  input_ids and the mlm_* features.
  """
  length = unmasked_ids.shape[0]
  seed = tf.cast(seed, tf.int64)
  pick_seed, action_seed, token_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  special = tf.reduce_any(
      unmasked_ids[:, None] == tf.constant(special_ids, tf.int32)[None], axis=-1
  )
  candidate = tf.logical_and(tf.cast(attention_mask, tf.bool), tf.logical_not(special))
  draw = tf.random.stateless_uniform([length], pick_seed)
  if masking == "bernoulli":
    candidate = tf.logical_and(candidate, draw < mask_prob)
    num_predict = tf.reduce_sum(tf.cast(candidate, tf.int32))
  elif masking == "fixed":
    num_candidates = tf.reduce_sum(tf.cast(candidate, tf.int32))
    num_predict = tf.cast(tf.round(tf.cast(num_candidates, tf.float32) * mask_prob), tf.int32)
    num_predict = tf.maximum(num_predict, tf.minimum(num_candidates, 1))
  else:
    raise errors.DataError(f"masking {masking!r} is not one of {MASKINGS}")
  num_predict = tf.minimum(num_predict, max_predictions)
  scores = tf.where(candidate, draw, -1.0)
  _, top = tf.math.top_k(scores, k=max_predictions)
  slot_used = tf.range(max_predictions) < num_predict
  # Unused slots sort last; used ones in ascending position order.
  positions = tf.sort(tf.where(slot_used, top, length))
  slot_used = positions < length
  positions = tf.where(slot_used, positions, 0)
  targets = tf.where(slot_used, tf.gather(unmasked_ids, positions), 0)

  action = tf.random.stateless_uniform([max_predictions], action_seed)
  # A uniform non-special id: draw from the non-special count, then step over the specials.
  sorted_special = sorted(set(int(i) for i in special_ids))
  random_ids = tf.random.stateless_uniform(
      [max_predictions],
      token_seed,
      minval=0,
      maxval=vocab_size - len(sorted_special),
      dtype=tf.int32,
  )
  for s in sorted_special:
    random_ids += tf.cast(random_ids >= s, tf.int32)
  replacement = tf.where(action < 0.8, mask_id, tf.where(action < 0.9, random_ids, targets))
  input_ids = tf.tensor_scatter_nd_update(
      unmasked_ids,
      tf.boolean_mask(positions, slot_used)[:, None],
      tf.boolean_mask(replacement, slot_used),
  )
  return {
      "input_ids": input_ids,
      "mlm_positions": positions,
      "mlm_targets": targets,
      "mlm_weights": tf.cast(slot_used, tf.float32),
  }


def mask_tokens_preprocessor(
    ds: tf.data.Dataset,
    sequence_length: Mapping[str, int],
    vocab: vocab_lib.WordPieceVocabulary,
    mask_prob: float,
    masking: str = "fixed",
) -> tf.data.Dataset:
  """Applies `mask_tokens` to each example, P = sequence_length['mlm_positions']."""
  masker = functools.partial(
      mask_tokens,
      max_predictions=sequence_length["mlm_positions"],
      mask_prob=mask_prob,
      masking=masking,
      mask_id=vocab.mask_id,
      vocab_size=vocab.vocab_size,
      special_ids=vocab.special_ids,
  )

  def fn(ex):
    ex = dict(ex)
    seed = ex.pop("mask_seed")
    ex.update(masker(ex["unmasked_ids"], ex["attention_mask"], seed))
    return ex

  return _map(ds, fn)


# ------------------------------------------------------------------------------------------
# Feature converters


class MlmFeatureConverter(seqio.FeatureConverter):
  """Checks and fixes the shapes of the MLM features and drops everything else."""

  TASK_FEATURES = {k: seqio.FeatureConverter.FeatureSpec(dtype=v) for k, v in TEXT_FEATURES.items()}
  MODEL_FEATURES = TASK_FEATURES
  PACKING_FEATURE_DTYPES = None

  def __init__(self, **kwargs):
    # Shapes are enforced statically in `_convert_features`; seqio's per-example length
    # assertions would only add cost.
    kwargs.setdefault("apply_length_check", False)
    super().__init__(pack=False, **kwargs)

  def _shape(self, name: str, lengths: Mapping[str, int]) -> list[int]:
    return [lengths[name]]

  def _convert_features(self, ds, task_feature_lengths):
    names = list(self.MODEL_FEATURES)
    return _map(
        ds,
        lambda ex: {k: tf.ensure_shape(ex[k], self._shape(k, task_feature_lengths)) for k in names},
    )

  def get_model_feature_lengths(self, task_feature_lengths):
    return dict(task_feature_lengths)


class TextFeatureConverter(MlmFeatureConverter):
  """MLM features plus the text block's example_id (a scalar)."""

  TASK_FEATURES = {
      **MlmFeatureConverter.TASK_FEATURES,
      TEXT_ID_FEATURE: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32, rank=0),
  }
  MODEL_FEATURES = TASK_FEATURES

  def _shape(self, name, lengths):
    return [] if name == TEXT_ID_FEATURE else [lengths[name]]


class VideoTextFeatureConverter(MlmFeatureConverter):
  """MLM features plus video_features [T, D] and video_mask [T]."""

  TASK_FEATURES = {
      **MlmFeatureConverter.TASK_FEATURES,
      "video_features": seqio.FeatureConverter.FeatureSpec(dtype=tf.float16, rank=2),
      "video_mask": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
  }
  MODEL_FEATURES = TASK_FEATURES

  def __init__(self, feature_dim: int = video_text.DEFAULT_FEATURE_DIM, **kwargs):
    self.feature_dim = feature_dim
    super().__init__(**kwargs)

  def _shape(self, name, lengths):
    if name == "video_features":
      return [lengths[name], self.feature_dim]
    return [lengths[name]]


def feature_lengths(
    task_name: str, seq_len: int = 128, max_predictions: int = 20, max_video_steps: int = 384
) -> dict[str, int | None]:
  """The seqio `sequence_length` mapping of a task."""
  lengths = {k: seq_len for k in ("input_ids", "attention_mask", "token_type_ids", "unmasked_ids")}
  lengths.update({k: max_predictions for k in ("mlm_positions", "mlm_targets", "mlm_weights")})
  if task_name == VIDEO_TEXT_TASK:
    lengths.update(video_features=max_video_steps, video_mask=max_video_steps)
  else:
    lengths[TEXT_ID_FEATURE] = None  # a scalar: seqio neither trims nor checks it
  return lengths


def feature_converter(task_name: str, video_dim: int = video_text.DEFAULT_FEATURE_DIM):
  if task_name == VIDEO_TEXT_TASK:
    return VideoTextFeatureConverter(feature_dim=video_dim)
  return TextFeatureConverter()


# ------------------------------------------------------------------------------------------
# Registry


@functools.lru_cache(maxsize=8)
def _vocabulary(vocab_file: str, lower_case: bool) -> vocab_lib.WordPieceVocabulary:
  """One vocabulary (and compiled tokenizer) per file, shared by re-registrations."""
  return vocab_lib.WordPieceVocabulary(vocab_file, lower_case=lower_case)


def register_pretraining_tasks(
    data_dir: str,
    vocab_file: str | None = None,
    lower_case: bool = True,
    mask_prob: float = 0.15,
    video_dim: int = video_text.DEFAULT_FEATURE_DIM,
    text_block_len: int = text_lib.BLOCK_LEN,
    masking: str = "fixed",
) -> list[str]:
  """(Re-)registers the pretraining tasks over the shards under `data_dir`."""
  vocab = _vocabulary(vocab_file or vocab_lib.default_vocab_file(), lower_case)
  pass_through = seqio.PassThroughVocabulary(size=0)

  def outputs(video: bool) -> dict[str, seqio.Feature]:
    feats = {
        k: seqio.Feature(pass_through, add_eos=False, dtype=v) for k, v in TEXT_FEATURES.items()
    }
    feats["input_ids"] = seqio.Feature(vocab, add_eos=False, dtype=tf.int32)
    feats["unmasked_ids"] = seqio.Feature(vocab, add_eos=False, dtype=tf.int32)
    if video:
      feats["video_features"] = seqio.Feature(pass_through, add_eos=False, dtype=tf.float16, rank=2)
      feats["video_mask"] = seqio.Feature(pass_through, add_eos=False, dtype=tf.int32)
    else:
      feats[TEXT_ID_FEATURE] = seqio.Feature(pass_through, add_eos=False, dtype=tf.int32, rank=0)
    return feats

  common = [
      functools.partial(wrap_with_specials, vocab=vocab),
      add_mask_seeds,
      functools.partial(
          mask_tokens_preprocessor, vocab=vocab, mask_prob=mask_prob, masking=masking
      ),
  ]
  names = []
  for name in TASK_FILES:
    video = name == VIDEO_TEXT_TASK
    if video:
      spec = video_text.FEATURE_SPEC
      first = functools.partial(decode_video_clip, vocab=vocab, feature_dim=video_dim)
    else:
      spec = text_lib.block_feature_spec(text_block_len)
      first = text_block_to_tokens
    source = seqio.TFExampleDataSource(
        {split: task_file_pattern(data_dir, name, split) for split in SPLITS}, spec
    )
    if name in seqio.TaskRegistry.names():
      seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name, source=source, preprocessors=[first, *common], output_features=outputs(video)
    )
    names.append(name)
  return names


# ------------------------------------------------------------------------------------------
# The input pipeline


def count_records(files: Sequence[str]) -> list[int]:
  """Records per file: from the converter's marker when present, else by reading the file."""
  counts = []
  for path in files:
    marker = shards_lib.read_marker(os.path.dirname(path), os.path.basename(path))
    if marker is not None and "records" in marker:
      counts.append(int(marker["records"]))
    else:
      counts.append(int(tf.data.TFRecordDataset(path).reduce(np.int64(0), lambda n, _: n + 1)))
  return counts


def has_records(path: str) -> bool:
  """Whether a shard holds a record: its converter's marker says so, else its first record."""
  marker = shards_lib.read_marker(os.path.dirname(path), os.path.basename(path))
  if marker is not None and "records" in marker:
    return int(marker["records"]) > 0
  return any(True for _ in tf.data.TFRecordDataset(path).take(1))


def check_not_empty(name: str, split: str, files: Sequence[str]) -> None:
  """An endless stream over files without a record would spin forever: a start-up error."""
  if not any(has_records(path) for path in files):
    shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    raise errors.DataError(
        f"Task {name}: the {split} split has no records ({shown}); its input was empty: "
        "convert non-empty data with tools/convert_howto100m.py or tools/make_text_tfrecords.py"
    )


def _host_files(files: Sequence[str], shard_index: int, num_shards: int):
  """File-level host sharding when there are enough files, else record-level."""
  if not 0 <= shard_index < num_shards:
    raise errors.DataError(f"shard_index {shard_index} not in [0, {num_shards}).")
  if len(files) >= num_shards:
    return list(files[shard_index::num_shards]), False
  return list(files), True


def _epoch_records(
    files: Sequence[str],
    epoch: tf.Tensor,
    *,
    seed: int,
    shuffle: bool,
    shuffle_buffer: int,
    record_sharding: tuple[int, int] | None,
):
  """Serialized records of one epoch in an order that is a function of (seed, epoch)."""
  files_t = tf.constant(list(files), tf.string)
  epoch_seed = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
  if shuffle and record_sharding is None:
    order = tf.argsort(tf.random.stateless_uniform([len(files)], epoch_seed))
    files_t = tf.gather(files_t, order)
  ds = tf.data.Dataset.from_tensor_slices(files_t).interleave(
      tf.data.TFRecordDataset,
      cycle_length=min(len(files), 16),
      block_length=1,
      num_parallel_calls=_AUTOTUNE,
      deterministic=True,
  )
  if record_sharding is not None:
    ds = ds.shard(record_sharding[0], record_sharding[1])
  if shuffle:
    shuffle_seed = tf.random.stateless_uniform(
        [], epoch_seed, minval=0, maxval=2**62, dtype=tf.int64
    )
    ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
  return ds


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """What a pretraining stage reads and the fixed shapes its batches have.

  Derived once from a stage's config (`vidlankd_jax.data.pipeline.input_spec`): the text
  settings come from `config.data`, the video shape from the video tower's config.
  """

  task: str
  data_dir: str
  vocab_file: str = ""  # "" reads bert-base-uncased
  lower_case: bool = True
  seq_len: int = 128
  max_predictions: int = 20
  mask_prob: float = 0.15
  masking: str = "fixed"  # or "bernoulli" (the reference's); see the module docstring
  shuffle_buffer: int = 10_000
  video_steps: int = 384  # video-text task only
  video_dim: int = video_text.DEFAULT_FEATURE_DIM
  # > 0: batches leave the host cut to their longest clip, rounded up to this many steps.
  video_bucket: int = 0

  def __post_init__(self):
    if self.task not in TASK_FILES:
      raise errors.DataError(
          f"unknown pretraining task {self.task!r}; expected one of {sorted(TASK_FILES)}"
      )
    if self.masking not in MASKINGS:
      raise errors.DataError(
          f"masking {self.masking!r} is not one of {MASKINGS} (config.data.masking)"
      )
    if not 0 < self.max_predictions <= self.seq_len - 2:
      raise errors.DataError(
          f"max_predictions {self.max_predictions} must be in [1, seq_len - 2 = {self.seq_len - 2}]"
      )


def make_dataset(
    spec: InputSpec,
    split: str,
    *,
    batch_size: int,
    shard_index: int,
    num_shards: int,
    seed: int,
    start_step: int = 0,
    repeat: bool = True,
    shuffle: bool = True,
) -> tf.data.Dataset:
  """Host-local batches of the task `spec.task` for one data-parallel shard.

  Training (`repeat=True`) drops nothing: batches are cut from the endless stream of epochs.
  With `repeat=False` the stream is one epoch and the last partial batch is padded with
  all-zero rows (`valid` = 0). `start_step` resumes at exactly the batch a run at that step would see.
  """
  name = spec.task
  if split not in SPLITS:
    raise errors.DataError(f"Unknown split {split!r}; expected one of {SPLITS}.")
  register_pretraining_tasks(
      spec.data_dir,
      spec.vocab_file or None,
      lower_case=spec.lower_case,
      mask_prob=spec.mask_prob,
      video_dim=spec.video_dim,
      masking=spec.masking,
  )
  task = seqio.get_mixture_or_task(name)
  files = sorted(task.source.list_shards(split))
  if not files:
    raise errors.MissingFileError(
        f"Task {name}: no {split} shards match {task_file_pattern(spec.data_dir, name, split)}"
        f" (convert the data with tools/convert_howto100m.py or tools/make_text_tfrecords.py)."
    )
  host_files, record_level = _host_files(files, shard_index, num_shards)
  if repeat:
    check_not_empty(name, split, host_files)
  record_sharding = (num_shards, shard_index) if record_level else None
  epoch_fn = functools.partial(
      _epoch_records,
      host_files,
      seed=seed,
      shuffle=shuffle,
      shuffle_buffer=spec.shuffle_buffer,
      record_sharding=record_sharding,
  )

  start_example = start_step * batch_size
  start_epoch, skip = 0, start_example
  if start_example and repeat:
    counts = count_records(host_files)
    epoch_size = (
        sum(counts) if not record_level else len(range(shard_index, sum(counts), num_shards))
    )
    if epoch_size == 0:
      raise errors.DataError(f"Task {name}: shard {shard_index}/{num_shards} of {split} is empty.")
    start_epoch, skip = divmod(start_example, epoch_size)
  records = epoch_fn(tf.constant(start_epoch, tf.int64)).skip(skip)
  if repeat:
    later = tf.data.Dataset.counter(start_epoch + 1).flat_map(epoch_fn)
    records = records.concatenate(later)

  parse = task.source.parse_fn
  ds = records.enumerate(start=start_example).map(
      lambda i, rec: {**parse(rec), "mask_seed": tf.stack([tf.constant(seed, tf.int64), i])},
      num_parallel_calls=_AUTOTUNE,
      deterministic=True,
  )
  lengths = feature_lengths(name, spec.seq_len, spec.max_predictions, spec.video_steps)
  ds = task.preprocess_postcache(ds, sequence_length=lengths, seed=seed)
  ds = feature_converter(name, spec.video_dim)(ds, lengths)
  ds = batching.batch_examples(ds, batch_size, repeat=repeat)
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return ds.with_options(options).prefetch(_AUTOTUNE)
