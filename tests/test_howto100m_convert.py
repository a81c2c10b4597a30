"""HowTo100M conversion: alignment, caption joining, splits, resume, and every bad-input case."""

import importlib.util
import json
import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from vidlankd_jax.data import howto100m as h  # noqa: E402
from vidlankd_jax.data import shards as shards_lib  # noqa: E402
from vidlankd_jax.data import video_text  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = (
    "put the flour in a bowl then add two eggs and whisk until smooth now pour the "
    "batter into the pan and bake it for twenty minutes at medium heat"
).split()


def _words(n, offset=0):
  return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n))


def write_features(root, video_id, seconds, dim_2d=2048, dim_3d=2048, n3d=None):
  """2D step t holds t in column 0; 3D step k holds k; so alignment can be read back."""
  n3d = int(np.ceil(1.5 * seconds)) if n3d is None else n3d
  f2d = np.zeros([seconds, dim_2d], np.float16)
  f2d[:, 0] = np.arange(seconds)
  f2d[:, 1] = 1.0
  f3d = np.zeros([n3d, dim_3d], np.float16)
  f3d[:, 0] = np.arange(n3d)
  f3d[:, 1] = 2.0
  os.makedirs(os.path.join(root, "f2d"), exist_ok=True)
  os.makedirs(os.path.join(root, "f3d"), exist_ok=True)
  np.save(os.path.join(root, "f2d", video_id + ".npy"), f2d)
  np.save(os.path.join(root, "f3d", video_id + ".npy"), f3d)


def regular_captions(seconds, seg_len=4.0, words=8):
  """Back-to-back segments of `words` words each, `seg_len` seconds long."""
  n = int(seconds // seg_len)
  return {
      "start": [i * seg_len for i in range(n)],
      "end": [(i + 1) * seg_len for i in range(n)],
      "text": [_words(words, i * words) for i in range(n)],
  }


def make_layout(root, videos):
  """videos: {id: (seconds, captions)} -> (caption.json, 2D dir, 3D dir)."""
  for video_id, (seconds, _) in videos.items():
    write_features(root, video_id, seconds)
  path = os.path.join(root, "caption.json")
  with open(path, "w") as f:
    json.dump({k: c for k, (_, c) in videos.items()}, f)
  return path, os.path.join(root, "f2d"), os.path.join(root, "f3d")


def config(root, out, **kw):
  caption, d2, d3 = (
      os.path.join(root, "caption.json"),
      os.path.join(root, "f2d"),
      os.path.join(root, "f3d"),
  )
  kw = {
      "train_shards": 2,
      "validation_shards": 1,
      "num_validation_videos": 2,
      "progress_interval": 0.0,
      # The fixtures' features hold their step index, which the alignment tests read back.
      "l2_normalize": False,
      **kw,
  }
  return h.ConvertConfig(caption, d2, d3, out, **kw)


def read_clips(paths, dim=4096):
  ds = tf.data.TFRecordDataset(sorted(paths)).map(lambda r: video_text.parse_clip(r, dim))
  return [
      {k: (v.numpy().decode() if v.dtype == tf.string else v.numpy()) for k, v in ex.items()}
      for ex in ds
  ]


GOOD_VIDEOS = {
    **{f"vid{i:02d}": (30 + 7 * i, regular_captions(30 + 7 * i)) for i in range(8)},
    # One window spans 0..800 s: longer than 384 steps, so it is subsampled.
    "longvid": (
        1000,
        {
            "start": [0.0, 200.0, 450.0],
            "end": [200.0, 450.0, 800.0],
            "text": [_words(50), _words(50, 3), _words(50, 7)],
        },
    ),
    # ASR segments that repeat the end of the previous one.
    "overlap": (
        20,
        {
            "start": [0.0, 3.0, 6.5],
            "end": [3.5, 7.0, 10.2],
            "text": ["how to make a cake", "a cake with flour", "with flour and eggs"],
        },
    ),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """The good videos converted in `all` pairing with two worker processes."""
  root = str(tmp_path_factory.mktemp("howto"))
  make_layout(root, GOOD_VIDEOS)
  cfg = config(root, os.path.join(root, "out"), pairing="all", workers=2)
  summary = h.convert(cfg, log=lambda *_: None)
  return cfg, summary


def test_summary_counts_and_files(converted):
  cfg, summary = converted
  assert summary["videos"] == summary["videos_written"] == len(GOOD_VIDEOS)
  assert summary["skipped"] == {}
  names = sorted(os.listdir(cfg.output_dir))
  assert "howto100m-train.tfrecord-00000-of-00002" in names
  assert "howto100m-validation.tfrecord-00000-of-00001" in names
  with open(os.path.join(cfg.output_dir, "howto100m-summary.json")) as f:
    assert json.load(f)["clips"] == summary["clips"]
  clips = read_clips(tf.io.gfile.glob(os.path.join(cfg.output_dir, "howto100m-*.tfrecord-*")))
  assert len(clips) == summary["clips"] > len(GOOD_VIDEOS)  # `all` pairing: many per video


def test_validation_split_is_deterministic_by_video_id(converted):
  cfg, summary = converted
  val = read_clips(tf.io.gfile.glob(os.path.join(cfg.output_dir, "howto100m-validation*")))
  train = read_clips(tf.io.gfile.glob(os.path.join(cfg.output_dir, "howto100m-train*")))
  val_ids = {c["video_id"] for c in val}
  assert val_ids == h.select_validation_videos(cfg.caption_json, 2, cfg.hash_salt)
  assert len(val_ids) == 2 and not val_ids & {c["video_id"] for c in train}
  assert summary["splits"]["validation"]["videos"] == 2


def test_features_are_2d_next_to_3d_resampled_per_clip(converted):
  cfg, _ = converted
  clips = read_clips(tf.io.gfile.glob(os.path.join(cfg.output_dir, "howto100m-*.tfrecord-*")))
  for clip in clips:
    feats = clip["features"]
    assert feats.shape == (clip["num_steps"], 4096) and feats.dtype == np.float16
    steps = feats[:, 0].astype(int)
    seconds = GOOD_VIDEOS[clip["video_id"]][0]
    n3d = int(np.ceil(1.5 * seconds))
    first_3d = min(int(np.floor(1.5 * clip["start"])), n3d - 2)
    last_3d = min(int(np.ceil(1.5 * clip["end"])), n3d - 1)
    expected_3d = np.linspace(first_3d, last_3d, len(steps)).astype(int)
    np.testing.assert_array_equal(feats[:, 2048], expected_3d)
    assert np.all(feats[:, 1] == 1.0) and np.all(feats[:, 2049] == 2.0)
    if clip["video_id"] != "longvid":
      first = min(int(np.floor(clip["start"])), seconds - 2)
      last = min(int(np.ceil(clip["end"])), seconds - 1)
      np.testing.assert_array_equal(steps, np.arange(first, last + 1))


def test_clip_steps_include_the_ceil_end_step_and_resample_3d_per_clip():
  """The clip [0.4, 5.2] s of a video with 10 2D steps and 15 3D steps. 2D: floor(0.4) = 0 to
  ceil(5.2) = 6, both included: 7 steps (the half-open span [0, 6) had 6). 3D: floor(0.6) = 0
  to ceil(7.8) = 8 in 7 steps, linspace(0, 8, 7) = 0, 1.33, 2.67, 4, 5.33, 6.67, 8 -> rows
  0, 1, 2, 4, 5, 6, 8 (resampling the whole video, linspace(0, 14, 10) = 0, 1.56, 3.11, 4.67,
  6.22, 7.78, ... gave rows 0, 1, 3, 4, 6, 7)."""
  steps_2d, steps_3d = h.clip_step_indices(0.4, 5.2, 10, 15, max_steps=384)
  assert steps_2d.tolist() == [0, 1, 2, 3, 4, 5, 6]
  assert steps_3d.tolist() == [0, 1, 2, 4, 5, 6, 8]
  # A clip running to the video's end: 2D clamped to the last step (9), 3D to the last (14);
  # the first steps no later than the second last (8 and 13), as the release clamps.
  steps_2d, steps_3d = h.clip_step_indices(9.5, 11.0, 10, 15, max_steps=384)
  assert steps_2d.tolist() == [8, 9] and steps_3d.tolist() == [13, 14]
  # Longer than max_steps: both subsampled to max_steps by linspace.
  steps_2d, steps_3d = h.clip_step_indices(0.0, 9.0, 10, 15, max_steps=4)
  assert steps_2d.tolist() == [0, 3, 6, 9] and steps_3d.tolist() == [0, 4, 9, 14]


def test_each_stream_is_l2_normalised_per_step_by_default(tmp_path, load_tool):
  """Features that are not unit-norm (random scales, one all-zero step): by default every
  step's first and last 2048 values each have unit norm (zero stays zero); the CLI's
  --no_l2_normalize keeps the stored values."""
  root = str(tmp_path)
  make_layout(root, {"scaled": (12, regular_captions(12))})
  rng = np.random.default_rng(0)
  stored = {}
  for folder, steps in (("f2d", 12), ("f3d", 18)):
    values = rng.standard_normal((steps, 2048)) * rng.uniform(0.1, 40.0, (steps, 1))
    values[3] = 0.0
    stored[folder] = values.astype(np.float16)
    np.save(os.path.join(root, folder, "scaled.npy"), stored[folder])
  tool = load_tool("convert_howto100m")
  for flags, out in (([], "normalised"), (["--no_l2_normalize"], "raw")):
    cfg = tool.parse_args(
        ["--caption_json", os.path.join(root, "caption.json"), "--features_2d_dir"]
        + [os.path.join(root, "f2d"), "--features_3d_dir", os.path.join(root, "f3d")]
        + ["--output_dir", os.path.join(root, out), "--num_validation_videos", "0"]
        + flags
    )
    assert cfg.l2_normalize == (out == "normalised")
    h.convert(cfg, log=lambda *_: None)
    (clip,) = read_clips(tf.io.gfile.glob(os.path.join(root, out, "howto100m-train*")))
    halves = (clip["features"][:, :2048], clip["features"][:, 2048:])
    if out == "raw":
      np.testing.assert_array_equal(halves[0], stored["f2d"].astype(np.float32))
      continue
    # The stored zero rows: the clip is 0..12 s: 2D steps 0..11, 3D linspace(0, 17, 12).
    zero_steps = (np.arange(12) == 3, np.linspace(0, 17, 12).astype(int) == 3)
    for half, zero in zip(halves, zero_steps):
      norms = np.linalg.norm(half, axis=1)
      np.testing.assert_allclose(norms[~zero], 1.0, atol=2e-3)
      assert zero.sum() == 1 and np.all(norms[zero] == 0.0)


def test_long_spans_are_subsampled_to_384_steps(converted):
  cfg, summary = converted
  clips = read_clips(tf.io.gfile.glob(os.path.join(cfg.output_dir, "howto100m-*.tfrecord-*")))
  long_clip = [c for c in clips if c["video_id"] == "longvid"][0]
  assert long_clip["num_steps"] == 384
  assert (long_clip["start"], long_clip["end"]) == (0.0, 800.0)
  np.testing.assert_array_equal(long_clip["features"][:, 0], np.linspace(0, 800, 384).astype(int))
  assert (
      summary["splits"]["train"].get("subsampled_clips", 0)
      + summary["splits"]["validation"].get("subsampled_clips", 0)
      == 1
  )


def test_caption_joining_removes_asr_overlap():
  segs, blank = h.parse_segments("v", GOOD_VIDEOS["overlap"][1], "caption.json")
  assert blank == 0
  windows = h.join_segments(segs, word_budget=126, pairing="all")
  assert [w.text for w in windows] == ["how to make a cake . with flour . and eggs ."]
  assert (windows[0].start, windows[0].end) == (0.0, 10.2)
  # The released loader as run: its overlap check never fires, the repeats stay.
  (kept,) = h.join_segments(segs, word_budget=126, pairing="all", overlap="keep")
  assert kept.text == "how to make a cake . a cake with flour . with flour and eggs ."
  assert h.remove_overlap("I like it".split(), "it is good".split()) == ["is", "good"]
  assert h.remove_overlap("a b".split(), "c d".split()) == ["c", "d"]
  assert h.remove_overlap("The Cake".split(), "the cake".split()) == []


def test_word_budget_windows_and_pairing_modes():
  caps = regular_captions(100, seg_len=4.0, words=8)  # 25 segments of 8 words
  segs, _ = h.parse_segments("v", caps, "caption.json")
  windows = h.join_segments(segs, word_budget=30, pairing="all")
  # 9 tokens (8 words and ".") per segment, +1 counted: 28 < 30 <= 37: four segments per window,
  # covering all segments without overlap.
  assert [(w.first, w.last) for w in windows][:2] == [(0, 3), (4, 7)]
  assert windows[-1].last == 24 and len(windows) == 7
  assert all(len(w.text.split()) == 36 for w in windows[:-1])
  assert (windows[1].start, windows[1].end) == (16.0, 32.0)
  ref = h.join_segments(segs, word_budget=30, pairing="reference")
  # The budget counts the periods: three 2-word segments, budget 7. After one: "a b ." is 3
  # tokens, +1 for the empty string after the last space = 4 < 7; after two: 6 + 1 = 7, so the
  # window closes with two segments (counting words alone, 4 < 7 would take a fourth).
  two_words = {"start": [0.0, 1.0, 2.0, 3.0], "end": [1.0, 2.0, 3.0, 4.0]}
  short, _ = h.parse_segments("v", {**two_words, "text": ["a b", "c d", "e f", "g h"]}, "c.json")
  first = h.join_segments(short, word_budget=7, pairing="all", overlap="keep")[0]
  assert (first.text, first.first, first.last, first.end) == ("a b . c d .", 0, 1, 2.0)
  assert ref == windows[:1]
  # Blank segments are dropped and counted.
  caps["text"][1] = "   "
  segs, blank = h.parse_segments("v", caps, "caption.json")
  assert blank == 1 and len(segs) == 24


def test_reference_pairing_gives_each_videos_opening_clip(tmp_path):
  root = str(tmp_path)
  videos = {k: GOOD_VIDEOS[k] for k in ("vid00", "vid01", "overlap")}
  make_layout(root, videos)
  cfg = config(root, os.path.join(root, "out"), num_validation_videos=0)
  summary = h.convert(cfg, log=lambda *_: None)
  assert summary["clips"] == 3
  clips = read_clips(tf.io.gfile.glob(os.path.join(cfg.output_dir, "howto100m-train*")))
  assert sorted(c["video_id"] for c in clips) == sorted(videos)
  assert all(c["start"] == 0.0 for c in clips)


# ------------------------------------------------------------------------------------------
# Bad input


def _bad_cases(root):
  """(video id, reason, how to break it) for every kind of bad input."""

  def captions(video_id, value):
    return value

  def npy(video_id, which, array=None, raw=None):
    path = os.path.join(root, which, video_id + ".npy")
    if raw is not None:
      with open(path, "wb") as f:
        f.write(raw)
    elif array is None:
      os.remove(path)
    else:
      np.save(path, array)

  nan = np.zeros([30, 2048], np.float16)
  nan[3, 5] = np.nan
  inf = np.zeros([45, 2048], np.float32)
  inf[0, 0] = np.inf
  return [
      ("missing2d", "missing_features", lambda v: npy(v, "f2d")),
      ("missing3d", "missing_features", lambda v: npy(v, "f3d")),
      ("widebad", "wrong_feature_shape", lambda v: npy(v, "f2d", np.zeros([30, 1024]))),
      ("rank3", "wrong_feature_shape", lambda v: npy(v, "f3d", np.zeros([45, 2, 1024]))),
      ("nanfeat", "nonfinite_features", lambda v: npy(v, "f2d", nan)),
      ("inffeat", "nonfinite_features", lambda v: npy(v, "f3d", inf)),
      ("garbage", "unreadable_features", lambda v: npy(v, "f2d", raw=b"not a numpy file")),
      ("objnpy", "unreadable_features", lambda v: npy(v, "f3d", raw=_object_npy())),
      ("misalign", "misaligned_3d_features", lambda v: npy(v, "f3d", np.zeros([200, 2048]))),
  ]


def _object_npy():
  import io

  buf = io.BytesIO()
  np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
  return buf.getvalue()


BAD_CAPTIONS = {
    "emptycap": ("empty_captions", {"start": [0.0, 2.0], "end": [2.0, 4.0], "text": ["", "  "]}),
    "nocap": ("empty_captions", {"start": [], "end": [], "text": []}),
    "numcap": ("non_text_caption", {"start": [0.0], "end": [2.0], "text": [12.5]}),
    "nonecap": ("non_text_caption", {"start": [0.0], "end": [2.0], "text": [None]}),
    "latecap": (
        "caption_past_video_end",
        {"start": [0.0, 25.0], "end": [5.0, 40.0], "text": ["hello there", "way past the end"]},
    ),
    "badtime": ("bad_caption_times", {"start": [5.0], "end": [2.0], "text": ["backwards"]}),
    "nantime": ("bad_caption_times", {"start": ["x"], "end": [2.0], "text": ["string time"]}),
    "lenmis": ("malformed_captions", {"start": [0.0, 1.0], "end": [1.0], "text": ["a", "b"]}),
    "notdict": ("malformed_captions", ["just", "a", "list"]),
    "nokeys": ("malformed_captions", {"start": [0.0]}),
}


@pytest.fixture(scope="module")
def bad_layout(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("bad"))
  videos = {"good1": GOOD_VIDEOS["vid00"], "good2": GOOD_VIDEOS["vid01"]}
  cases = _bad_cases(root)
  for video_id, _, _ in cases:
    videos[video_id] = (30, regular_captions(30))
  for video_id, (_, caps) in BAD_CAPTIONS.items():
    videos[video_id] = (30, caps)
  make_layout(root, videos)
  for video_id, _, breaker in cases:
    breaker(video_id)
  expected = {v: r for v, r, _ in cases}
  expected.update({v: r for v, (r, _) in BAD_CAPTIONS.items()})
  return root, videos, expected


def test_each_bad_video_gets_a_clear_error_naming_video_and_file(bad_layout):
  root, videos, expected = bad_layout
  cfg = config(root, os.path.join(root, "unused"))
  with open(cfg.caption_json) as f:
    entries = json.load(f)
  for video_id, reason in expected.items():
    with pytest.raises(h.BadInputError) as info:
      h.make_video_clips(cfg, video_id, entries[video_id])
    err = info.value
    assert err.reason == reason, (video_id, err)
    assert video_id in str(err)
    assert (".npy" in str(err)) if "feature" in reason else ("caption.json" in str(err)), err
  # The good ones pass.
  for video_id in ("good1", "good2"):
    clips, _ = h.make_video_clips(cfg, video_id, entries[video_id])
    assert clips


def test_skip_bad_counts_every_reason_and_writes_only_good_videos(bad_layout):
  root, videos, expected = bad_layout
  cfg = config(root, os.path.join(root, "skip_out"), skip_bad=True, num_validation_videos=0)
  summary = h.convert(cfg, log=lambda *_: None)
  counts = {}
  for reason in expected.values():
    counts[reason] = counts.get(reason, 0) + 1
  assert summary["skipped"] == counts
  assert summary["videos"] == len(videos) and summary["videos_written"] == 2
  assert len(summary["skipped_examples"]) == len(expected)
  clips = read_clips(tf.io.gfile.glob(os.path.join(cfg.output_dir, "howto100m-train*")))
  assert {c["video_id"] for c in clips} == {"good1", "good2"}


def test_default_stops_at_bad_video_keeps_finished_shards_and_resumes(tmp_path):
  root = str(tmp_path)
  videos = {f"ok{i}": GOOD_VIDEOS["vid00"] for i in range(6)}
  videos["nanvid"] = (30, regular_captions(30))
  make_layout(root, videos)
  bad = np.zeros([30, 2048], np.float16)
  bad[0, 0] = np.nan
  np.save(os.path.join(root, "f2d", "nanvid.npy"), bad)
  out = os.path.join(root, "out")
  cfg = config(root, out, train_shards=4, num_validation_videos=0)
  bad_shard = h.shard_of("nanvid", 4, cfg.hash_salt)
  with pytest.raises(h.BadInputError, match=r"nanvid.*nanvid\.npy.*NaN"):
    h.convert(cfg, log=lambda *_: None)
  finished = sorted(n for n in os.listdir(out) if ".tfrecord-" in n)
  assert finished == [shards_lib.shard_name("howto100m", "train", i, 4) for i in range(bad_shard)]
  assert not [n for n in os.listdir(os.path.join(out, "_work")) if ".tmp" in n]
  for name in finished:  # intact and readable
    read_clips([os.path.join(out, name)])
  mtimes = {n: os.path.getmtime(os.path.join(out, n)) for n in finished}
  # The CLI reports the same error (exit 1); resuming with --skip_bad finishes the rest.
  spec = importlib.util.spec_from_file_location(
      "convert_howto100m", os.path.join(ROOT, "tools", "convert_howto100m.py")
  )
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  args = [
      "--caption_json",
      cfg.caption_json,
      "--features_2d_dir",
      cfg.features_2d_dir,
      "--features_3d_dir",
      cfg.features_3d_dir,
      "--output_dir",
      out,
      "--train_shards",
      "4",
      "--validation_shards",
      "1",
      "--num_validation_videos",
      "0",
      "--no_l2_normalize",  # as `config` converted the finished shards
  ]
  assert tool.main(args) == 1
  assert tool.main(args + ["--skip_bad"]) == 0
  for name, mtime in mtimes.items():
    assert os.path.getmtime(os.path.join(out, name)) == mtime  # not redone
  with open(os.path.join(out, "howto100m-summary.json")) as f:
    summary = json.load(f)
  assert summary["skipped"] == {"nonfinite_features": 1}
  assert summary["videos_written"] == 6
  # Other settings in the same output directory are refused.
  assert tool.main(args + ["--word_budget", "50"]) == 1


def test_unreadable_caption_json_is_named(tmp_path):
  path = tmp_path / "caption.json"
  path.write_text('{"a": {"start": [0], "end": [1], "text": ["x"]}, "b": {"start": [0,')
  with pytest.raises(ValueError, match="caption.json.*invalid JSON"):
    list(h.iter_json_object(str(path)))
  path.write_text('["not", "an", "object"]')
  with pytest.raises(ValueError, match="caption.json.*one JSON object"):
    list(h.iter_json_object(str(path)))
  path.write_bytes(b'{"a": "\xff\xfe"}')
  with pytest.raises(ValueError, match="caption.json.*UTF-8"):
    list(h.iter_json_object(str(path)))


def test_streaming_json_reader_matches_json_load_across_chunk_borders(tmp_path):
  data = {
      f"v{i}": {
          "start": [i * 1.5, 1e-3],
          "end": [i + 2, 12345678901234],
          "text": [f'caf\u00e9 "quoted" {i}', "x" * (i * 7)],
      }
      for i in range(60)
  }
  path = tmp_path / "c.json"
  path.write_text(json.dumps(data, indent=1))
  for chunk in (7, 64, 1 << 20):
    assert dict(h.iter_json_object(str(path), chunk_chars=chunk)) == data
  path.write_text("{}")
  assert list(h.iter_json_object(str(path))) == []


def test_progress_lines_have_rate_and_eta():
  import io

  stream = io.StringIO()
  clock = iter([0.0, 10.0, 10.0, 20.0, 20.0]).__next__  # start, set, its line, finish
  progress = shards_lib.Progress("x", 100, "videos", interval=5.0, stream=stream, clock=clock)
  progress.set(50)
  progress.finish()
  lines = stream.getvalue().splitlines()
  assert lines[0].startswith("[x] 50/100 videos (50.0%), 5 videos/s, ETA 0m10s")
  assert lines[1].endswith("(done)")


def test_other_feature_widths_round_trip_and_mismatch_is_caught(tmp_path):
  root = str(tmp_path)
  write_features(root, "small", 12, dim_2d=256, dim_3d=128)
  cfg = h.ConvertConfig(
      os.path.join(root, "caption.json"),
      os.path.join(root, "f2d"),
      os.path.join(root, "f3d"),
      os.path.join(root, "out"),
      dim_2d=256,
      dim_3d=128,
  )
  (clip,), _ = h.make_video_clips(cfg, "small", regular_captions(12))
  record = video_text.clip_to_example("small", clip.start, clip.end, clip.caption, clip.features)
  parsed = video_text.parse_clip(tf.constant(record), feature_dim=384)
  assert parsed["features"].shape == (12, 384)
  np.testing.assert_array_equal(parsed["features"].numpy(), clip.features.astype(np.float16))
  with pytest.raises(
      tf.errors.InvalidArgumentError, match=r"(?s)feature_dim != 4096 in video.*small.*384"
  ):
    video_text.parse_clip(tf.constant(record), feature_dim=4096)
