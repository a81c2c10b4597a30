"""seqio tasks and make_dataset: shapes, masking rules, determinism, resume, host sharding."""

import itertools
import os
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
seqio = pytest.importorskip("seqio")
gensim_test = pytest.importorskip("gensim.test.utils")

from vidlankd_jax.data import howto100m  # noqa: E402
from vidlankd_jax.data import shards as shards_lib  # noqa: E402
from vidlankd_jax.data import tasks  # noqa: E402
from vidlankd_jax.data import text as text_lib  # noqa: E402
from vidlankd_jax.data import vocab as vocab_lib  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_howto100m_convert as howto_fixtures  # noqa: E402

SPECIALS = (0, 100, 101, 102, 103)


@pytest.fixture(scope="module")
def vocab():
  return vocab_lib.WordPieceVocabulary(vocab_lib.default_vocab_file())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, vocab):
  """wiki103 (3 train shards, 1 validation) and howto100m shards under one data_dir."""
  root = str(tmp_path_factory.mktemp("data"))
  corpus = os.path.join(root, "news.txt")
  with open(gensim_test.datapath("lee_background.cor"), encoding="utf-8") as f:
    lines = list(itertools.islice(f, 150))
  with open(corpus, "w", encoding="utf-8") as f:
    f.write("".join(lines))
  out = os.path.join(root, "wiki103")
  text_lib.convert_text([corpus], out, vocab, prefix="wiki103", num_shards=3, log=lambda *_: None)
  text_lib.convert_text(
      [corpus], out, vocab, prefix="wiki103", split="validation", num_shards=1, log=lambda *_: None
  )
  raw = os.path.join(root, "howto_raw")
  os.makedirs(raw)
  howto_fixtures.make_layout(raw, howto_fixtures.GOOD_VIDEOS)
  cfg = howto_fixtures.config(raw, os.path.join(root, "howto100m"), pairing="all")
  howto100m.convert(cfg, log=lambda *_: None)
  return root


def data_config(data_dir, task="wiki103_mlm", **kw):
  fields = dict(
      task=task, data_dir=data_dir, vocab_file=vocab_lib.default_vocab_file(), shuffle_buffer=64
  )
  fields.update(kw)
  return tasks.InputSpec(**fields)


def take(ds, n):
  return [{k: v.numpy() for k, v in b.items()} for b in ds.take(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


TEXT_SPEC = {
    "input_ids": (np.int32, 128),
    "attention_mask": (np.int32, 128),
    "token_type_ids": (np.int32, 128),
    "unmasked_ids": (np.int32, 128),
    "mlm_positions": (np.int32, 20),
    "mlm_targets": (np.int32, 20),
    "mlm_weights": (np.float32, 20),
    "valid": (np.int32, None),
}
VIDEO_TEXT_SPEC = dict(TEXT_SPEC)
TEXT_SPEC = {**TEXT_SPEC, "example_id": (np.int32, None)}


def test_text_batches_have_the_trainer_contract(data_dir):
  ds = tasks.make_dataset(
      data_config(data_dir), "train", batch_size=8, shard_index=0, num_shards=1, seed=0
  )
  (batch,) = take(ds, 1)
  assert set(batch) == set(TEXT_SPEC)
  summary = shards_lib.read_text_summary(data_dir, "wiki103_mlm")
  assert np.all((batch["example_id"] >= 0) & (batch["example_id"] < summary["blocks"]))
  for k, (dtype, length) in TEXT_SPEC.items():
    assert batch[k].dtype == dtype and batch[k].shape == (8, length)[: 2 if length else 1], k
  assert np.all(batch["unmasked_ids"][:, 0] == 101) and np.all(batch["unmasked_ids"][:, 127] == 102)
  assert np.all(batch["attention_mask"] == 1) and np.all(batch["token_type_ids"] == 0)


def test_video_text_batches_carry_the_stored_features(data_dir, vocab):
  cfg = data_config(data_dir, "howto100m_video_text")
  ds = tasks.make_dataset(
      cfg, "train", batch_size=4, shard_index=0, num_shards=1, seed=0, shuffle=False, repeat=False
  )
  batches = take(ds, 100)
  assert set(batches[0]) == set(VIDEO_TEXT_SPEC) | {"video_features", "video_mask"}
  b = batches[0]
  assert b["video_features"].shape == (4, 384, 4096) and b["video_features"].dtype == np.float16
  assert b["video_mask"].shape == (4, 384) and b["video_mask"].dtype == np.int32
  files = sorted(tf.io.gfile.glob(tasks.task_file_pattern(data_dir, cfg.task, "train")))
  assert len(files) == 2
  by_caption = {}
  for clip in howto_fixtures.read_clips(files):
    ids = vocab.encode(clip["caption"])[:126]
    key = bytes(np.array([101] + ids + [102] + [0] * (126 - len(ids)), np.int32))
    by_caption.setdefault(key, []).append(clip)
  for bb in batches:
    for row in np.nonzero(bb["attention_mask"][:, 0])[0]:
      candidates = by_caption[bytes(bb["unmasked_ids"][row])]
      steps = int(bb["video_mask"][row].sum())
      assert np.all(bb["video_mask"][row, :steps] == 1)
      assert not bb["video_features"][row, steps:].any()
      assert any(
          c["num_steps"] == steps
          and np.array_equal(bb["video_features"][row, :steps], c["features"])
          for c in candidates
      )
  total = sum(int(bb["attention_mask"][:, 0].sum()) for bb in batches)
  assert total == sum(1 for _ in tf.data.TFRecordDataset(files))


def test_shorter_video_limit_subsamples_uniformly(data_dir):
  cfg = data_config(data_dir, "howto100m_video_text", video_steps=16)
  (b,) = take(
      tasks.make_dataset(
          cfg,
          "train",
          batch_size=64,
          shard_index=0,
          num_shards=1,
          seed=0,
          shuffle=False,
          repeat=False,
      ),
      1,
  )
  assert b["video_features"].shape == (64, 16, 4096)
  full = b["video_mask"].sum(1)
  assert full.max() == 16
  row = int(np.argmax(full == 16))
  steps = b["video_features"][row, :, 0]
  assert np.all(np.diff(steps) > 0)  # ordered, evenly spread 1 Hz steps


def test_masking_statistics_and_never_mask_rules(data_dir):
  ds = tasks.make_dataset(
      data_config(data_dir, max_predictions=24),
      "train",
      batch_size=32,
      shard_index=0,
      num_shards=1,
      seed=3,
  )
  masked = randomized = kept = 0
  for b in take(ds, 12):
    for i in range(32):
      unmasked, inp = b["unmasked_ids"][i], b["input_ids"][i]
      w = b["mlm_weights"][i]
      pos = b["mlm_positions"][i][w > 0]
      real = (b["attention_mask"][i] == 1) & ~np.isin(unmasked, SPECIALS)
      assert len(pos) == min(24, max(1, round(0.15 * real.sum())))
      assert np.all(real[pos]) and len(set(pos)) == len(pos)  # no specials, no padding
      assert np.all(np.diff(pos) > 0) and np.all(w[len(pos) :] == 0)
      np.testing.assert_array_equal(b["mlm_targets"][i][w > 0], unmasked[pos])
      assert np.all(b["mlm_targets"][i][w == 0] == 0)
      others = np.ones(128, bool)
      others[pos] = False
      np.testing.assert_array_equal(inp[others], unmasked[others])
      masked += np.sum(inp[pos] == 103)
      kept += np.sum(inp[pos] == unmasked[pos])
      changed = (inp[pos] != 103) & (inp[pos] != unmasked[pos])
      randomized += changed.sum()
      assert not np.isin(inp[pos][changed], SPECIALS).any()
  total = masked + randomized + kept
  assert total > 6000
  assert abs(masked / total - 0.8) < 0.025
  assert abs(randomized / total - 0.1) < 0.02
  assert abs(kept / total - 0.1) < 0.02


def test_bernoulli_masking_picks_each_token_with_probability_015(data_dir):
  """The reference collator's scheme: a per-token coin, so the count per sequence varies as
  Binomial(candidates, 0.15) (mean 18.9, sd 4.0 for 126), never a special token; stateless, so
  the same seed gives the same masks."""
  spec = data_config(data_dir, max_predictions=32, masking="bernoulli")
  make = lambda: tasks.make_dataset(  # noqa: E731
      spec, "train", batch_size=32, shard_index=0, num_shards=1, seed=4
  )
  batches = take(make(), 12)
  counts, candidates = [], []
  for b in batches:
    for i in range(32):
      w, unmasked = b["mlm_weights"][i], b["unmasked_ids"][i]
      pos = b["mlm_positions"][i][w > 0]
      real = (b["attention_mask"][i] == 1) & ~np.isin(unmasked, SPECIALS)
      assert np.all(real[pos]) and np.all(np.diff(pos) > 0)
      counts.append(len(pos))
      candidates.append(real.sum())
  assert abs(sum(counts) / sum(candidates) - 0.15) < 0.01
  # The variance of a per-token coin: Var = E[n] p (1 - p) + Var(n) p^2 over the sequences'
  # candidate counts n (126 each in full blocks: 126 x 0.15 x 0.85 = 16.1, sd 4.0); a fixed
  # count would give Var(n) p^2 alone (0 for full blocks). 384 sequences: +-25% is ~3.5 sd.
  p = 0.15
  expected = np.mean(candidates) * p * (1 - p) + np.var(candidates) * p**2
  assert abs(np.var(counts) / expected - 1) < 0.25 and max(counts) <= 32
  with pytest.raises(ValueError, match="masking 'coin' is not one of"):
    data_config(data_dir, masking="coin")
  assert_batches_equal(batches[:2], take(make(), 2))


def test_padding_is_never_masked_in_short_captions(data_dir):
  cfg = data_config(data_dir, "howto100m_video_text")
  (b,) = take(
      tasks.make_dataset(
          cfg, "train", batch_size=16, shard_index=0, num_shards=1, seed=1, repeat=False
      ),
      1,
  )
  short = b["attention_mask"].sum(1) < 128
  assert short.any()
  for i in np.nonzero(short)[0]:
    pos = b["mlm_positions"][i][b["mlm_weights"][i] > 0]
    assert np.all(b["attention_mask"][i][pos] == 1)
    assert np.all(b["input_ids"][i][b["attention_mask"][i] == 0] == 0)


def test_same_seed_same_batches_and_resume_equals_skipping(data_dir):
  cfg = data_config(data_dir)
  make = lambda seed, step=0: tasks.make_dataset(  # noqa: E731
      cfg, "train", batch_size=16, shard_index=0, num_shards=1, seed=seed, start_step=step
  )
  epoch = sum(
      1
      for _ in tf.data.TFRecordDataset(
          tf.io.gfile.glob(tasks.task_file_pattern(data_dir, cfg.task, "train"))
      )
  )
  num_batches = 2 * epoch // 16 + 1  # two epochs and a bit
  first = take(make(7), num_batches)
  assert_batches_equal(first[:5], take(make(7), 5))
  other = take(make(8), 1)
  assert not np.array_equal(other[0]["unmasked_ids"], first[0]["unmasked_ids"])
  # Resuming inside the second epoch, and inside the first.
  step = epoch // 16 + 3
  assert_batches_equal(take(make(7, step=step), 5), first[step : step + 5])
  assert_batches_equal(take(make(7, step=3), 2), first[3:5])
  # Each epoch is one full pass, in another order and with fresh masks.
  seen = np.concatenate([b["unmasked_ids"] for b in first])
  assert not np.array_equal(seen[:16], seen[epoch : epoch + 16])
  assert sorted(map(bytes, seen[:epoch])) == sorted(map(bytes, seen[epoch : 2 * epoch]))


@pytest.mark.parametrize("num_hosts", [2, 4])  # 3 files: file-level, then record-level
def test_host_shards_are_disjoint_and_cover_the_data(data_dir, num_hosts):
  cfg = data_config(data_dir)
  rows = []
  for host in range(num_hosts):
    ds = tasks.make_dataset(
        cfg,
        "train",
        batch_size=8,
        shard_index=host,
        num_shards=num_hosts,
        seed=0,
        repeat=False,
        shuffle=(host % 2 == 0),
    )
    host_rows = [
        bytes(r)
        for b in take(ds, 1000)
        for r, m in zip(b["unmasked_ids"], b["attention_mask"][:, 0])
        if m
    ]
    rows.append(host_rows)
  everything = [
      bytes(ex["ids"].numpy())
      for ex in tf.data.TFRecordDataset(
          sorted(tf.io.gfile.glob(tasks.task_file_pattern(data_dir, cfg.task, "train")))
      ).map(text_lib.parse_block)
  ]
  strip = lambda r: np.frombuffer(r, np.int32)[1:127].tobytes()  # noqa: E731
  all_hosts = [strip(r) for host_rows in rows for r in host_rows]
  assert sorted(all_hosts) == sorted(everything)
  assert all(len(h) > 0 for h in rows)


def test_eval_pads_the_final_batch_with_zero_rows(data_dir):
  cfg = data_config(data_dir)
  ds = tasks.make_dataset(
      cfg,
      "validation",
      batch_size=64,
      shard_index=0,
      num_shards=1,
      seed=0,
      repeat=False,
      shuffle=False,
  )
  batches = take(ds, 100)
  n = sum(
      1
      for _ in tf.data.TFRecordDataset(
          tf.io.gfile.glob(tasks.task_file_pattern(data_dir, cfg.task, "validation"))
      )
  )
  assert len(batches) == -(-n // 64) and n % 64
  last = batches[-1]
  assert all(v.shape[0] == 64 for v in last.values())
  real = last["attention_mask"][:, 0] == 1
  assert real.sum() == n % 64 and np.all(real[: n % 64])
  for k in ("input_ids", "attention_mask", "unmasked_ids", "mlm_weights", "mlm_positions"):
    assert not last[k][~real].any(), k
  assert_batches_equal(
      batches,
      take(
          tasks.make_dataset(
              cfg,
              "validation",
              batch_size=64,
              shard_index=0,
              num_shards=1,
              seed=0,
              repeat=False,
              shuffle=False,
          ),
          100,
      ),
  )


def test_registry_is_reregistrable_and_usable_through_seqio(data_dir, tmp_path):
  names = tasks.register_pretraining_tasks(str(tmp_path))
  assert names == ["howto100m_video_text", "wiki103_mlm", "wikipedia_mlm"]
  assert seqio.get_mixture_or_task("wiki103_mlm").source.list_shards("train") == []
  tasks.register_pretraining_tasks(data_dir)
  task = seqio.get_mixture_or_task("wiki103_mlm")
  assert len(task.source.list_shards("train")) == 3
  lengths = tasks.feature_lengths("wiki103_mlm", 64, 10)
  ds = seqio.get_dataset(
      "wiki103_mlm",
      lengths,
      dataset_split="validation",
      shuffle=False,
      feature_converter=tasks.feature_converter("wiki103_mlm"),
      num_epochs=1,
  )
  ex = next(iter(ds))
  assert ex["input_ids"].shape == (64,) and ex["mlm_positions"].shape == (10,)
  assert int(tf.reduce_sum(ex["mlm_weights"])) == 9  # round(0.15 * 62)
  with pytest.raises(FileNotFoundError, match="wikipedia"):
    tasks.make_dataset(
        data_config(data_dir, "wikipedia_mlm"),
        "train",
        batch_size=2,
        shard_index=0,
        num_shards=1,
        seed=0,
    )
  with pytest.raises(ValueError, match="unknown pretraining task 'nope'"):
    data_config(data_dir, "nope")
  with pytest.raises(ValueError, match="max_predictions 127 must be in"):
    data_config(data_dir, max_predictions=127)


def test_video_batches_leave_the_host_cut_to_their_longest_clip():
  from vidlankd_jax.data import pipeline

  rng = np.random.default_rng(0)
  lengths = [[5, 9, 3], [2, 2, 1], [16, 4, 16]]
  batches = []
  for row_lengths in lengths:
    mask = (np.arange(16)[None] < np.asarray(row_lengths)[:, None]).astype(np.int32)
    features = (rng.standard_normal((3, 16, 4)) * mask[..., None]).astype(np.float16)
    batches.append({"video_features": features, "video_mask": mask, "input_ids": np.ones((3, 8))})
  cut = list(pipeline.trim_video_padding(iter(batches), 8, name="test"))
  assert [b["video_mask"].shape[1] for b in cut] == [16, 8, 16]  # 9 -> 16, 2 -> 8, 16 -> 16
  for full, short in zip(batches, cut):
    steps = short["video_mask"].shape[1]
    np.testing.assert_array_equal(short["video_features"], full["video_features"][:, :steps])
    assert not full["video_mask"][:, steps:].any()  # only padding was cut
    assert short["input_ids"] is full["input_ids"]


def test_in_order_reading_gives_the_corpus_order(data_dir):
  """shuffle=False (the released distillation: no --shuffle) reads the blocks in write order:
  example ids 0, 1, 2, ... across the three shards the converter dealt them into."""
  spec = data_config(data_dir)
  ds = tasks.make_dataset(
      spec, "train", batch_size=8, shard_index=0, num_shards=1, seed=0, shuffle=False
  )
  ids = np.concatenate([b["example_id"] for b in take(ds, 4)])
  np.testing.assert_array_equal(ids, np.arange(32))
