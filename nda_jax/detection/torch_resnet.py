"""A PyTorch ResNet in torchvision's key layout for every backbone `models.resnet` builds.

torchvision's `resnet18/34/50` fix the stem (7x7/2 conv, max-pool) and the width
(64); the demo's backbone has the 'cifar' stem (3x3/1 conv, no max-pool) and width
16. This module is torchvision's ResNet with both as arguments, built from
torchvision's own `BasicBlock` / `Bottleneck`, with the same state_dict keys
(`conv1`, `bn1`, `layer1.0.conv1`, ..., no `fc`), so the file the exporter writes
(`exporters.backbone`, 'torchvision') loads `strict=True`, and its children
(`conv1` ... `layer4`) are what torchvision's `BackboneWithFPN` takes as a body.
Needs torch + torchvision (the `detection` extra).
"""
import re
from typing import Mapping

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from nda_jax.models import resnet as jax_resnet

STAGES = ("layer1", "layer2", "layer3", "layer4")
_BLOCKS = {"basic": tv_resnet.BasicBlock, "bottleneck": tv_resnet.Bottleneck}


class ResNet(nn.Module):
  """torchvision's ResNet (v1.5) with `stem` ('imagenet' | 'cifar') and `width`, and its
  init (kaiming-normal fan-out convs, BN 1 / 0); `forward` returns the pooled features
  (torchvision's with `fc = Identity`)."""

  def __init__(self, arch: str, stem: str = "imagenet", width: int = 64,
               norm_layer: type[nn.Module] = nn.BatchNorm2d):
    super().__init__()
    if arch not in jax_resnet.ARCHS or stem not in jax_resnet.STEMS:
      raise ValueError(f"arch={arch!r}, stem={stem!r}; valid: {tuple(jax_resnet.ARCHS)}, "
                       f"{jax_resnet.STEMS}")
    stage_sizes, kind = jax_resnet.ARCHS[arch]
    block = _BLOCKS[kind]
    imagenet = stem == "imagenet"
    self.conv1 = nn.Conv2d(3, width, 7 if imagenet else 3, stride=2 if imagenet else 1,
                           padding=3 if imagenet else 1, bias=False)
    self.bn1 = norm_layer(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if imagenet else nn.Identity()
    inplanes, self.stage_channels = width, []
    for i, (name, blocks) in enumerate(zip(STAGES, stage_sizes)):
      planes, stride = width * 2 ** i, 1 if i == 0 else 2
      layers = []
      for j in range(blocks):
        downsample = None
        if j == 0 and (stride != 1 or inplanes != planes * block.expansion):
          downsample = nn.Sequential(
              nn.Conv2d(inplanes, planes * block.expansion, 1, stride=stride, bias=False),
              norm_layer(planes * block.expansion))
        layers.append(block(inplanes, planes, stride if j == 0 else 1, downsample,
                            norm_layer=norm_layer))
        inplanes = planes * block.expansion
      setattr(self, name, nn.Sequential(*layers))
      self.stage_channels.append(inplanes)
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    for m in self.modules():              # torchvision's init (an untrained backbone's)
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for name in STAGES:
      x = getattr(self, name)(x)
    return torch.flatten(self.avgpool(x), 1)


def describe(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, str, int]:
  """(arch, stem, width) of an exported torchvision-layout backbone, read off its keys
  and shapes; ValueError (one paragraph) for a state_dict that is no such backbone."""
  conv1 = state_dict.get("conv1.weight")
  if conv1 is None or conv1.ndim != 4 or conv1.shape[-1] not in (3, 7):
    raise ValueError(
        "the file is not a ResNet backbone in torchvision's layout: it has no 'conv1.weight' "
        "of a 3x3 or 7x7 conv (keys start with "
        f"{sorted(state_dict)[:3]}). Write one with python -m nda_jax.exporters.backbone "
        "--format=torchvision.")
  kind = "bottleneck" if "layer1.0.conv3.weight" in state_dict else "basic"
  sizes = tuple(len({m.group(1) for k in state_dict
                     if (m := re.match(rf"{s}\.(\d+)\.", k))}) for s in STAGES)
  arch = [a for a, (n, b) in jax_resnet.ARCHS.items() if (n, b) == (sizes, kind)]
  if not arch:
    raise ValueError(
        f"the file's ResNet has {sizes} {kind} blocks per stage, which is none of "
        f"{tuple(jax_resnet.ARCHS)}; write it with python -m nda_jax.exporters.backbone "
        f"--format=torchvision.")
  return arch[0], "imagenet" if conv1.shape[-1] == 7 else "cifar", int(conv1.shape[0])


def from_state_dict(state_dict: Mapping[str, torch.Tensor],
                    norm_layer: type[nn.Module] = nn.BatchNorm2d) -> ResNet:
  """The ResNet the exported `state_dict` describes, loaded `strict=True` (ValueError
  naming the mismatch for one that is not an exporter's)."""
  net = ResNet(*describe(state_dict), norm_layer=norm_layer)
  try:
    net.load_state_dict(state_dict, strict=True)
  except RuntimeError as e:
    raise ValueError(
        f"the file does not hold a complete ResNet backbone in torchvision's layout "
        f"({' '.join(str(e).split())[:400]}). Write one with python -m "
        f"nda_jax.exporters.backbone --format=torchvision.") from None
  return net
