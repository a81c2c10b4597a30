"""PyTorch statements of the feature extractor's models and preprocessing, to check ours against
(tests/test_feature_extraction.py) and to time ours against (bench/feature_extraction.py)."""

import numpy as np
import torch

from vidlankd_jax.features.streams import STREAM_2D


def max_relative_error(ours, reference) -> float:
  """The largest per-row ||ours - reference|| / ||reference||."""
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return float(
      np.max(np.linalg.norm(ours - reference, axis=-1) / np.linalg.norm(reference, axis=-1))
  )


def torchvision_resnet152_features(model):
  """The reference's 2D feature function (its model.py): the model without its last two
  children (average pool and classifier), then the mean over height and width."""
  trunk = torch.nn.Sequential(*list(model.children())[:-2])
  return lambda x: trunk(x).mean(dim=(-2, -1))


class TorchResNeXtBottleneck(torch.nn.Module):
  """3D-ResNets-PyTorch's ResNeXt bottleneck, written from the architecture: 1x1x1 reduce,
  3x3x3 grouped (stride here), 1x1x1 expand to 2x planes, BatchNorm after each, shortcut B."""

  def __init__(self, inplanes, planes, cardinality, stride=1, downsample=None):
    super().__init__()
    nn = torch.nn
    mid = cardinality * (planes // 32)
    self.conv1 = nn.Conv3d(inplanes, mid, kernel_size=1, bias=False)
    self.bn1 = nn.BatchNorm3d(mid)
    self.conv2 = nn.Conv3d(
        mid, mid, kernel_size=3, stride=stride, padding=1, groups=cardinality, bias=False
    )
    self.bn2 = nn.BatchNorm3d(mid)
    self.conv3 = nn.Conv3d(mid, planes * 2, kernel_size=1, bias=False)
    self.bn3 = nn.BatchNorm3d(planes * 2)
    self.downsample = downsample

  def forward(self, x):
    relu = torch.nn.functional.relu
    out = relu(self.bn1(self.conv1(x)))
    out = relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchResNeXt3D(torch.nn.Module):
  """ResNeXt-101 of 3D-ResNets-PyTorch (cardinality 32, shortcut B, 16 x 112 x 112 clips,
  last_fc=False): conv1 7x7x7 stride (1, 2, 2), max-pool 3 stride 2, layers [3, 4, 23, 3],
  AvgPool3d((1, 4, 4)). The classifier `fc` is in the checkpoint but not in the features."""

  def __init__(self, layers=(3, 4, 23, 3), cardinality=32):
    super().__init__()
    nn = torch.nn
    self.inplanes = 64
    self.conv1 = nn.Conv3d(3, 64, kernel_size=7, stride=(1, 2, 2), padding=3, bias=False)
    self.bn1 = nn.BatchNorm3d(64)
    self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
    for i, (planes, blocks) in enumerate(zip((128, 256, 512, 1024), layers)):
      setattr(
          self, f"layer{i + 1}", self._make_layer(planes, blocks, 1 if i == 0 else 2, cardinality)
      )
    self.avgpool = nn.AvgPool3d((1, 4, 4), stride=1)
    self.fc = nn.Linear(cardinality * 32 * 2, 400)

  def _make_layer(self, planes, blocks, stride, cardinality):
    nn = torch.nn
    downsample = None
    if stride != 1 or self.inplanes != planes * 2:
      downsample = nn.Sequential(
          nn.Conv3d(self.inplanes, planes * 2, kernel_size=1, stride=stride, bias=False),
          nn.BatchNorm3d(planes * 2),
      )
    layers = [TorchResNeXtBottleneck(self.inplanes, planes, cardinality, stride, downsample)]
    self.inplanes = planes * 2
    layers += [TorchResNeXtBottleneck(self.inplanes, planes, cardinality) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(torch.nn.functional.relu(self.bn1(self.conv1(x))))
    for i in range(1, 5):
      x = getattr(self, f"layer{i}")(x)
    return self.avgpool(x).view(x.size(0), -1)


def randomise_batchnorm(model, calibration_input, seed):
  """Random BatchNorm scales and shifts, and running statistics measured on `calibration_input`
  (so the folded weights are far from identity and activations stay in range), then eval mode."""
  generator = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
      m.weight.data = torch.rand(m.num_features, generator=generator) + 0.5
      m.bias.data = 0.1 * torch.randn(m.num_features, generator=generator)
      m.reset_running_stats()
      m.momentum = None  # the running statistics become this one batch's
  model.train()
  with torch.no_grad():
    model(calibration_input)
  return model.eval()


def torch_normalise(pixels, stream):
  """The reference's preprocessing.py on [N, ..., H, W, 3] uint8 (numpy), channels moved first."""
  x = torch.from_numpy(pixels.astype(np.float32))
  if stream is STREAM_2D:
    x = x / 255.0
  mean = torch.tensor(stream.mean).view(3, *([1] * (x.ndim - 2)))
  std = torch.tensor(stream.std).view(3, *([1] * (x.ndim - 2)))
  x = torch.movedim(x, -1, 1)
  return (x - mean) / (std + 1e-8)
