"""Bottleneck ResNets in flax.nnx: the 2D ResNet-152 and the 3D ResNeXt-101 of the HowTo100M
feature extractor, as feature trunks (no classifier).

Both are the same network up to numbers (`ResNetConfig`):
  stem     conv k x k (stride 2 in space; 1 in time for 3D), ReLU, max-pool 3, stride 2, pad 1
  stages   4 stages of bottleneck blocks: 1x1 reduce, 3x3 (grouped for ResNeXt; the block's stride
           sits here), 1x1 expand, plus the shortcut (a strided 1x1 projection in each stage's
           first block: the shortcut type B of 3D-ResNets, torchvision's `downsample`), ReLU
  output   the mean over every remaining position -> [N, 2048]
ResNet-152 (torchvision): blocks (3, 8, 36, 3), widths 64..512, 4x expansion, 7x7 stem.
ResNeXt-101 (3D-ResNets-PyTorch, cardinality 32): blocks (3, 4, 23, 3), widths 128..1024, 2x
expansion, 7x7x7 stem; on its 16 x 112 x 112 clips the last stage is 1 x 4 x 4, which the
reference's AvgPool3d((1, 4, 4)) averages whole, so the mean is the same thing.

Inference only: BatchNorm is folded into each convolution's kernel and bias at weight import
(`vidlankd_jax.interop.torch_cnn`). Channels last (NHWC / NDHWC), the layout convolutions are
fast in on GPU and TPU. The blocks of a stage after its first have one shape, so they are stacked
and run with `lax.scan`: one compiled block per stage, whatever the depth. `dtype=bfloat16`
computes in bf16 with float32 accumulation (each convolution's output, the residual sums and the
final mean are float32); float32 asks for full-precision convolutions (no TF32 on GPU).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Every spatial axis of the stem's max-pool: kernel, stride, padding.
POOL = (3, 2, 1)
STAGE_STRIDES = (1, 2, 2, 2)


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  spatial_dims: int  # 2: images [N, H, W, 3]; 3: clips [N, T, H, W, 3]
  stage_blocks: tuple[int, ...]
  stage_widths: tuple[int, ...]  # channels inside each stage's bottlenecks
  stage_outputs: tuple[int, ...]  # channels out of each stage
  groups: int = 1  # groups of each bottleneck's middle convolution (ResNeXt's cardinality)
  stem_width: int = 64
  stem_kernel: int = 7
  stem_stride: tuple[int, ...] = (2, 2)

  @property
  def feature_dim(self) -> int:
    return self.stage_outputs[-1]


RESNET152 = ResNetConfig(
    spatial_dims=2,
    stage_blocks=(3, 8, 36, 3),
    stage_widths=(64, 128, 256, 512),
    stage_outputs=(256, 512, 1024, 2048),
)
RESNEXT101_3D = ResNetConfig(
    spatial_dims=3,
    stage_blocks=(3, 4, 23, 3),
    stage_widths=(128, 256, 512, 1024),
    stage_outputs=(256, 512, 1024, 2048),
    groups=32,
    stem_stride=(1, 2, 2),
)


def forward_flops(cfg: ResNetConfig, spatial: tuple[int, ...]) -> int:
  """FLOPs (2 x multiply-adds) of every convolution for one input of `spatial` size (what the
  benchmarks count; XLA's cost analysis counts a scanned block once)."""

  def out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1

  def conv_flops(sizes, kernel: int, c_in: int, c_out: int, groups: int = 1) -> int:
    return 2 * math.prod(sizes) * kernel**cfg.spatial_dims * (c_in // groups) * c_out

  k = cfg.stem_kernel
  sizes = [out(n, k, s, k // 2) for n, s in zip(spatial, cfg.stem_stride)]
  total = conv_flops(sizes, k, 3, cfg.stem_width)
  sizes = [out(n, *POOL) for n in sizes]
  c_in = cfg.stem_width
  for index, blocks in enumerate(cfg.stage_blocks):
    width, c_out = cfg.stage_widths[index], cfg.stage_outputs[index]
    for block in range(blocks):
      stride = STAGE_STRIDES[index] if block == 0 else 1
      total += conv_flops(sizes, 1, c_in, width)
      sizes = [out(n, 3, stride, 1) for n in sizes]
      total += conv_flops(sizes, 3, width, width, cfg.groups) + conv_flops(sizes, 1, width, c_out)
      if block == 0 and (stride != 1 or c_in != c_out):
        total += conv_flops(sizes, 1, c_in, c_out)
      c_in = c_out
  return total


# ------------------------------------------------------------------------------------------
# Pure functions


def _precision(dtype) -> jax.lax.Precision:
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def conv(x, kernel, bias, stride: int | tuple, padding: int, groups: int = 1, formulation=None):
  """A convolution with torch's symmetric zero padding: x [N, *space, C] (compute dtype), kernel
  [*window, C / groups, O] -> float32 [N, *space', O]. A grouped one runs as `formulation` (one of
  `GROUPED_CONVS`; default `grouped_formulation`'s)."""
  dims = kernel.ndim - 2
  strides = (stride,) * dims if isinstance(stride, int) else tuple(stride)
  if groups > 1:
    run = GROUPED_CONVS[formulation or grouped_formulation(kernel.shape[-2])]
  elif dims == 3 and kernel.shape[0] > 1 and jax.default_backend() == "cpu":
    run = _time_folded_conv
  else:
    run = _feature_group_conv
  y = run(x, kernel.astype(x.dtype), strides, padding, groups)
  return y + bias.astype(jnp.float32)


def _feature_group_conv(x, kernel, strides, padding, groups, layout="channels_last"):
  """XLA's convolution, groups as `feature_group_count` (native on GPU and TPU; the CPU backend
  computes a grouped one as wide as a dense one)."""
  dims = kernel.ndim - 2
  io = "NDHWC" if dims == 3 else "NHWC"
  lhs = io if layout == "channels_last" else io[0] + io[-1] + io[1:-1]
  if layout != "channels_last":
    x = jnp.moveaxis(x, -1, 1)
  y = jax.lax.conv_general_dilated(
      x,
      kernel,
      window_strides=strides,
      padding=[(padding, padding)] * dims,
      dimension_numbers=(lhs, io[1:-1] + "IO", lhs),
      feature_group_count=groups,
      precision=_precision(x.dtype),
      preferred_element_type=jnp.float32,
  )
  return y if layout == "channels_last" else jnp.moveaxis(y, 1, -1)


def _time_folded_conv(x, kernel, strides, padding, groups):
  """A dense 3D convolution as a 2D one: the kernel's time taps' (strided) slices of the padded
  clip side by side in channels, time merged into the batch. XLA's CPU backend runs 3D
  convolutions far slower than 2D ones (the 7 x 7 x 7 stem: 7x, `bench/feature_extraction.py`)."""
  n, t, *_ = x.shape
  taps, stride = kernel.shape[0], strides[0]
  steps = (t + 2 * padding - taps) // stride + 1
  padded = jnp.pad(x, [(0, 0), (padding, padding)] + [(0, 0)] * 3)
  folded = jnp.concatenate(
      [padded[:, at : at + stride * (steps - 1) + 1 : stride] for at in range(taps)], axis=-1
  )
  folded = folded.reshape(n * steps, *folded.shape[2:])
  window = jnp.moveaxis(kernel, 0, 2).reshape(*kernel.shape[1:3], -1, kernel.shape[-1])
  y = _feature_group_conv(folded, window, strides[1:], padding, groups)
  return y.reshape(n, steps, *y.shape[1:])


def _per_group_conv(x, kernel, strides, padding, groups):
  """One dense convolution per group on its slice of channels, concatenated."""
  c_in, c_out = kernel.shape[-2], kernel.shape[-1] // groups
  return jnp.concatenate(
      [
          _feature_group_conv(
              x[..., g * c_in : (g + 1) * c_in],
              kernel[..., g * c_out : (g + 1) * c_out],
              strides,
              padding,
              1,
          )
          for g in range(groups)
      ],
      axis=-1,
  )


def _group_windows(x, window, strides, padding: int, groups: int, groups_first: bool):
  """The window's shifted (strided) views of the zero-padded input, channels split into groups: a
  list over the window of [G, C / G, N, *space'] (`groups_first`) or [N, *space', G, C / G], and
  space'."""
  n, *space, c = x.shape
  out = [(size + 2 * padding - k) // s + 1 for size, k, s in zip(space, window, strides)]
  split = x.reshape(n, *space, groups, c // groups)
  lead = 3 if groups_first else 1
  if groups_first:
    split = split.transpose(len(space) + 1, len(space) + 2, 0, *range(1, len(space) + 1))
  pads = [(padding, padding)] * len(space)
  # Materialised: XLA would otherwise recompute the padding (and whatever produced x) per view.
  padded = jax.lax.optimization_barrier(
      jnp.pad(split, [(0, 0)] * lead + pads + [(0, 0)] * (3 - lead))
  )
  views = [
      padded[
          (slice(None),) * lead
          + tuple(slice(o, o + s * (m - 1) + 1, s) for o, s, m in zip(at, strides, out))
      ]
      for at in np.ndindex(*window)
  ]
  return views, out


def _from_groups(y, groups: int):
  """[G, O / G, N, *space] -> [N, *space, O]."""
  spatial = y.ndim - 3
  y = y.transpose(2, *range(3, 3 + spatial), 0, 1)
  return y.reshape(*y.shape[:-2], -1)


def _im2col_conv(x, kernel, strides, padding, groups):
  """im2col and one matmul batched over groups: the views stacked as [G, window x C / G,
  positions], times the kernel as [G, O / G, window x C / G]. Only the grouped work."""
  window, c_in, c_out = kernel.shape[:-2], kernel.shape[-2], kernel.shape[-1] // groups
  views, out = _group_windows(x, window, strides, padding, groups, groups_first=True)
  taps = math.prod(window)
  patches = jnp.stack(views, axis=1).reshape(groups, taps * c_in, -1)
  weights = kernel.reshape(taps, c_in, groups, c_out).transpose(2, 3, 0, 1)
  y = jax.lax.dot_general(
      weights.reshape(groups, c_out, taps * c_in),
      patches,
      (((2,), (1,)), ((0,), (0,))),
      precision=_precision(x.dtype),
      preferred_element_type=jnp.float32,
  )
  return _from_groups(y.reshape(groups, c_out, x.shape[0], *out), groups)


def _multiply_add_conv(x, kernel, strides, padding, groups):
  """The grouped convolution as window x C / G broadcast multiply-adds over the positions, which
  XLA fuses into one loop (with the bias and ReLU after it), channels last and innermost: no
  patches in memory, no narrow matmul (fastest at few channels per group)."""
  window, c_in, c_out = kernel.shape[:-2], kernel.shape[-2], kernel.shape[-1] // groups
  views, out = _group_windows(x, window, strides, padding, groups, groups_first=False)
  weights = kernel.reshape(-1, c_in, groups, c_out).astype(jnp.float32)
  y = 0.0
  for tap, view in enumerate(views):
    for c in range(c_in):
      y = y + view[..., c : c + 1].astype(jnp.float32) * weights[tap, c]
  return y.reshape(x.shape[0], *out, groups * c_out)


GROUPED_CONVS = {
    "feature_group": _feature_group_conv,
    "feature_group_channels_first": lambda *a: _feature_group_conv(*a, layout="channels_first"),
    "per_group": _per_group_conv,
    "im2col": _im2col_conv,
    "multiply_add": _multiply_add_conv,
}


def grouped_formulation(channels_per_group: int) -> str:
  """How a grouped convolution runs: XLA's native one on GPU and TPU; on the CPU the fastest by
  channels per group at ResNeXt-101 3D's shapes (`bench/feature_extraction.py --grouped_conv`):
  multiply-adds up to 4, the native one at 8, im2col above."""
  if jax.default_backend() != "cpu":
    return "feature_group"
  if channels_per_group <= 4:
    return "multiply_add"
  return "feature_group" if channels_per_group <= 8 else "im2col"


def max_pool(x):
  """torch's MaxPool(3, stride 2, padding 1) over every spatial axis (padding never wins), one axis
  at a time: the same maximum, and 7x faster than the 3D window on XLA's CPU backend."""
  kernel, stride, pad = POOL
  for axis in range(1, x.ndim - 1):
    window, strides, padding = [1] * x.ndim, [1] * x.ndim, [(0, 0)] * x.ndim
    window[axis], strides[axis], padding[axis] = kernel, stride, (pad, pad)
    x = jax.lax.reduce_window(
        x, jnp.array(-jnp.inf, x.dtype), jax.lax.max, window, strides, padding
    )
  return x


def bottleneck(params: dict, x, stride: int, groups: int):
  """One bottleneck block; `params` maps conv1, conv2, conv3 (and downsample) to (kernel, bias)."""
  dtype = x.dtype
  window = params["conv2"][0].shape[:-2]
  h = jax.nn.relu(conv(x, *params["conv1"], 1, 0)).astype(dtype)
  h = jax.nn.relu(conv(h, *params["conv2"], stride, window[0] // 2, groups)).astype(dtype)
  h = conv(h, *params["conv3"], 1, 0)
  shortcut = conv(x, *params["downsample"], stride, 0) if "downsample" in params else x
  return jax.nn.relu(h + shortcut.astype(jnp.float32)).astype(dtype)


# ------------------------------------------------------------------------------------------
# Modules


class Conv(nnx.Module):
  """Kernel [*window, in / groups, out] and bias [out] of a convolution with BatchNorm folded in;
  `stack` > 0 adds a leading axis for a stage's scanned blocks. With `rng`, random weights
  (torch's He normal over fan-out, as both references; for tests and benchmarks, drawn with
  numpy because eager jax.random compiles one program per weight shape); without, zeros to
  import weights into."""

  def __init__(
      self,
      in_ch: int,
      out_ch: int,
      window: tuple[int, ...],
      *,
      groups: int = 1,
      stack: int = 0,
      rng: np.random.Generator | None,
  ):
    lead = (stack,) if stack else ()
    shape = lead + tuple(window) + (in_ch // groups, out_ch)
    if rng is None:
      kernel = jnp.zeros(shape, jnp.float32)
    else:
      std = math.sqrt(2.0 / (math.prod(window) * out_ch))
      kernel = jnp.asarray(rng.standard_normal(shape, np.float32) * np.float32(std))
    self.kernel = nnx.Param(kernel)
    self.bias = nnx.Param(jnp.zeros(lead + (out_ch,), jnp.float32))

  def arrays(self) -> tuple[jax.Array, jax.Array]:
    return self.kernel[...], self.bias[...]


class Bottleneck(nnx.Module):
  """The weights of one bottleneck block, or of `stack` same-shaped blocks."""

  def __init__(
      self,
      cfg: ResNetConfig,
      in_ch: int,
      width: int,
      out_ch: int,
      *,
      downsample: bool,
      stack: int = 0,
      rng: np.random.Generator | None,
  ):
    one, three = (1,) * cfg.spatial_dims, (3,) * cfg.spatial_dims
    self.conv1 = Conv(in_ch, width, one, stack=stack, rng=rng)
    self.conv2 = Conv(width, width, three, groups=cfg.groups, stack=stack, rng=rng)
    self.conv3 = Conv(width, out_ch, one, stack=stack, rng=rng)
    self.downsample = Conv(in_ch, out_ch, one, rng=rng) if downsample else None

  def params(self) -> dict:
    names = ("conv1", "conv2", "conv3") + (("downsample",) if self.downsample else ())
    return {name: getattr(self, name).arrays() for name in names}


class Stage(nnx.Module):

  def __init__(self, cfg: ResNetConfig, index: int, in_ch: int, *, rng: np.random.Generator | None):
    width, out_ch = cfg.stage_widths[index], cfg.stage_outputs[index]
    self.stride = STAGE_STRIDES[index]
    self.groups = cfg.groups
    needs_projection = self.stride != 1 or in_ch != out_ch
    self.first = Bottleneck(cfg, in_ch, width, out_ch, downsample=needs_projection, rng=rng)
    blocks = cfg.stage_blocks[index]
    self.rest = (
        Bottleneck(cfg, out_ch, width, out_ch, downsample=False, stack=blocks - 1, rng=rng)
        if blocks > 1
        else None
    )

  def __call__(self, x):
    x = bottleneck(self.first.params(), x, self.stride, self.groups)
    if self.rest is not None:
      x, _ = jax.lax.scan(
          lambda h, p: (bottleneck(p, h, 1, self.groups), None), x, self.rest.params()
      )
    return x


class ResNet(nnx.Module):
  """A bottleneck ResNet trunk: normalised pixels [N, *space, 3] -> features [N, feature_dim]
  (float32, before any L2 normalisation)."""

  def __init__(self, cfg: ResNetConfig, *, seed: int | None = 0):
    """Random weights drawn from `seed`; with `seed=None`, zeros to import weights into."""
    rng = None if seed is None else np.random.default_rng(seed)
    self.config = cfg
    self.stem = Conv(3, cfg.stem_width, (cfg.stem_kernel,) * cfg.spatial_dims, rng=rng)
    stages, in_ch = [], cfg.stem_width
    for index in range(len(cfg.stage_blocks)):
      stages.append(Stage(cfg, index, in_ch, rng=rng))
      in_ch = cfg.stage_outputs[index]
    self.stages = nnx.List(stages)

  def __call__(self, x, dtype=jnp.float32):
    cfg = self.config
    if x.ndim != cfg.spatial_dims + 2 or x.shape[-1] != 3:
      raise ValueError(
          f"expected input [N, {'T, ' if cfg.spatial_dims == 3 else ''}H, W, 3], got {x.shape}"
      )
    x = x.astype(dtype)
    x = conv(x, *self.stem.arrays(), cfg.stem_stride, cfg.stem_kernel // 2)
    x = max_pool(jax.nn.relu(x).astype(dtype))
    for stage in self.stages:
      x = stage(x)
    return jnp.mean(x.astype(jnp.float32), axis=tuple(range(1, cfg.spatial_dims + 1)))
