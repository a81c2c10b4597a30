"""PyTorch ResNet checkpoints -> our nnx ResNets (`vidlankd_jax.models.resnet`), BatchNorm folded.

Reads the two checkpoints of the HowTo100M feature extractor:
- ResNet-152: torchvision's ImageNet state dict, the file `torchvision.models.resnet152(
  pretrained=True)` loads (IMAGENET1K_V1), which is what the reference extractor runs;
- ResNeXt-101 3D: the 3D-ResNets-PyTorch Kinetics checkpoint, as the reference extractor
  publishes it (`resnext101.pth`, a plain state dict) or as kenshohara released it
  (`{"state_dict": ...}` with DataParallel's `module.` prefixes).
Both use one naming: `conv1`/`bn1` (stem), `layerS.B.conv{1,2,3}`/`bn{1,2,3}` (blocks),
`layerS.0.downsample.0`/`.1` (a stage's projection shortcut and its BatchNorm). `fc.*` (the
classifier) is not part of the trunk and is ignored.

Each convolution W (torch layout [O, I / groups, *window]) followed by BatchNorm (gamma, beta,
running mean m, running var v, eps 1e-5) becomes, in float64,
  kernel = W * s (per output channel), bias = beta - m * s, where s = gamma / sqrt(v + eps),
transposed to [*window, I / groups, O]. Every weight the model needs must be in the file with its
shape, and every weight in the file must be used: a file of another architecture is an error
that names the keys, never a partial load.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from flax import nnx

from vidlankd_jax import errors
from vidlankd_jax.interop import hf_bert
from vidlankd_jax.models import resnet

BATCHNORM_EPS = 1e-5  # torch's BatchNorm2d/3d default, which both references use
IGNORED = ("fc.", "num_batches_tracked")


@dataclasses.dataclass(frozen=True)
class WeightsSource:
  """Where the weights of one model are published (for error messages and the README)."""

  label: str
  flag: str
  config: resnet.ResNetConfig
  where: str


RESNET152_WEIGHTS = WeightsSource(
    label="ResNet-152 (ImageNet)",
    flag="--resnet152_weights",
    config=resnet.RESNET152,
    where="torchvision's IMAGENET1K_V1 weights, "
    "https://download.pytorch.org/models/resnet152-394f9c45.pth",
)
RESNEXT101_WEIGHTS = WeightsSource(
    label="ResNeXt-101 3D (Kinetics)",
    flag="--resnext101_weights",
    config=resnet.RESNEXT101_3D,
    where="the reference extractor's resnext101.pth, "
    "https://www.rocq.inria.fr/cluster-willow/amiech/howto100m/models/resnext101.pth "
    "(or resnext-101-kinetics.pth of github.com/kenshohara/3D-ResNets-PyTorch)",
)


def fold_batchnorm(
    weight: np.ndarray, bn: dict[str, np.ndarray], eps: float = BATCHNORM_EPS
) -> tuple[np.ndarray, np.ndarray]:
  """torch conv weight [O, I/g, *window] + eval-mode BatchNorm -> our (kernel [*window, I/g, O],
  bias [O]), float32."""
  scale = bn["weight"].astype(np.float64) / np.sqrt(bn["running_var"].astype(np.float64) + eps)
  kernel = weight.astype(np.float64) * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
  bias = bn["bias"].astype(np.float64) - bn["running_mean"].astype(np.float64) * scale
  window_axes = tuple(range(2, weight.ndim))
  kernel = np.transpose(kernel, window_axes + (1, 0))
  return kernel.astype(np.float32), bias.astype(np.float32)


def conv_table(cfg: resnet.ResNetConfig) -> list[tuple[str, str, tuple, int | None]]:
  """(torch conv name, torch BatchNorm name, path of our Conv, index in its stack or None)."""
  table = [("conv1", "bn1", ("stem",), None)]
  for s, blocks in enumerate(cfg.stage_blocks):
    for b in range(blocks):
      prefix = f"layer{s + 1}.{b}."
      ours, index = (("stages", s, "first"), None) if b == 0 else (("stages", s, "rest"), b - 1)
      for k in (1, 2, 3):
        table.append((f"{prefix}conv{k}", f"{prefix}bn{k}", ours + (f"conv{k}",), index))
    table.append(
        (
            f"layer{s + 1}.0.downsample.0",
            f"layer{s + 1}.0.downsample.1",
            ("stages", s, "first", "downsample"),
            None,
        )
    )
  return table


def load_state_dict(model: resnet.ResNet, state_dict: dict[str, np.ndarray], source: str) -> None:
  """Folds and copies a torch state dict into `model` in place; `source` names it in errors."""
  state = hf_bert.normalise_keys(state_dict)
  table = [row for row in conv_table(model.config) if _has_conv(model, row[2])]
  needed = [f"{conv}.weight" for conv, *_ in table] + [
      f"{bn}.{p}" for _, bn, *_ in table for p in ("weight", "bias", "running_mean", "running_var")
  ]
  missing = [k for k in needed if k not in state]
  unexpected = sorted(set(state) - set(needed) - {k for k in state if any(i in k for i in IGNORED)})
  if missing or unexpected:
    problems = [f"{len(missing)} missing weight(s) {missing[:4]}"] if missing else []
    problems += [f"{len(unexpected)} unexpected {unexpected[:4]}"] if unexpected else []
    raise errors.DataError(
        f"not a checkpoint of this bottleneck ResNet, blocks {model.config.stage_blocks} "
        f"({source}): {', '.join(problems)}"
    )
  stacks: dict[tuple, list] = {}
  for conv_name, bn_name, path, index in table:
    weight = state[f"{conv_name}.weight"]
    target = hf_bert.variable(model, path + ("kernel",)).get_value()
    torch_shape = (target.shape[-1], target.shape[-2]) + tuple(
        target.shape[1 if index is not None else 0 : -2]
    )
    if tuple(weight.shape) != torch_shape:
      raise errors.DataError(
          f"{conv_name}.weight has shape {tuple(weight.shape)}, the model needs {torch_shape} "
          f"({source})"
      )
    bn = {p: state[f"{bn_name}.{p}"] for p in ("weight", "bias", "running_mean", "running_var")}
    kernel, bias = fold_batchnorm(weight, bn)
    if index is None:
      hf_bert.assign(model, path + ("kernel",), kernel, f"{conv_name}.weight")
      hf_bert.assign(model, path + ("bias",), bias, f"{bn_name}.bias")
    else:
      stacks.setdefault(path, []).append((kernel, bias))
  for path, items in stacks.items():
    hf_bert.assign(model, path + ("kernel",), np.stack([k for k, _ in items]), str(path))
    hf_bert.assign(model, path + ("bias",), np.stack([b for _, b in items]), str(path))


def _has_conv(model: resnet.ResNet, path: tuple) -> bool:
  try:
    return hf_bert.variable(model, path) is not None
  except (AttributeError, IndexError):
    return False


def read_checkpoint(path: str, source: WeightsSource) -> dict[str, np.ndarray]:
  """The tensors of a PyTorch checkpoint file; a missing file says where to get it."""
  if not os.path.isfile(path):
    raise errors.MissingFileError(
        f"{source.label} weights not found ({path}): download {source.where} and pass it as "
        f"{source.flag}"
    )
  try:
    return hf_bert.read_torch_state_dict(path)
  except ValueError as e:
    raise errors.DataError(f"{e}: {source.flag} wants {source.where}") from None


KNOWN_WEIGHTS = (RESNET152_WEIGHTS, RESNEXT101_WEIGHTS)


def checkpoint_architecture(state_dict: dict[str, np.ndarray]) -> tuple[int, tuple[int, ...]]:
  """(spatial dims of the stem convolution, blocks per stage) a ResNet state dict holds; (0, ())
  when it is not one."""
  state = hf_bert.normalise_keys(state_dict)
  stem = state.get("conv1.weight")
  blocks = []
  while f"layer{len(blocks) + 1}.0.conv1.weight" in state:
    count = 0
    while f"layer{len(blocks) + 1}.{count}.conv1.weight" in state:
      count += 1
    blocks.append(count)
  return (stem.ndim - 2 if stem is not None else 0), tuple(blocks)


def describe_checkpoint(state_dict: dict[str, np.ndarray]) -> str:
  """What a state dict holds, in words: a known model (and its flag) or its shape."""
  dims, blocks = checkpoint_architecture(state_dict)
  for known in KNOWN_WEIGHTS:
    if (dims, blocks) == (known.config.spatial_dims, known.config.stage_blocks):
      return f"the {known.label} weights ({known.flag})"
  if not dims:
    return "no ResNet (no conv1.weight)"
  return f"a {dims}D ResNet with blocks {blocks}"


def load_resnet(path: str, source: WeightsSource) -> resnet.ResNet:
  """The model `source` describes, with the weights of the checkpoint at `path`; a file of
  another model says which model it holds."""
  state = read_checkpoint(path, source)
  held = checkpoint_architecture(state)
  if held != (source.config.spatial_dims, source.config.stage_blocks):
    raise ValueError(
        f"{path} holds {describe_checkpoint(state)}, not the {source.label} weights that "
        f"{source.flag} wants: {source.where}"
    )
  model = nnx.eval_shape(lambda: resnet.ResNet(source.config, seed=None))
  try:
    load_state_dict(model, state, path)
  except ValueError as e:
    raise errors.DataError(f"{e}; {source.flag} wants {source.where}") from None
  unset = [x for x in jax.tree.leaves(nnx.state(model)) if not isinstance(x, jax.Array)]
  assert not unset, f"{len(unset)} weights were not loaded"
  return model
