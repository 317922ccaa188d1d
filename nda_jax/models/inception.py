"""The FID Inception-v3: the network of TF's `inception-2015-12-05` graph.

FID numbers are only comparable between papers when they come from this exact
network (TTUR / pytorch-fid), not torchvision's or Keras' Inception-v3. It
differs from the torchvision architecture in three places, which pytorch-fid
patches as its `FIDInceptionA/C/E_1/E_2` blocks:
  * the 3x3 average pool of the A, C and first E blocks excludes the zero
    padding from the average (TF semantics, `count_include_pad=False`);
  * the pool branch of the last E block (`Mixed_7c`) is a 3x3 *max* pool;
  * the classifier has 1008 outputs (the graph's `softmax/logits`).
Every conv has no bias and is followed by BatchNorm (eps 1e-3) and ReLU.

Module names follow torchvision / pytorch-fid (`Mixed_5b/branch1x1/conv`), so
`nda_jax.models.inception_weights` maps the weights name for name.

Inputs are NHWC float images in [-1, 1], the range the graph expects; this is
what pytorch-fid's `normalize_input` (x in [0, 1] -> 2x - 1) produces, and what
our models already use, so no rescaling is done here.
"""
from typing import Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from nda_jax.models.layers import Conv

INPUT_SIZE = 299
NUM_CLASSES = 1008
FEATURE_DIM = 2048
BN_EPSILON = 1e-3


def resize_bilinear(x: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """`F.interpolate(x, (size, size), mode='bilinear', align_corners=False)` in NHWC.

  pytorch-fid resizes this way. `jax.image.resize(..., 'bilinear')` uses the
  same half-pixel centres but antialiases when it *down*-scales (torch does
  not), so it agrees with torch only for up-scaling; `scale_and_translate`
  with `antialias=False` agrees in both directions (at the border, dropping
  the out-of-image tap and renormalising equals torch's clamping).
  """
  b, h, w, c = x.shape
  if (h, w) == (size, size):
    return x
  scale = jnp.array([size / h, size / w], jnp.float32)
  return jax.image.scale_and_translate(
      x, (b, size, size, c), spatial_dims=(1, 2), scale=scale,
      translation=jnp.zeros(2, jnp.float32), method="linear", antialias=False)


def resize_clean(x: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """clean-fid's 'clean' resize of [-1, 1] NHWC images, returned in [-1, 1].

  clean-fid resizes each channel of the [0, 255] image as a float32 PIL 'F'
  image with bicubic filtering (Keys a = -0.5, antialiased when shrinking,
  out-of-image taps dropped and the weights renormalised), keeps the result
  unquantised and clips it to [0, 255]. `scale_and_translate` 'cubic' is that
  filter (agrees with PIL to float32 rounding, about 5e-4 of 255).
  """
  b, h, w, c = x.shape
  if (h, w) == (size, size):
    return x
  scale = jnp.array([size / h, size / w], jnp.float32)
  pixels = jax.image.scale_and_translate(
      (x + 1.0) * 127.5, (b, size, size, c), spatial_dims=(1, 2), scale=scale,
      translation=jnp.zeros(2, jnp.float32), method="cubic", antialias=True)
  return jnp.clip(pixels, 0.0, 255.0) / 127.5 - 1.0


# FID resize modes, named as clean-fid names them. Neither is the TF graph's
# resize (clean-fid's 'legacy_tensorflow') that TTUR and the paper's numbers used.
RESIZE_MODES = {"legacy_pytorch": resize_bilinear, "clean": resize_clean}


def _pad(padding: int | Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
  ph, pw = (padding, padding) if isinstance(padding, int) else padding
  return ((ph, ph), (pw, pw))


class ConvBN(nn.Module):
  """torchvision's `BasicConv2d`: conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU.

  Flax's BatchNorm, not GroupBatchNorm: the FID network is only ever applied with its
  imported running averages, so no batch statistics (grouped or synced) arise.
  """
  features: int
  kernel_size: Sequence[int] = (1, 1)
  strides: int = 1
  padding: int | Sequence[int] = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = Conv(self.features, tuple(self.kernel_size), strides=(self.strides, self.strides),
             padding=_pad(self.padding), use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
    return nn.relu(x)


def _avg_pool_same(x: jax.Array) -> jax.Array:
  """3x3/1 average pool that ignores the zero padding (TF's AvgPool 'SAME')."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_same(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_reduce(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """`FIDInceptionA` (Mixed_5b/c/d): 35x35 block, padding-excluding average pool."""
  pool_features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = ConvBN(64, name="branch1x1")(x)
    b5 = ConvBN(48, name="branch5x5_1")(x)
    b5 = ConvBN(64, (5, 5), padding=2, name="branch5x5_2")(b5)
    b3 = ConvBN(64, name="branch3x3dbl_1")(x)
    b3 = ConvBN(96, (3, 3), padding=1, name="branch3x3dbl_2")(b3)
    b3 = ConvBN(96, (3, 3), padding=1, name="branch3x3dbl_3")(b3)
    bp = ConvBN(self.pool_features, name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: 35x35 -> 17x17 reduction."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = ConvBN(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = ConvBN(64, name="branch3x3dbl_1")(x)
    bd = ConvBN(96, (3, 3), padding=1, name="branch3x3dbl_2")(bd)
    bd = ConvBN(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_reduce(x)], axis=-1)


class InceptionC(nn.Module):
  """`FIDInceptionC` (Mixed_6b..e): factorised 7x7 convs, padding-excluding average pool."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7
    b1 = ConvBN(192, name="branch1x1")(x)
    b7 = ConvBN(c7, name="branch7x7_1")(x)
    b7 = ConvBN(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = ConvBN(c7, name="branch7x7dbl_1")(x)
    bd = ConvBN(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = ConvBN(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = ConvBN(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = ConvBN(192, name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: 17x17 -> 8x8 reduction."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = ConvBN(192, name="branch3x3_1")(x)
    b3 = ConvBN(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = ConvBN(192, name="branch7x7x3_1")(x)
    b7 = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = ConvBN(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_reduce(x)], axis=-1)


class InceptionE(nn.Module):
  """`FIDInceptionE_1` (Mixed_7b, avg pool) / `FIDInceptionE_2` (Mixed_7c, max pool)."""
  max_pool: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = ConvBN(320, name="branch1x1")(x)
    b3 = ConvBN(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = ConvBN(448, name="branch3x3dbl_1")(x)
    bd = ConvBN(384, (3, 3), padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    pooled = _max_pool_same(x) if self.max_pool else _avg_pool_same(x)
    bp = ConvBN(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Classifier(nn.Module):
  """The 2048 -> 1008 linear layer; returns the logits with and without its bias."""

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], NUM_CLASSES))
    bias = self.param("bias", nn.initializers.zeros_init(), (NUM_CLASSES,))
    unbiased = x @ kernel
    return unbiased + bias, unbiased


class InceptionV3FID(nn.Module):
  """FID Inception-v3. Returns `pool` [B,2048] (pool3), `logits` and `logits_unbiased` [B,1008].

  `logits_unbiased` is `pool @ W` without the bias: the quantity OpenAI's
  original Inception-Score code (and torch-fidelity) softmaxes, so the IS
  computed from it is comparable with published ones.
  Inputs of any size are resized to 299x299 first by `resize`, a key of
  RESIZE_MODES (pytorch-fid's bilinear by default), or not at all (None).
  """
  resize: str | None = "legacy_pytorch"

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    chex.assert_rank(x, 4)
    chex.assert_axis_dimension(x, 3, 3)
    x = x.astype(jnp.float32)
    if self.resize:
      x = RESIZE_MODES[self.resize](x)
    x = ConvBN(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = ConvBN(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = ConvBN(64, (3, 3), padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_reduce(x)
    x = ConvBN(80, name="Conv2d_3b_1x1")(x)
    x = ConvBN(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_reduce(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(max_pool=False, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    logits, logits_unbiased = Classifier(name="fc")(pool)
    chex.assert_shape(pool, (x.shape[0], FEATURE_DIM))
    return {"pool": pool, "logits": logits, "logits_unbiased": logits_unbiased}
