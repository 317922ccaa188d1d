"""ResNet-18/34/50 with torchvision's semantics, and MoCo-v2's encoder (backbone + MLP head).

torchvision's layout is kept so that facebookresearch/moco checkpoints import
as they are (`importers.moco_pytorch`):
- ResNet v1.5: a bottleneck strides in its 3x3 conv; a block whose shape
  changes adds a 1x1 conv + BN shortcut ('downsample');
- convs have no bias and torch's paddings (k // 2 on each side; 'SAME' would pad
  stride-2 convs asymmetrically), kaiming-normal init (fan_out, ReLU gain, not
  truncated); BN scale 1, bias 0, optionally scale 0 in each block's last BN
  (`zero_init_residual`, off as in torchvision);
- 'imagenet' stem: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool (padding 1); 'cifar'
  stem (MoCo's CIFAR demo), for 32x32 images and the digits: 3x3/1 conv, BN,
  ReLU, no max-pool.
`width` is the first stage's channel count (64 in torchvision); stages double it.

Every BN is a `GroupBatchNorm` normalising over the BN groups passed as
`groups` (None: the whole global batch), so training statistics do not depend
on the device count. Convs compute in `dtype` (bfloat16 option) with float32
params; BN statistics and the pooled features are float32.

Module names follow torchvision's: torch `layer2.0.downsample.1` is
`layer2_0/downsample_bn` here, `conv1`/`bn1` keep their names.
"""
import dataclasses
import math
from typing import Any, Callable, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from nda_jax import parallel
from nda_jax.models.batch_norm import BNGroups, GroupBatchNorm
from nda_jax.models.layers import Conv

Dtype = Any

STEMS = ("imagenet", "cifar")
BLOCKS = ("basic", "bottleneck")
# arch -> (blocks per stage, block kind), torchvision's resnet18/34/50.
ARCHS = {
    "resnet18": ((2, 2, 2, 2), "basic"),
    "resnet34": ((3, 4, 6, 3), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"),
}
_EXPANSION = {"basic": 1, "bottleneck": 4}

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"), untruncated.
_KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear's default weight init: U(+-1/sqrt(fan_in)).
_TORCH_LINEAR = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_linear_bias(fan_in: int) -> Callable:
  """torch.nn.Linear's default bias init, U(+-1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


@dataclasses.dataclass(frozen=True)
class _Layers:
  """Conv and BN factories shared by the stem and the blocks."""
  dtype: Dtype
  param_dtype: Dtype
  conv_impl: str
  bn_momentum: float
  bn_epsilon: float
  axis_name: str | None

  def conv(self, features: int, kernel: int, strides: int, name: str) -> Conv:
    return Conv(features, (kernel, kernel), strides=strides, padding=kernel // 2, use_bias=False,
                kernel_init=_KAIMING_FAN_OUT, dtype=self.dtype, param_dtype=self.param_dtype,
                impl=self.conv_impl, name=name)

  def norm(self, name: str, zero_scale: bool = False) -> GroupBatchNorm:
    return GroupBatchNorm(momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype,
                          param_dtype=self.param_dtype, axis_name=self.axis_name,
                          scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
                          name=name)


class Block(nn.Module):
  """torchvision's BasicBlock ('basic': two 3x3) or Bottleneck ('bottleneck': 1x1, 3x3, 1x1 x4)."""
  kind: str
  features: int
  strides: int
  layers: _Layers
  zero_init_residual: bool

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, groups: BNGroups | None) -> jax.Array:
    layers = self.layers
    bn = lambda name, h, last=False: layers.norm(name, last and self.zero_init_residual)(
        h, use_running_average=not train, groups=groups)
    out_features = self.features * _EXPANSION[self.kind]
    if self.kind == "basic":
      h = nn.relu(bn("bn1", layers.conv(self.features, 3, self.strides, "conv1")(x)))
      h = bn("bn2", layers.conv(self.features, 3, 1, "conv2")(h), last=True)
    else:
      h = nn.relu(bn("bn1", layers.conv(self.features, 1, 1, "conv1")(x)))
      h = nn.relu(bn("bn2", layers.conv(self.features, 3, self.strides, "conv2")(h)))
      h = bn("bn3", layers.conv(out_features, 1, 1, "conv3")(h), last=True)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != out_features:
      shortcut = layers.conv(out_features, 1, self.strides, "downsample_conv")(x)
      shortcut = bn("downsample_bn", shortcut)
    return nn.relu(h + shortcut)


class ResNet(nn.Module):
  """A torchvision ResNet without its classifier: images -> pooled features [b, num_features]."""
  stage_sizes: Sequence[int]
  block: str
  stem: str = "imagenet"
  width: int = 64
  zero_init_residual: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  axis_name: str | None = parallel.AXIS
  conv_impl: str = "auto"

  @property
  def num_features(self) -> int:
    return self.width * 2 ** (len(self.stage_sizes) - 1) * _EXPANSION[self.block]

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, groups: BNGroups | None = None) -> jax.Array:
    if self.block not in BLOCKS:
      raise ValueError(f"ResNet block={self.block!r}; valid choices: {BLOCKS}")
    if self.stem not in STEMS:
      raise ValueError(f"ResNet stem={self.stem!r}; valid choices: {STEMS}")
    chex.assert_rank(x, 4)
    layers = _Layers(self.dtype, self.param_dtype, self.conv_impl, self.bn_momentum,
                     self.bn_epsilon, self.axis_name)
    imagenet = self.stem == "imagenet"
    h = layers.conv(self.width, 7 if imagenet else 3, 2 if imagenet else 1, "conv1")(x)
    h = nn.relu(layers.norm("bn1")(h, use_running_average=not train, groups=groups))
    if imagenet:
      h = nn.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        h = Block(self.block, self.width * 2 ** i, 2 if i > 0 and j == 0 else 1, layers,
                  self.zero_init_residual, name=f"layer{i + 1}_{j}")(h, train=train, groups=groups)
    features = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
    chex.assert_shape(features, (x.shape[0], self.num_features))
    return features


class MocoEncoder(nn.Module):
  """MoCo's encoder: `backbone`, then the head: MoCo-v2's MLP Dense(F) - ReLU - Dense(head_dim)
  (main_moco's --mlp), or MoCo v1's one Dense(head_dim) (`mlp_head=False`).

  F is the backbone's feature dim (2048-2048-128 for ResNet-50; no BN in the
  head). Returns (pooled features, projection), both float32; the projection
  is not normalised (the loss does it). Params: 'backbone' and 'head' (MLP:
  'hidden', 'output', torch `fc.0`, `fc.2`; linear: the Dense itself, torch `fc`).
  """
  backbone: ResNet
  head_dim: int = 128
  mlp_head: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool,
               groups: BNGroups | None = None) -> tuple[jax.Array, jax.Array]:
    features = self.backbone(x, train=train, groups=groups)
    if self.mlp_head:
      projection = _MLPHead(self.backbone.num_features, self.head_dim, self.backbone.dtype,
                            self.backbone.param_dtype, name="head")(features)
    else:
      projection = _torch_dense(self.head_dim, features.shape[-1], self.backbone.dtype,
                                self.backbone.param_dtype, "head")(features).astype(jnp.float32)
    return features, projection


class _MLPHead(nn.Module):
  hidden: int
  out_dim: int
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    h = nn.relu(_torch_dense(self.hidden, features.shape[-1], self.dtype, self.param_dtype,
                             "hidden")(features))
    return _torch_dense(self.out_dim, self.hidden, self.dtype, self.param_dtype,
                        "output")(h).astype(jnp.float32)


def _torch_dense(features: int, fan_in: int, dtype: Dtype, param_dtype: Dtype,
                 name: str) -> nn.Dense:
  """A Dense initialised as torch's nn.Linear."""
  return nn.Dense(features, kernel_init=_TORCH_LINEAR, bias_init=_torch_linear_bias(fan_in),
                  dtype=dtype, param_dtype=param_dtype, name=name)


def resnet(arch: str, **kwargs) -> ResNet:
  """`ARCHS[arch]` as a ResNet; kwargs are ResNet's other fields (stem, width, dtype, ...)."""
  if arch not in ARCHS:
    raise ValueError(f"arch={arch!r}; valid choices: {sorted(ARCHS)}")
  stage_sizes, block = ARCHS[arch]
  return ResNet(stage_sizes=stage_sizes, block=block, **kwargs)


def resnet18(**kwargs) -> ResNet:
  return resnet("resnet18", **kwargs)


def resnet34(**kwargs) -> ResNet:
  return resnet("resnet34", **kwargs)


def resnet50(**kwargs) -> ResNet:
  return resnet("resnet50", **kwargs)


def build_encoder(arch: str, *, stem: str = "imagenet", width: int = 64, head_dim: int = 128,
                  mlp_head: bool = True, dtype: Dtype = jnp.float32, zero_init_residual: bool = False,
                  bn_momentum: float = 0.9, bn_epsilon: float = 1e-5,
                  axis_name: str | None = parallel.AXIS, conv_impl: str = "auto") -> MocoEncoder:
  """A MoCo encoder on `ARCHS[arch]` (ValueError naming the choices for an unknown arch)."""
  backbone = resnet(arch, stem=stem, width=width, zero_init_residual=zero_init_residual,
                    dtype=dtype, bn_momentum=bn_momentum, bn_epsilon=bn_epsilon,
                    axis_name=axis_name, conv_impl=conv_impl)
  return MocoEncoder(backbone=backbone, head_dim=head_dim, mlp_head=mlp_head)
