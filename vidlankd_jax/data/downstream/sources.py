"""Data sources of the downstream benchmarks, with errors that say what to download and where.

TFDS datasets are read without ever downloading (these machines may be offline). SWAG and
TRACIE have no TFDS builder: their released files are read from user-given directories.
"""

from __future__ import annotations

import csv
import functools
import os
from typing import Callable, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from vidlankd_jax import errors
from vidlankd_jax.evaluation import metrics


class TfdsSource(seqio.TfdsDataSource):
  """A TFDS dataset read from `data_dir` without downloading; a missing dataset raises
  FileNotFoundError with the command that prepares it."""

  def __init__(self, tfds_name: str, data_dir: str | None, splits: Sequence[str]):
    super().__init__(
        tfds_name=tfds_name, tfds_data_dir=data_dir, splits=list(splits), read_only=True
    )
    self._name, self._data_dir = tfds_name, data_dir

  def missing_error(self, cause: Exception) -> FileNotFoundError:
    name = self._name.split(":")[0]
    where = self._data_dir or "~/tensorflow_datasets"
    flag = f" --data_dir={self._data_dir}" if self._data_dir else ""
    return FileNotFoundError(
        f"TFDS {self._name} is not prepared in {where}: run `tfds build {name}{flag}` on a "
        f"connected machine and copy its {name}/ folder into {where} on this one "
        f"(or pass data_dir= pointing at a prepared TFDS folder). Cause: {cause}"
    )

  def get_dataset(self, split=None, shuffle=True, seed=None, shard_info=None, **kwargs):
    try:
      return super().get_dataset(split, shuffle, seed, shard_info, **kwargs)
    except (AssertionError, tfds.core.DatasetNotFoundError) as e:
      raise self.missing_error(e) from e

  def list_shards(self, split: str) -> Sequence[str]:
    try:
      return super().list_shards(split)
    except (AssertionError, KeyError, tfds.core.DatasetNotFoundError) as e:
      raise self.missing_error(e) from e


def _columns_dataset(
    columns: Mapping[str, np.ndarray], shuffle: bool, seed: int | None
) -> tf.data.Dataset:
  ds = tf.data.Dataset.from_tensor_slices(dict(columns))
  if shuffle:
    ds = ds.shuffle(len(next(iter(columns.values()))), seed=seed)
  return ds


def file_source(
    split_files: Mapping[str, str | None],
    read_fn: Callable[[str], Mapping[str, np.ndarray]],
    missing_message: Callable[[str, str | None], str],
) -> seqio.FunctionDataSource:
  """A seqio source over released files read in Python: `read_fn(path)` -> column arrays.

  The files are read when a dataset is requested (so registering never touches the disk);
  `missing_message(split, path)` explains how to get a file that is not there.
  """

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    if split not in split_files:
      raise errors.DataError(f"Unknown split {split!r}; this source has {sorted(split_files)}.")
    path = split_files[split]
    if not path or not os.path.isfile(path):
      raise errors.MissingFileError(missing_message(split, path))
    return _columns_dataset(
        _read_cached(read_fn, path, os.path.getmtime(path)), shuffle_files, seed
    )

  return seqio.FunctionDataSource(dataset_fn, splits=list(split_files))


@functools.lru_cache(maxsize=16)
def _read_cached(read_fn, path: str, mtime: float) -> Mapping[str, np.ndarray]:
  del mtime  # part of the cache key: a rewritten file is read again
  return read_fn(path)


# ---------------------------------------------------------------------------------- SWAG

SWAG_FILES = {"train": "train.csv", "validation": "val.csv", "test": "test.csv"}
SWAG_COLUMNS = ("sent1", "sent2", "ending0", "ending1", "ending2", "ending3")
SWAG_NUM_CHOICES = 4


def read_swag_csv(path: str) -> dict[str, np.ndarray]:
  """SWAG's released CSV -> sent1, sent2 [N], endings [N, 4], label [N] (-1 when unlabelled)."""
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in SWAG_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
      raise errors.DataError(
          f"{path}: SWAG CSV lacks the columns {missing}; header is {reader.fieldnames}."
      )
    has_label = "label" in reader.fieldnames
    sent1, sent2, endings, labels = [], [], [], []
    for line, row in enumerate(reader, start=2):
      label = -1
      if has_label:
        try:
          label = int(row["label"])
        except (TypeError, ValueError):
          raise errors.DataError(
              f"{path}:{line}: label {row['label']!r} is not an integer."
          ) from None
        if not 0 <= label < SWAG_NUM_CHOICES:
          raise errors.DataError(
              f"{path}:{line}: label {label} is outside 0..{SWAG_NUM_CHOICES - 1}."
          )
      if any(row[c] is None for c in SWAG_COLUMNS):
        raise errors.DataError(f"{path}:{line}: the row has fewer fields than the header.")
      sent1.append(row["sent1"])
      sent2.append(row["sent2"])
      endings.append([row[f"ending{i}"] for i in range(SWAG_NUM_CHOICES)])
      labels.append(label)
  if not labels:
    raise errors.DataError(f"{path}: the SWAG CSV has no rows.")
  return {
      "sent1": np.asarray(sent1, dtype=object),
      "sent2": np.asarray(sent2, dtype=object),
      "endings": np.asarray(endings, dtype=object),
      "label": np.asarray(labels, dtype=np.int32),
  }


def swag_source(swag_dir: str | None) -> seqio.FunctionDataSource:
  """SWAG (train/validation/test) from the released train.csv, val.csv, test.csv."""

  def missing(split: str, path: str | None) -> str:
    where = swag_dir or "<not set: pass swag_dir= to register_downstream_tasks>"
    return (
        f"SWAG CSVs not found in {where} (split {split!r} needs {SWAG_FILES[split]}): download "
        "train.csv, val.csv and test.csv from github.com/rowanz/swagaf (folder data/) and put "
        "them in that directory."
    )

  files = {s: (os.path.join(swag_dir, f) if swag_dir else None) for s, f in SWAG_FILES.items()}
  return file_source(files, read_swag_csv, missing)


# --------------------------------------------------------------------------------- TRACIE

TRACIE_LABELS = ("negative", "positive")
TRACIE_FILES = {
    "iid": {"train": "iid/tracie_train.txt", "test": "iid/tracie_test.txt"},
    "uniform_prior": {
        "train": "uniform-prior/tracie_train_uniform_prior.txt",
        "test": "uniform-prior/tracie_test.txt",
    },
}


def read_tracie(path: str) -> dict[str, np.ndarray]:
  """TRACIE's released text file -> hypothesis, story, label, hypothesis_type, story_id [N].

  Lines are `event: <hypothesis> story: <story>\\tanswer: positive|negative`. story_id numbers
  the distinct stories of the file in order of appearance; hypothesis_type reads the whole line,
  as the official evaluator does.
  """
  hypotheses, stories, labels, kinds, story_ids = [], [], [], [], []
  story_index: dict[str, int] = {}
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      line = line.rstrip("\n")
      if not line.strip():
        continue
      fields = line.split("\t")
      if len(fields) != 2 or not fields[0].startswith("event: ") or " story: " not in fields[0]:
        raise errors.DataError(
            f"{path}:{line_no}: expected "
            "'event: <hypothesis> story: <story>\\tanswer: <label>', "
            f"got {line[:120]!r}."
        )
      hypothesis, story = fields[0][len("event: ") :].split(" story: ", 1)
      answer = fields[1].strip()
      if not answer.startswith("answer: ") or answer[len("answer: ") :] not in TRACIE_LABELS:
        raise errors.DataError(
            f"{path}:{line_no}: answer {answer!r} is not 'answer: positive|negative'."
        )
      hypotheses.append(hypothesis.strip())
      stories.append(story.strip())
      labels.append(TRACIE_LABELS.index(answer[len("answer: ") :]))
      kinds.append(metrics.tracie_hypothesis_type(line))
      story_ids.append(story_index.setdefault(story.strip(), len(story_index)))
  if not labels:
    raise errors.DataError(f"{path}: the TRACIE file has no examples.")
  return {
      "hypothesis": np.asarray(hypotheses, dtype=object),
      "story": np.asarray(stories, dtype=object),
      "label": np.asarray(labels, dtype=np.int32),
      "hypothesis_type": np.asarray(kinds, dtype=np.int32),
      "story_id": np.asarray(story_ids, dtype=np.int32),
  }


def tracie_source(tracie_dir: str | None, setting: str) -> seqio.FunctionDataSource:
  """TRACIE train/test of one training setting ('iid' or 'uniform_prior')."""
  if setting not in TRACIE_FILES:
    raise errors.DataError(
        f"Unknown TRACIE setting {setting!r}; expected one of {sorted(TRACIE_FILES)}."
    )

  def missing(split: str, path: str | None) -> str:
    where = tracie_dir or "<not set: pass tracie_dir= to register_downstream_tasks>"
    return (
        f"TRACIE file {TRACIE_FILES[setting][split]} not found in {where}: download the data/ "
        "folder of github.com/allenai/tracie (iid/ and uniform-prior/ with tracie_*.txt) and "
        "pass that folder as tracie_dir."
    )

  files = {
      s: (os.path.join(tracie_dir, f) if tracie_dir else None)
      for s, f in TRACIE_FILES[setting].items()
  }
  return file_source(files, read_tracie, missing)
