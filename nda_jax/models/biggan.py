"""BigGAN for small images, as the NDA paper trains it (`BigGAN_new.py` of ermongroup/NDA).

This is BigGAN-PyTorch's CIFAR ResNet: a generator of up-sampling residual
blocks with class-conditional BatchNorm and a projection discriminator with
global sum pooling, every weight spectrally normalised with one power iteration
per forward from a stored `u`. The defaults are the paper's 32x32 config
(`ch=64`, i.e. 256-channel blocks, `dim_z=128`, 4x4 bottom, no attention,
N(0, 0.02) weights); resolution 16 uses the same blocks with one fewer up/down
sampling step, for CPU demos.

Semantics kept from the PyTorch code (so imported weights give the same outputs):
- BatchNorm normalises with the biased batch variance and tracks the *unbiased*
  one in its running average (PyTorch's `F.batch_norm`), momentum 0.1.
- Spectral norm (`SpectralNorm`) runs PyTorch's power iteration on the kernel
  flattened to `[fan_in, out]`, with `u` on the output side as in PyTorch's
  `[out, fan_in]`, so an imported `u` is used as is.
- Biases keep PyTorch's default init U(+-1/sqrt(fan_in)); the official
  `init_weights` only re-draws weights (N(0, 0.02)).

Variables: 'params' and 'batch_stats' (BN running statistics and the SN `u` /
`sigma`). Apply with `mutable=['batch_stats']` when `train=True`.
"""
import dataclasses
import math
from typing import Any, Callable, Mapping

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from nda_jax.models.layers import Conv

Dtype = Any

# Channel multipliers of `ch` per residual block, like BigGAN-PyTorch's G_arch /
# D_arch: G block i maps in[i] -> out[i] channels and doubles the resolution; D
# block i maps (3 or out[i-1]) -> out[i] channels and halves it where down[i].
G_ARCH = {
    16: dict(in_mult=(4, 4), out_mult=(4, 4)),
    32: dict(in_mult=(4, 4, 4), out_mult=(4, 4, 4)),
}
D_ARCH = {
    16: dict(out_mult=(4, 4, 4, 4), downsample=(True, False, False, False)),
    32: dict(out_mult=(4, 4, 4, 4), downsample=(True, True, False, False)),
}

_N02 = nn.initializers.normal(stddev=0.02)


def _arch(table: Mapping[int, dict], resolution: int, what: str) -> dict:
  if resolution not in table:
    raise ValueError(f"{what}: resolution={resolution} is not supported; valid choices: {sorted(table)}")
  return table[resolution]


def generator_arch(resolution: int) -> dict:
  return _arch(G_ARCH, resolution, "Generator")


def discriminator_arch(resolution: int) -> dict:
  return _arch(D_ARCH, resolution, "Discriminator")


def _torch_bias_init(fan_in: int) -> Callable:
  """PyTorch's default Conv2d/Linear bias init, which the official init leaves in place."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _l2_normalize(x: jax.Array, eps: float) -> jax.Array:
  """`F.normalize`: x / max(|x|, eps)."""
  return x / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(x))), eps)


class SpectralNorm(nn.Module):
  """BigGAN-PyTorch's `SN`: the wrapped layer uses W / sigma(W).

  Every forward runs one power iteration from the stored `u` (batch_stats) on
  W flattened to [fan_in, out] (`u` on the output side, like PyTorch's
  [out, fan_in]) and divides W by the resulting sigma; gradients flow through
  sigma but not through u and v. Only `update_stats=True` stores the new u and
  sigma. Unlike `flax.linen.SpectralNorm`, init stores the raw weights (Flax
  stores W / sigma, which changes how Adam moves them) and normalisation divides
  by max(|x|, eps) as `F.normalize` does.
  """
  layer_instance: nn.Module
  param_name: str = "kernel"
  epsilon: float = 1e-8

  @nn.compact
  def __call__(self, *args, update_stats: bool, **kwargs):
    initializing = self.is_initializing()

    def normalize(variables):
      params = variables["params"]
      w = params[self.param_name]
      mat = w.reshape(-1, w.shape[-1]).astype(jnp.float32)
      u_var = self.variable("batch_stats", "u", lambda: jax.random.normal(
          self.make_rng("params"), (1, mat.shape[1]), jnp.float32))
      sigma_var = self.variable("batch_stats", "sigma", lambda: jnp.ones((), jnp.float32))
      if initializing:
        return variables
      v = lax.stop_gradient(_l2_normalize(u_var.value @ mat.T, self.epsilon))
      u = lax.stop_gradient(_l2_normalize(v @ mat, self.epsilon))
      sigma = (v @ mat @ u.T)[0, 0]
      if update_stats:
        u_var.value, sigma_var.value = u, sigma
      return {**variables, "params": {**params, self.param_name: (w / sigma).astype(w.dtype)}}

    return nn.map_variables(lambda layer: layer(*args, **kwargs), "params", trans_in_fn=normalize,
                            init=initializing, mutable=initializing)(self.layer_instance)


def spectral_norm(layer: nn.Module, eps: float, param_name: str = "kernel") -> SpectralNorm:
  """Wraps `layer` (whose weight is `param_name`) in SpectralNorm named `<layer name>_sn`."""
  return SpectralNorm(layer, param_name, eps, name=f"{layer.name}_sn")


def batch_norm(module: nn.Module, x: jax.Array, *, use_running_average: bool, update_stats: bool,
               momentum: float, epsilon: float, axis_name: str | None) -> jax.Array:
  """Normalises `x` over all but the last axis; creates 'mean'/'var' in module's batch_stats.

  Matches PyTorch `F.batch_norm`: biased batch variance for normalising, the
  unbiased one for the running average (`ra = momentum * ra + (1 - momentum) * batch`,
  Flax's momentum convention). With `axis_name`, statistics are averaged over that
  mesh axis, so a sharded batch normalises exactly like the whole batch.

  Not batch_norm.GroupBatchNorm: BigGAN needs no groups, keeps the statistics in
  the calling layer as BigGAN-PyTorch's ccbn / bn do (the importer maps them one to
  one), and samples with batch statistics without updating the running averages.
  """
  features = x.shape[-1]
  ra_mean = module.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
  ra_var = module.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
  xf = x.astype(jnp.float32)
  if use_running_average:
    mean, var = ra_mean.value, ra_var.value
  else:
    axes = tuple(range(x.ndim - 1))
    sync = axis_name is not None and not module.is_initializing()
    mean = jnp.mean(xf, axes)
    if sync:
      mean = lax.pmean(mean, axis_name)
    var = jnp.mean(jnp.square(xf - mean), axes)
    if sync:
      var = lax.pmean(var, axis_name)
    if update_stats and not module.is_initializing():
      n = math.prod(x.shape[:-1]) * (lax.axis_size(axis_name) if sync else 1)
      ra_mean.value = momentum * ra_mean.value + (1.0 - momentum) * mean
      ra_var.value = momentum * ra_var.value + (1.0 - momentum) * var * (n / max(n - 1, 1))
  return (xf - mean) * lax.rsqrt(var + epsilon)


class ClassConditionalBatchNorm(nn.Module):
  """BN without affine, then per-class gain (1 + embedding) and bias (embedding).

  BigGAN-PyTorch `ccbn` with `which_linear=nn.Embedding` (G_shared=False); the
  embeddings are N(0, 0.02) like the official init. One class = learned plain BN.
  """
  n_classes: int
  momentum: float = 0.9
  epsilon: float = 1e-5
  axis_name: str | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array, *, use_running_average: bool,
               update_stats: bool) -> jax.Array:
    features = x.shape[-1]
    h = batch_norm(self, x, use_running_average=use_running_average, update_stats=update_stats,
                   momentum=self.momentum, epsilon=self.epsilon, axis_name=self.axis_name)
    embed = lambda name: nn.Embed(self.n_classes, features, embedding_init=_N02,
                                  param_dtype=self.param_dtype, name=name)
    gain = 1.0 + embed("gain")(y).astype(jnp.float32)
    bias = embed("bias")(y).astype(jnp.float32)
    return (h * gain[:, None, None, :] + bias[:, None, None, :]).astype(x.dtype)


class BatchNorm(nn.Module):
  """Plain BN with learned gain (ones) and bias (zeros): BigGAN-PyTorch `layers.bn`."""
  momentum: float = 0.9
  epsilon: float = 1e-5
  axis_name: str | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, use_running_average: bool, update_stats: bool) -> jax.Array:
    features = x.shape[-1]
    h = batch_norm(self, x, use_running_average=use_running_average, update_stats=update_stats,
                   momentum=self.momentum, epsilon=self.epsilon, axis_name=self.axis_name)
    scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
    return (h * scale + bias).astype(x.dtype)


class ClassEmbed(nn.Module):
  """Class embedding stored transposed, `[features, n_classes]`.

  The transposition puts SpectralNorm's `u` on the class side, where
  BigGAN-PyTorch's `SNEmbedding` keeps it, so imported weights iterate alike.
  """
  n_classes: int
  features: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y: jax.Array) -> jax.Array:
    table = self.param("embedding", _N02, (self.features, self.n_classes), self.param_dtype)
    return jnp.take(table, y, axis=1).T


@dataclasses.dataclass(frozen=True)
class _Layers:
  """Factories for the spectrally normalised layers shared by G and D blocks."""
  sn_eps: float
  conv_impl: str
  dtype: Dtype
  param_dtype: Dtype

  def conv(self, features: int, kernel: int, in_features: int, name: str) -> SpectralNorm:
    return spectral_norm(Conv(
        features, (kernel, kernel), padding="SAME", kernel_init=_N02,
        bias_init=_torch_bias_init(in_features * kernel * kernel), dtype=self.dtype,
        param_dtype=self.param_dtype, impl=self.conv_impl, name=name), self.sn_eps)

  def dense(self, features: int, in_features: int, name: str) -> SpectralNorm:
    return spectral_norm(nn.Dense(
        features, kernel_init=_N02, bias_init=_torch_bias_init(in_features), dtype=self.dtype,
        param_dtype=self.param_dtype, name=name), self.sn_eps)


def _upsample(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2 (`F.interpolate(scale_factor=2)`)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avg_pool(x: jax.Array) -> jax.Array:
  """2x2 average pooling, stride 2 (`nn.AvgPool2d(2)`)."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class GBlock(nn.Module):
  """relu(ccbn) -> up -> conv3x3 -> relu(ccbn) -> conv3x3, plus conv1x1(up(x)).

  Every G block up-samples, so the shortcut is always the learnable 1x1 conv.
  """
  features: int
  n_classes: int
  layers: _Layers
  bn_momentum: float
  bn_eps: float
  axis_name: str | None

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array, *, train: bool, use_running_average: bool):
    in_features = x.shape[-1]
    bn = lambda name: ClassConditionalBatchNorm(
        self.n_classes, self.bn_momentum, self.bn_eps, self.axis_name,
        self.layers.param_dtype, name=name)
    h = nn.relu(bn("bn1")(x, y, use_running_average=use_running_average, update_stats=train))
    h, x = _upsample(h), _upsample(x)
    h = self.layers.conv(self.features, 3, in_features, "conv1")(h, update_stats=train)
    h = nn.relu(bn("bn2")(h, y, use_running_average=use_running_average, update_stats=train))
    h = self.layers.conv(self.features, 3, self.features, "conv2")(h, update_stats=train)
    return h + self.layers.conv(self.features, 1, in_features, "conv_sc")(x, update_stats=train)


class DBlock(nn.Module):
  """[relu] -> conv3x3 -> relu -> conv3x3 -> [avgpool], plus a learnable shortcut.

  The shortcut is a 1x1 conv when channels change or the block downsamples:
  conv then pool in pre-activation blocks, pool then conv in the first block.
  """
  features: int
  downsample: bool
  preactivation: bool
  layers: _Layers

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    in_features = x.shape[-1]
    h = nn.relu(x) if self.preactivation else x
    h = self.layers.conv(self.features, 3, in_features, "conv1")(h, update_stats=train)
    h = self.layers.conv(self.features, 3, self.features, "conv2")(nn.relu(h), update_stats=train)
    if self.downsample:
      h = _avg_pool(h)
    if in_features != self.features or self.downsample:
      conv_sc = self.layers.conv(self.features, 1, in_features, "conv_sc")
      if self.preactivation:
        x = conv_sc(x, update_stats=train)
        x = _avg_pool(x) if self.downsample else x
      else:
        x = _avg_pool(x) if self.downsample else x
        x = conv_sc(x, update_stats=train)
    return h + x


class Generator(nn.Module):
  """z [B, dim_z], labels y [B] -> images [B, res, res, 3] in [-1, 1].

  `train=True` uses batch statistics, updates BN running averages and SN `u`.
  `train=False` stores nothing; BN then uses the batch statistics of the sample
  batch when `sample_with_batch_stats` (what the official evaluation does,
  G_eval_mode=False) and the running averages otherwise.
  """
  ch: int = 64
  dim_z: int = 128
  bottom_width: int = 4
  resolution: int = 32
  n_classes: int = 1
  out_channels: int = 3
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  sn_eps: float = 1e-8
  sample_with_batch_stats: bool = True
  axis_name: str | None = None
  conv_impl: str = "auto"
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array, y: jax.Array, train: bool) -> jax.Array:
    arch = generator_arch(self.resolution)
    batch = z.shape[0]
    chex.assert_shape(z, (batch, self.dim_z))
    chex.assert_shape(y, (batch,))
    chex.assert_type(y, int)
    if self.bottom_width * 2 ** len(arch["out_mult"]) != self.resolution:
      raise ValueError(f"bottom_width={self.bottom_width} does not reach resolution={self.resolution} "
                       f"with {len(arch['out_mult'])} up-blocks; use bottom_width="
                       f"{self.resolution // 2 ** len(arch['out_mult'])}")
    layers = _Layers(self.sn_eps, self.conv_impl, self.dtype, self.param_dtype)
    use_running_average = not train and not self.sample_with_batch_stats
    width0 = self.ch * arch["in_mult"][0]
    h = layers.dense(self.bottom_width ** 2 * width0, self.dim_z, "linear")(
        z.astype(self.dtype or z.dtype), update_stats=train)
    h = h.reshape(batch, self.bottom_width, self.bottom_width, width0)
    for i, mult in enumerate(arch["out_mult"]):
      h = GBlock(self.ch * mult, self.n_classes, layers, self.bn_momentum, self.bn_eps,
                 self.axis_name, name=f"blocks_{i}")(
                     h, y, train=train, use_running_average=use_running_average)
    h = BatchNorm(self.bn_momentum, self.bn_eps, self.axis_name, self.param_dtype,
                  name="output_bn")(h, use_running_average=use_running_average, update_stats=train)
    h = layers.conv(self.out_channels, 3, h.shape[-1], "output_conv")(nn.relu(h), update_stats=train)
    out = jnp.tanh(h.astype(jnp.float32))
    chex.assert_shape(out, (batch, self.resolution, self.resolution, self.out_channels))
    return out


class Discriminator(nn.Module):
  """Images x [B, res, res, 3] in [-1, 1], labels y [B] -> logits [B].

  Projection discriminator: linear(sum_hw relu(h)) + <embed(y), sum_hw relu(h)>.
  D has no BatchNorm; `train=True` only stores the SN power-iteration state.
  """
  ch: int = 64
  resolution: int = 32
  n_classes: int = 1
  in_channels: int = 3
  sn_eps: float = 1e-8
  conv_impl: str = "auto"
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array, train: bool) -> jax.Array:
    arch = discriminator_arch(self.resolution)
    batch = x.shape[0]
    chex.assert_shape(x, (batch, self.resolution, self.resolution, self.in_channels))
    chex.assert_shape(y, (batch,))
    chex.assert_type(y, int)
    layers = _Layers(self.sn_eps, self.conv_impl, self.dtype, self.param_dtype)
    h = x.astype(self.dtype or x.dtype)
    for i, (mult, down) in enumerate(zip(arch["out_mult"], arch["downsample"])):
      h = DBlock(self.ch * mult, down, i > 0, layers, name=f"blocks_{i}")(h, train=train)
    h = jnp.sum(nn.relu(h).astype(jnp.float32), axis=(1, 2))
    features = h.shape[-1]
    # The head stays float32 with any dtype: its inputs are sums over all positions.
    head = _Layers(self.sn_eps, self.conv_impl, jnp.float32, self.param_dtype)
    out = head.dense(1, features, "linear")(h, update_stats=train)[:, 0]
    embed = spectral_norm(ClassEmbed(self.n_classes, features, self.param_dtype, name="embed"),
                          self.sn_eps, "embedding")(y, update_stats=train)
    out = out.astype(jnp.float32) + jnp.sum(embed.astype(jnp.float32) * h, axis=-1)
    chex.assert_shape(out, (batch,))
    return out

