"""On-device positive views: MoCo-v2 "aug+" and DPC's clip augmentation.

Reproduces the torchvision pipeline of facebookresearch/moco `main_moco.py`
with `--aug-plus`:

  RandomResizedCrop(224, scale=(0.2, 1.)),
  RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
  RandomGrayscale(p=0.2),
  RandomApply([GaussianBlur([.1, 2.])], p=0.5),
  RandomHorizontalFlip()

as pure, jit- and vmap-able JAX functions, so that the two views of a batch
are built inside the compiled train step instead of on the host.
`dpc_aug_video` builds Dense Predictive Coding's training clips from the same
ops (crop and flip per clip, grayscale and colour jitter per frame).

Contract (shared with `negative.py`): `fn(rng, images, ...) -> images` for
`[B, H, W, C]` float images in [-1, 1], C = 3 or 1; video variants take
`[B, T, H, W, C]`. `rng` is one key (split into B per-sample keys) or B keys.
Random crops change the spatial size to `out_size`; every other op preserves
the shape. Outputs keep the input dtype; the arithmetic runs in float32 on
[0, 1] images (what torchvision's ops clamp to) so bfloat16 inputs do not lose
accuracy in the HSV round trip.

Single-channel images: the luma of a 1-channel image is the channel itself,
so grayscale and saturation are no-ops, hue is a no-op (as in torchvision),
and contrast blends towards the image mean.

Known, deliberate differences from the PyTorch reference:
- Crop + resize is one `jax.image.scale_and_translate` (bilinear, antialiased
  when shrinking) over the full image, so filter taps at the crop border may
  read the pixels just outside the crop, where torchvision clamps to the edge.
- MoCo blurs with PIL's `GaussianBlur(radius=sigma)`; here the blur is an
  explicit Gaussian kernel (torchvision `GaussianBlur` semantics: reflect
  padding) with an odd kernel size of ~10% of the image side (23 px at 224,
  as in SimCLR, which MoCo-v2 follows).
"""
from collections.abc import Callable, Sequence
import dataclasses
import math

import chex
import dm_pix as pix
import jax
import jax.numpy as jnp

from nda_jax.augment.keys import sample_keys

Size = int | tuple[int, int]

_CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params
DEFAULT_RATIO = (3 / 4, 4 / 3)  # its default aspect ratios
_VALID_CHANNELS = (1, 3)


@dataclasses.dataclass(frozen=True)
class _Op:
  """A per-sample op: `fn(u, image) -> image` driven by U[0, 1) draws.

  `image` is ONE `[H, W, C]` float32 image in [0, 1]; `u` holds its
  `num_uniforms` draws. All randomness of a pipeline comes from one
  `jax.random.uniform` call per sample: each threefry call is costly to
  compile on CPU, and splitting keys per op multiplies them.
  """
  num_uniforms: int
  fn: Callable[[jax.Array, jax.Array], jax.Array]


# ---------------------------------------------------------------------------
# Keys, validation, batching.
# ---------------------------------------------------------------------------
def _per_sample_uniforms(rng: jax.Array, batch_size: int,
                         num_uniforms: int) -> jax.Array:
  keys = sample_keys(rng, batch_size)
  return jax.vmap(lambda k: jax.random.uniform(k, (num_uniforms,)))(keys)


def _check_interval(name: str, interval: Sequence[float], low: float,
                    high: float) -> tuple[float, float]:
  """Validates a (min, max) pair inside [low, high]."""
  if len(interval) != 2 or not low <= interval[0] <= interval[1] <= high:
    raise ValueError(
        f"{name} must be a pair (min, max) with {low} <= min <= max <= {high};"
        f" got {interval}.")
  return float(interval[0]), float(interval[1])


def _check_prob(name: str, p: float) -> float:
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"{name} must be a probability in [0, 1]; got {p}.")
  return float(p)


def _size_hw(size: Size) -> tuple[int, int]:
  hw = (size, size) if isinstance(size, int) else tuple(size)
  if len(hw) != 2 or not all(isinstance(s, int) and s > 0 for s in hw):
    raise ValueError(f"out_size must be a positive int or a pair (height, "
                     f"width) of positive ints; got {size!r}.")
  return hw


def _check_images(x: jax.Array, rank: int, what: str) -> None:
  chex.assert_rank(x, rank)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{what} must be float in [-1, 1]; got {x.dtype}.")
  if x.shape[-1] not in _VALID_CHANNELS:
    raise ValueError(f"{what} must have {_VALID_CHANNELS} channels (last "
                     f"axis); got shape {x.shape}.")


def _apply(rng: jax.Array, x: jax.Array, op: _Op, *, video: bool,
           frame_op: _Op | None = None) -> jax.Array:
  """Runs `op` per sample (per clip for video: one draw for all frames).

  Video only: `frame_op` then runs on every frame with draws of its own,
  taken from the same per-clip `uniform` call after `op`'s.
  """
  _check_images(x, 5 if video else 4, "clips [B,T,H,W,C]" if video
                else "images [B,H,W,C]")
  per_frame = 0 if frame_op is None else frame_op.num_uniforms
  num_frames = x.shape[1] if video else 0
  u = _per_sample_uniforms(rng, x.shape[0],
                           op.num_uniforms + num_frames * per_frame)

  def per_clip(u, clip):
    clip = jax.vmap(op.fn, in_axes=(None, 0))(u[:op.num_uniforms], clip)
    if frame_op is None:
      return clip
    frame_u = u[op.num_uniforms:].reshape(num_frames, per_frame)
    return jax.vmap(frame_op.fn)(frame_u, clip)

  unit = (x.astype(jnp.float32) + 1.0) * 0.5
  out = jax.vmap(per_clip if video else op.fn)(u, unit)
  return jnp.clip(out * 2.0 - 1.0, -1.0, 1.0).astype(x.dtype)


def _random_apply(p: float, op: _Op) -> _Op:
  """torchvision RandomApply: `op` with probability p, else identity."""
  return _Op(op.num_uniforms + 1,
             lambda u, x: jnp.where(u[0] < p, op.fn(u[1:], x), x))


def _compose(ops: Sequence[_Op]) -> _Op:
  def fn(u, x):
    start = 0
    for op in ops:
      x = op.fn(u[start:start + op.num_uniforms], x)
      start += op.num_uniforms
    return x
  return _Op(sum(op.num_uniforms for op in ops), fn)


def _lerp(u: jax.Array, interval: tuple[float, float]) -> jax.Array:
  """Maps U[0, 1) draws to U[interval)."""
  return interval[0] + (interval[1] - interval[0]) * u


def _randint(u: jax.Array, n: jax.Array) -> jax.Array:
  """Maps a U[0, 1) draw to a uniform integer in [0, n)."""
  return jnp.minimum(jnp.floor(u * n).astype(jnp.int32), n - 1)


# ---------------------------------------------------------------------------
# RandomResizedCrop.
# ---------------------------------------------------------------------------
_CROP_UNIFORMS = 2 * _CROP_ATTEMPTS + 2


def _fallback_box_hw(height: int, width: int,
                     ratio: tuple[float, float]) -> tuple[int, int]:
  """torchvision's fallback: the largest centred crop within the ratio."""
  in_ratio = width / height
  if in_ratio < ratio[0]:
    return int(round(width / ratio[0])), width
  if in_ratio > ratio[1]:
    return height, int(round(height * ratio[1]))
  return height, width


def _crop_box(u: jax.Array, height: int, width: int,
              scale: tuple[float, float],
              ratio: tuple[float, float]) -> jax.Array:
  """int32 `[top, left, h, w]`, torchvision RandomResizedCrop.get_params.

  The 10 sequential attempts are drawn at once; the first valid one wins.
  """
  attempts = u[:2 * _CROP_ATTEMPTS].reshape(2, _CROP_ATTEMPTS)
  target_area = height * width * _lerp(attempts[0], scale)
  aspect = jnp.exp(_lerp(attempts[1], (math.log(ratio[0]),
                                       math.log(ratio[1]))))
  ws = jnp.round(jnp.sqrt(target_area * aspect)).astype(jnp.int32)
  hs = jnp.round(jnp.sqrt(target_area / aspect)).astype(jnp.int32)
  valid = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
  first = jnp.argmax(valid)
  found = valid[first]
  fallback_h, fallback_w = _fallback_box_hw(height, width, ratio)
  h = jnp.where(found, hs[first], fallback_h)
  w = jnp.where(found, ws[first], fallback_w)
  top = jnp.where(found, _randint(u[-2], height - h + 1), (height - h) // 2)
  left = jnp.where(found, _randint(u[-1], width - w + 1), (width - w) // 2)
  return jnp.stack([top, left, h, w])


def _resized_crop(image: jax.Array, box: jax.Array,
                  out_hw: tuple[int, int]) -> jax.Array:
  """Bilinear (antialiased) resize of the `box` region of `image` to out_hw."""
  top, left, h, w = box.astype(jnp.float32)
  scale = jnp.stack([out_hw[0] / h, out_hw[1] / w])
  translation = -jnp.stack([top, left]) * scale
  return jax.image.scale_and_translate(
      image, (*out_hw, image.shape[-1]), (0, 1), scale, translation,
      method="linear", antialias=True)


def _crop_op(out_hw: tuple[int, int], scale: Sequence[float],
             ratio: Sequence[float]) -> _Op:
  scale = _check_interval("scale", scale, 0.0, math.inf)
  ratio = _check_interval("ratio", ratio, 1e-9, math.inf)
  def fn(u, x):
    box = _crop_box(u, x.shape[0], x.shape[1], scale, ratio)
    return _resized_crop(x, box, out_hw)
  return _Op(_CROP_UNIFORMS, fn)


def sample_crop_boxes(rng: jax.Array, batch_size: int, height: int,
                      width: int, *, scale: Sequence[float] = (0.2, 1.0),
                      ratio: Sequence[float] = DEFAULT_RATIO) -> jax.Array:
  """The int32 `[B, 4]` boxes (top, left, h, w) `random_resized_crop` uses."""
  scale = _check_interval("scale", scale, 0.0, math.inf)
  ratio = _check_interval("ratio", ratio, 1e-9, math.inf)
  u = _per_sample_uniforms(rng, batch_size, _CROP_UNIFORMS)
  return jax.vmap(lambda v: _crop_box(v, height, width, scale, ratio))(u)


def random_resized_crop(rng: jax.Array, images: jax.Array, out_size: Size, *,
                        scale: Sequence[float] = (0.2, 1.0),
                        ratio: Sequence[float] = DEFAULT_RATIO) -> jax.Array:
  """torchvision RandomResizedCrop: `[B,H,W,C]` -> `[B,*out_size,C]`."""
  return _apply(rng, images, _crop_op(_size_hw(out_size), scale, ratio),
                video=False)


# ---------------------------------------------------------------------------
# Horizontal flip.
# ---------------------------------------------------------------------------
_FLIP = _Op(0, lambda u, x: x[:, ::-1])


def random_flip(rng: jax.Array, images: jax.Array, *,
                p: float = 0.5) -> jax.Array:
  """torchvision RandomHorizontalFlip."""
  return _apply(rng, images, _random_apply(_check_prob("p", p), _FLIP),
                video=False)


# ---------------------------------------------------------------------------
# Colour: grayscale and ColorJitter (all on [0, 1] images, like torchvision).
# ---------------------------------------------------------------------------
def _luma(x: jax.Array) -> jax.Array:
  """`[H, W]` ITU-R 601-2 luma (torchvision's weights 0.2989, 0.587, 0.114,
  as dm_pix "rec601"); a 1-channel image is its own luma."""
  if x.shape[-1] == 1:
    return x[..., 0]
  return pix.rgb_to_grayscale(x)[..., 0]


_GRAYSCALE = _Op(0, lambda u, x: jnp.broadcast_to(_luma(x)[..., None],
                                                  x.shape))


def _blend(x: jax.Array, other: jax.Array, factor: jax.Array) -> jax.Array:
  return jnp.clip(factor * x + (1.0 - factor) * other, 0.0, 1.0)


# torchvision's `fn_idx` numbering; the factor index equals the op index.
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)
_JITTER_UNIFORMS = 8


def _adjust_by_blend(x: jax.Array, index: jax.Array,
                     factor: jax.Array) -> jax.Array:
  """Brightness, contrast or saturation: a blend towards black, the mean
  luma or the per-pixel luma (torchvision's `_blend`)."""
  luma = _luma(x)
  other = jnp.where(index == _BRIGHTNESS, 0.0,
                    jnp.where(index == _CONTRAST, jnp.mean(luma),
                              luma[..., None]))
  return _blend(x, other, factor)


def _adjust_hue(x: jax.Array, delta: jax.Array) -> jax.Array:
  return jnp.clip(pix.adjust_hue(x, delta), 0.0, 1.0)


def _jitter_params(u: jax.Array, strengths: tuple[float, float, float, float]
                   ) -> tuple[jax.Array, jax.Array]:
  """Factors `[4]` and op order `[4]` from 8 draws (torchvision get_params).

  The order is the argsort of 4 uniforms: a uniform random permutation.
  """
  brightness, contrast, saturation, hue = strengths
  factor_range = lambda s: (max(0.0, 1.0 - s), 1.0 + s)
  factors = jnp.stack([_lerp(u[0], factor_range(brightness)),
                       _lerp(u[1], factor_range(contrast)),
                       _lerp(u[2], factor_range(saturation)),
                       _lerp(u[3], (-hue, hue))])
  return factors, jnp.argsort(u[4:8])


def _apply_jitter(x: jax.Array, factors: jax.Array, order: jax.Array,
                  enabled: tuple[bool, bool, bool, bool]) -> jax.Array:
  """Applies the enabled jitter ops to one image in the per-sample `order`.

  Under vmap a data-dependent order means computing every candidate op at
  every slot. The three blends are cheap, the HSV round trip of hue is not,
  so hue runs once: blends of the slots before hue, hue, then the rest.
  """
  is_enabled = jnp.asarray(enabled)
  def blends(x, take_slot):
    for slot in range(len(enabled)):
      index = order[slot]
      take = take_slot(slot) & (index != _HUE) & is_enabled[index]
      x = jnp.where(take, _adjust_by_blend(x, index, factors[index]), x)
    return x
  if not enabled[_HUE]:
    return blends(x, lambda slot: True)
  hue_slot = jnp.argmax(order == _HUE)
  x = blends(x, lambda slot: slot < hue_slot)
  x = _adjust_hue(x, factors[_HUE])
  return blends(x, lambda slot: slot > hue_slot)


def _jitter_op(jitter: Sequence[float]) -> _Op:
  if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
    raise ValueError(
        "jitter must be (brightness, contrast, saturation, hue) with all >= 0 "
        f"and hue <= 0.5; got {tuple(jitter)}.")
  strengths = tuple(float(s) for s in jitter)
  def fn(u, x):
    # torchvision skips an op whose range is the identity ((1, 1) or (0, 0));
    # saturation and hue are no-ops on one channel.
    colour = x.shape[-1] == 3
    enabled = (strengths[0] > 0, strengths[1] > 0,
               strengths[2] > 0 and colour, strengths[3] > 0 and colour)
    if not any(enabled):
      return x
    factors, order = _jitter_params(u, strengths)
    return _apply_jitter(x, factors, order, enabled)
  return _Op(_JITTER_UNIFORMS, fn)


def color_jitter(rng: jax.Array, images: jax.Array, *,
                 brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.4, hue: float = 0.1,
                 p: float = 1.0) -> jax.Array:
  """torchvision ColorJitter (random op order per sample), applied with p.

  Brightness/contrast/saturation factors ~ U[max(0, 1-s), 1+s], hue shift
  ~ U[-hue, hue] (fraction of the hue circle). A strength of 0 skips the op.
  """
  op = _jitter_op((brightness, contrast, saturation, hue))
  return _apply(rng, images, _random_apply(_check_prob("p", p), op),
                video=False)


def random_grayscale(rng: jax.Array, images: jax.Array, *,
                     p: float = 0.2) -> jax.Array:
  """torchvision RandomGrayscale: ITU-R 601-2 luma on every channel."""
  return _apply(rng, images, _random_apply(_check_prob("p", p), _GRAYSCALE),
                video=False)


# ---------------------------------------------------------------------------
# Gaussian blur.
# ---------------------------------------------------------------------------
def default_blur_kernel_size(side: int) -> int:
  """Odd kernel of ~10% of the image side (SimCLR/MoCo-v2: 23 at 224)."""
  return 2 * (int(0.1 * side) // 2) + 1


def _check_kernel_size(kernel_size: int | None, height: int,
                       width: int) -> int:
  if kernel_size is None:
    return default_blur_kernel_size(min(height, width))
  if (not isinstance(kernel_size, int) or kernel_size < 1
      or kernel_size % 2 == 0 or kernel_size // 2 >= min(height, width)):
    raise ValueError(
        f"kernel_size must be an odd positive int with kernel_size // 2 < "
        f"min(H, W) = {min(height, width)} (reflect padding), or None for "
        f"~10% of the image side; got {kernel_size!r}.")
  return kernel_size


def _blur_1d(x: jax.Array, weights: jax.Array, axis: int) -> jax.Array:
  """Correlates `x` with `weights` along `axis`, reflect-padded."""
  radius = (weights.shape[0] - 1) // 2
  pad = [(0, 0)] * x.ndim
  pad[axis] = (radius, radius)
  padded = jnp.pad(x, pad, mode="reflect")
  n = x.shape[axis]
  return sum(weights[k] * jax.lax.slice_in_dim(padded, k, k + n, axis=axis)
             for k in range(weights.shape[0]))


def _blur_op(sigma: Sequence[float], kernel_size: int) -> _Op:
  # Not pix.gaussian_blur: its zero padding darkens the borders.
  sigma = _check_interval("sigma", sigma, 1e-6, math.inf)
  radius = kernel_size // 2
  def fn(u, x):
    t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    weights = jnp.exp(-0.5 * jnp.square(t / _lerp(u[0], sigma)))
    weights = weights / jnp.sum(weights)
    return _blur_1d(_blur_1d(x, weights, 0), weights, 1)
  return _Op(1, fn)


def gaussian_blur(rng: jax.Array, images: jax.Array, *,
                  sigma: Sequence[float] = (0.1, 2.0),
                  kernel_size: int | None = None,
                  p: float = 1.0) -> jax.Array:
  """Gaussian blur with sigma ~ U[sigma] per sample, applied with p."""
  kernel_size = _check_kernel_size(kernel_size, *images.shape[-3:-1])
  op = _random_apply(_check_prob("p", p), _blur_op(sigma, kernel_size))
  return _apply(rng, images, op, video=False)


# ---------------------------------------------------------------------------
# MoCo-v2 aug+.
# ---------------------------------------------------------------------------
def _mocov2_op(out_size: Size, scale: Sequence[float], ratio: Sequence[float],
               jitter: Sequence[float], p_jitter: float, p_gray: float,
               blur_sigma: Sequence[float], blur_kernel_size: int | None,
               p_blur: float, p_flip: float, crop: bool = True) -> _Op:
  """The aug+ pipeline for one image (or one draw shared by a clip)."""
  out_hw = _size_hw(out_size)
  # The blur runs after the crop, so its kernel follows the output size.
  kernel_size = _check_kernel_size(blur_kernel_size, *out_hw)
  return _compose((
      *([_crop_op(out_hw, scale, ratio)] if crop else []),
      _random_apply(_check_prob("p_jitter", p_jitter), _jitter_op(jitter)),
      _random_apply(_check_prob("p_gray", p_gray), _GRAYSCALE),
      _random_apply(_check_prob("p_blur", p_blur),
                    _blur_op(blur_sigma, kernel_size)),
      _random_apply(_check_prob("p_flip", p_flip), _FLIP),
  ))


def mocov2_aug(rng: jax.Array, images: jax.Array, out_size: Size, *,
               scale: Sequence[float] = (0.2, 1.0),
               ratio: Sequence[float] = DEFAULT_RATIO,
               jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
               p_jitter: float = 0.8, p_gray: float = 0.2,
               blur_sigma: Sequence[float] = (0.1, 2.0),
               blur_kernel_size: int | None = None, p_blur: float = 0.5,
               p_flip: float = 0.5, crop: bool = True) -> jax.Array:
  """MoCo-v2 aug+ view of each image: `[B,H,W,C]` -> `[B,*out_size,C]`.

  Call it twice with different keys for the query and key views. Defaults
  are MoCo's; `blur_kernel_size=None` means ~10% of the output side.
  `crop=False`: the images are crops already (made on the host from the
  original photos, data/crops.py), of out_size; the rest of aug+ follows.
  """
  if not crop and tuple(images.shape[1:3]) != _size_hw(out_size):
    raise ValueError(f"crop=False takes views of out_size {out_size}; got images "
                     f"{images.shape}.")
  op = _mocov2_op(out_size, scale, ratio, jitter, p_jitter, p_gray,
                  blur_sigma, blur_kernel_size, p_blur, p_flip, crop)
  return _apply(rng, images, op, video=False)


def mocov2_aug_video(rng: jax.Array, clips: jax.Array, out_size: Size, *,
                     scale: Sequence[float] = (0.2, 1.0),
                     ratio: Sequence[float] = DEFAULT_RATIO,
                     jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
                     p_jitter: float = 0.8, p_gray: float = 0.2,
                     blur_sigma: Sequence[float] = (0.1, 2.0),
                     blur_kernel_size: int | None = None, p_blur: float = 0.5,
                     p_flip: float = 0.5) -> jax.Array:
  """`mocov2_aug` for `[B,T,H,W,C]` clips: one draw per clip, on all frames.

  Sharing the draw keeps the clip temporally coherent (same crop, flip,
  colour and blur); contrast still uses each frame's own mean luma.
  """
  op = _mocov2_op(out_size, scale, ratio, jitter, p_jitter, p_gray,
                  blur_sigma, blur_kernel_size, p_blur, p_flip)
  return _apply(rng, clips, op, video=True)


# ---------------------------------------------------------------------------
# Dense Predictive Coding (DPC).
# ---------------------------------------------------------------------------
def _fixed_crop_op(crop_hw: tuple[int, int], out_hw: tuple[int, int]) -> _Op:
  """A crop_hw box at a uniform position, resized to out_hw (RandomCrop + Scale)."""
  def fn(u, x):
    height, width = x.shape[:2]
    if crop_hw[0] > height or crop_hw[1] > width:
      raise ValueError(f"crop_size {crop_hw} is larger than the {height}x{width} frames.")
    box = jnp.stack([_randint(u[0], height - crop_hw[0] + 1),
                     _randint(u[1], width - crop_hw[1] + 1), *crop_hw])
    return _resized_crop(x, box, out_hw)
  return _Op(2, fn)


# DPC's RandomGray: one random channel copied to all channels ("channel
# splitting, not strictly grayscale", its docstring says); 1 channel: no-op.
_CHANNEL_GRAY = _Op(1, lambda u, x: jnp.broadcast_to(
    jnp.take(x, _randint(u[0], x.shape[-1]), axis=-1)[..., None], x.shape))


def dpc_aug_video(rng: jax.Array, clips: jax.Array, out_size: Size, *,
                  crop_size: Size,
                  jitter: Sequence[float] = (0.5, 0.5, 0.5, 0.25),
                  p_gray: float = 0.5, p_flip: float = 0.5) -> jax.Array:
  """DPC's UCF-101 training view of `[B,T,H,W,C]` clips -> `[B,T,*out_size,C]`.

  TengdaHan/DPC `dpc/main.py`: RandomHorizontalFlip and RandomCrop(224)
  consistent over the clip, Scale(128), then per frame RandomGray(p=0.5)
  and ColorJitter(0.5, 0.5, 0.5, 0.25) (DPC's ColorJitter defaults to
  `consistent=False`: every frame draws its own factors and order). The
  crop is `crop_size` at a uniform position; the resize is bilinear and
  antialiased where DPC's Scale is PIL nearest.
  """
  clip_op = _compose((_random_apply(_check_prob("p_flip", p_flip), _FLIP),
                      _fixed_crop_op(_size_hw(crop_size), _size_hw(out_size))))
  frame_op = _compose((_random_apply(_check_prob("p_gray", p_gray), _CHANNEL_GRAY),
                       _jitter_op(jitter)))
  return _apply(rng, clips, clip_op, video=True, frame_op=frame_op)
