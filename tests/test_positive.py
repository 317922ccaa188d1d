"""Tests for nda_jax.augment.positive (MoCo-v2 aug+ positive views)."""
import colorsys
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from nda_jax.augment import positive

B, H, W = 6, 16, 16
LUMA = np.array([0.2989, 0.587, 0.114])  # ITU-R 601-2, as torchvision


def _images(seed=0, shape=(B, H, W, 3), low=-1.0, high=1.0):
  return jax.random.uniform(jax.random.key(seed), shape, minval=low,
                            maxval=high)


def _unit(x):
  return (np.asarray(x, np.float64) + 1.0) / 2.0


_aug = jax.jit(functools.partial(positive.mocov2_aug, out_size=12))


# --- contract -----------------------------------------------------------------
@pytest.mark.parametrize("dtype,channels,out_size", [
    (jnp.float32, 3, 12), (jnp.bfloat16, 1, (10, 14))])
def test_mocov2_shape_dtype_range(dtype, channels, out_size):
  x = _images(shape=(B, H, W, channels)).astype(dtype)
  y = jax.jit(positive.mocov2_aug, static_argnums=2)(jax.random.key(1), x,
                                                       out_size)
  out_hw = (out_size,) * 2 if isinstance(out_size, int) else out_size
  assert y.shape == (B, *out_hw, channels) and y.dtype == dtype
  y = np.asarray(y, np.float32)
  assert np.isfinite(y).all() and y.min() >= -1.0 and y.max() <= 1.0
  assert np.ptp(y) > 0.5  # not collapsed to a constant


def test_jit_equals_eager():
  x = _images()
  eager = positive.mocov2_aug(jax.random.key(2), x, 12)
  np.testing.assert_allclose(_aug(jax.random.key(2), x), eager, atol=1e-5)


def test_determinism_per_key_and_per_sample_randomness():
  x = jnp.broadcast_to(_images()[:1], (B, H, W, 3))  # B copies of one image
  a = np.asarray(_aug(jax.random.key(3), x))
  np.testing.assert_array_equal(a, _aug(jax.random.key(3), x))
  assert not np.allclose(a, _aug(jax.random.key(4), x))
  # Identical inputs, one key: every sample gets its own draw.
  assert all(not np.allclose(a[0], a[i]) for i in range(1, B))


def test_rng_forms():
  # One key == its split into B keys, for typed and raw keys (cheap op: each
  # key form is a new trace).
  flip = jax.jit(positive.random_flip)
  x = _images()
  for key in (jax.random.key(5), jax.random.PRNGKey(5)):
    one = np.asarray(flip(key, x))
    np.testing.assert_array_equal(one, flip(jax.random.split(key, B), x))
    flipped = (one != np.asarray(x)).any(axis=(1, 2, 3))
    assert flipped.any() and not flipped.all()  # per-sample coin
  with pytest.raises(ValueError, match="one PRNG key or 6 keys"):
    positive.random_flip(jax.random.split(jax.random.key(5), B + 1), x)


def test_vmap_over_extra_axis():
  x = jnp.stack([_images(0), _images(1)])
  keys = jax.random.split(jax.random.key(6), 2)
  y = jax.vmap(_aug)(keys, x)
  for i in range(2):
    np.testing.assert_allclose(y[i], _aug(keys[i], x[i]), atol=1e-5)


def test_bad_inputs():
  x = _images()
  with pytest.raises(ValueError, match="channels"):
    positive.random_flip(jax.random.key(0), x[..., :2])
  with pytest.raises(ValueError, match="kernel_size must be an odd"):
    positive.gaussian_blur(jax.random.key(0), x, kernel_size=4)
  with pytest.raises(ValueError, match="scale must be a pair"):
    positive.random_resized_crop(jax.random.key(0), x, 8, scale=(1.0, 0.2))
  with pytest.raises(ValueError, match="p_gray must be a probability"):
    positive.mocov2_aug(jax.random.key(0), x, 8, p_gray=1.5)
  with pytest.raises(ValueError, match="out_size"):
    positive.mocov2_aug(jax.random.key(0), x, (8,))
  with pytest.raises(ValueError, match="must be float"):
    positive.random_flip(jax.random.key(0), jnp.zeros((B, H, W, 3), jnp.int32))


# --- random resized crop ---------------------------------------------------------
# 40x72 is wider than ratio 4/3 allows: at most a 40x53 crop (74% of it).
@pytest.mark.parametrize("height,width,max_frac", [(64, 64, 1.0),
                                                   (40, 72, 40 * 53 / 2880)])
def test_crop_boxes_respect_scale_ratio_and_bounds(height, width, max_frac):
  scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
  boxes = np.asarray(positive.sample_crop_boxes(
      jax.random.key(7), 4000, height, width, scale=scale, ratio=ratio))
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  assert (h > 0).all() and (w > 0).all()
  # Sides are rounded, so allow +-0.5 px on each.
  area = height * width
  assert ((w - 0.5) * (h - 0.5) <= scale[1] * area).all()
  assert ((w + 0.5) * (h + 0.5) >= scale[0] * area).all()
  assert ((w + 0.5) / (h - 0.5) >= ratio[0]).all()
  assert ((w - 0.5) / (h + 0.5) <= ratio[1]).all()
  # The draws cover the range: small and near-full crops, all positions.
  frac = h * w / area
  assert frac.min() < 0.25 and frac.max() > 0.9 * max_frac
  assert (top + h == height).any() and (top == 0).any() and (left > 0).any()


def test_crop_fallback_is_center_crop():
  # Ratio (2, 3) can never fit a square at scale 1: torchvision's fallback is
  # the full-width centred crop of height round(W / 2).
  boxes = np.asarray(positive.sample_crop_boxes(
      jax.random.key(8), 16, 20, 20, scale=(1.0, 1.0), ratio=(2.0, 3.0)))
  np.testing.assert_array_equal(boxes, np.tile([5, 0, 10, 20], (16, 1)))


def test_crop_full_box_is_identity():
  x = _images()
  y = positive.random_resized_crop(jax.random.key(9), x, H, scale=(1.0, 1.0),
                                   ratio=(1.0, 1.0))
  np.testing.assert_allclose(y, x, atol=1e-5)


def test_crop_at_native_size_equals_numpy_slice():
  x = _images(shape=(B, 16, 16, 3))
  kw = dict(scale=(0.25, 0.25), ratio=(1.0, 1.0))  # 8x8 crops
  key = jax.random.key(10)
  y = np.asarray(positive.random_resized_crop(key, x, 8, **kw))
  boxes = np.asarray(positive.sample_crop_boxes(key, B, 16, 16, **kw))
  assert (boxes[:, 2:] == 8).all() and len(np.unique(boxes, axis=0)) > 1
  for i, (top, left, h, w) in enumerate(boxes):
    np.testing.assert_allclose(y[i], x[i, top:top + h, left:left + w],
                               atol=1e-5)


# --- flip, grayscale -------------------------------------------------------------
def test_flip_forced_and_never():
  x = _images()
  np.testing.assert_array_equal(
      positive.random_flip(jax.random.key(0), x, p=1.0),
      np.clip(np.asarray(x)[:, :, ::-1], -1, 1))
  np.testing.assert_allclose(positive.random_flip(jax.random.key(0), x, p=0.0),
                             x, atol=1e-6)


def test_grayscale_matches_luma_formula():
  x = _images()
  y = np.asarray(positive.random_grayscale(jax.random.key(0), x, p=1.0))
  np.testing.assert_array_equal(y[..., 0], y[..., 1])
  np.testing.assert_array_equal(y[..., 0], y[..., 2])
  expected = 2.0 * (_unit(x) @ LUMA) - 1.0
  np.testing.assert_allclose(y[..., 0], expected, atol=1e-5)
  # One channel: already gray.
  g = _images(shape=(B, H, W, 1))
  np.testing.assert_allclose(
      positive.random_grayscale(jax.random.key(0), g, p=1.0), g, atol=1e-6)


# --- colour jitter ---------------------------------------------------------------
def test_jitter_zero_strength_is_identity():
  x = _images()
  y = positive.color_jitter(jax.random.key(0), x, brightness=0, contrast=0,
                            saturation=0, hue=0)
  np.testing.assert_allclose(y, x, atol=1e-6)
  # Tiny but non-zero strengths run every op (incl. the HSV round trip).
  y = positive.color_jitter(jax.random.key(0), x, brightness=1e-6,
                            contrast=1e-6, saturation=1e-6, hue=1e-6)
  np.testing.assert_allclose(y, x, atol=1e-4)


def test_brightness_matches_numpy():
  x = _images(shape=(64, 8, 8, 3))
  y = _unit(positive.color_jitter(jax.random.key(1), x, brightness=0.4,
                                  contrast=0, saturation=0, hue=0))
  u = _unit(x)
  factors = []
  for yi, ui in zip(y, u):
    inner = (yi < 0.99) & (ui > 0.05)
    f = np.median(yi[inner] / ui[inner])
    np.testing.assert_allclose(yi, np.clip(ui * f, 0, 1), atol=1e-5)
    factors.append(f)
  factors = np.array(factors)
  assert factors.min() >= 0.6 - 1e-5 and factors.max() <= 1.4 + 1e-5
  assert factors.min() < 0.7 and factors.max() > 1.3  # spans U[0.6, 1.4]


def test_single_jitter_ops_keep_their_invariants():
  # Mid-range images, so no factor in [0.6, 1.4] clips.
  x = _images(low=-0.2, high=0.2)
  u = _unit(x)
  key = jax.random.key(2)
  only = dict(brightness=0, contrast=0, saturation=0, hue=0)
  contrast = _unit(positive.color_jitter(key, x, **{**only, "contrast": 0.4}))
  np.testing.assert_allclose((contrast @ LUMA).mean((1, 2)),
                             (u @ LUMA).mean((1, 2)), atol=1e-4)
  assert not np.allclose(contrast, u, atol=1e-3)
  sat = _unit(positive.color_jitter(key, x, **{**only, "saturation": 0.4}))
  np.testing.assert_allclose(sat @ LUMA, u @ LUMA, atol=1e-4)
  assert not np.allclose(sat, u, atol=1e-3)
  hue = _unit(positive.color_jitter(key, x, **{**only, "hue": 0.1}))
  np.testing.assert_allclose(hue.max(-1), u.max(-1), atol=1e-5)  # HSV value
  np.testing.assert_allclose(hue.min(-1), u.min(-1), atol=1e-5)  # and sat.
  assert not np.allclose(hue, u, atol=1e-3)


def _numpy_jitter(u, factors, order):
  """Independent reference of torchvision's ColorJitter on one [0,1] image."""
  def hue(x, d):
    flat = [colorsys.rgb_to_hsv(*p) for p in x.reshape(-1, 3)]
    out = [colorsys.hsv_to_rgb((h + d) % 1.0, s, v) for h, s, v in flat]
    return np.array(out).reshape(x.shape)
  blend = lambda x, o, f: np.clip(f * x + (1 - f) * o, 0, 1)
  ops = [lambda x, f: blend(x, 0.0, f),
         lambda x, f: blend(x, (x @ LUMA).mean(), f),
         lambda x, f: blend(x, (x @ LUMA)[..., None], f),
         hue]
  for i in order:
    u = ops[i](u, factors[i])
  return u


def test_jitter_ops_in_order_match_numpy_reference():
  u = np.asarray(jax.random.uniform(jax.random.key(3), (6, 6, 3)))
  factors = np.array([1.3, 0.7, 1.4, 0.08], np.float32)
  outs = []
  for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
    y = positive._apply_jitter(jnp.asarray(u), jnp.asarray(factors),
                               jnp.asarray(order), (True,) * 4)
    np.testing.assert_allclose(y, _numpy_jitter(u.astype(np.float64), factors,
                                                order), atol=1e-5)
    outs.append(np.asarray(y))
  assert not np.allclose(outs[0], outs[1], atol=1e-3)  # the order matters


def test_jitter_params_ranges_and_random_order():
  u = jax.random.uniform(jax.random.key(4), (500, 8))
  factors, orders = jax.vmap(
      lambda v: positive._jitter_params(v, (0.4, 0.3, 0.2, 0.1)))(u)
  factors, orders = np.asarray(factors), np.asarray(orders)
  for j, (lo, hi) in enumerate([(0.6, 1.4), (0.7, 1.3), (0.8, 1.2),
                                (-0.1, 0.1)]):
    assert factors[:, j].min() >= lo and factors[:, j].max() <= hi
    assert factors[:, j].min() < lo + 0.05 and factors[:, j].max() > hi - 0.05
  np.testing.assert_array_equal(np.sort(orders, 1), np.tile(range(4), (500, 1)))
  assert len(np.unique(orders, axis=0)) == 24  # all orders occur


# --- gaussian blur ---------------------------------------------------------------
def test_blur_tiny_sigma_is_identity_and_constant_is_kept():
  x = _images()
  y = positive.gaussian_blur(jax.random.key(0), x, sigma=(0.1, 0.1),
                             kernel_size=5)
  np.testing.assert_allclose(y, x, atol=1e-6)
  const = jnp.full((B, H, W, 3), 0.3)
  y = positive.gaussian_blur(jax.random.key(0), const, sigma=(2.0, 2.0),
                             kernel_size=7)
  np.testing.assert_allclose(y, const, atol=1e-6)


def test_blur_matches_scipy():
  x = _images()
  y = _unit(positive.gaussian_blur(jax.random.key(0), x, sigma=(1.5, 1.5),
                                   kernel_size=7))
  # numpy "reflect" (edge not repeated) is scipy's "mirror".
  ref = ndimage.gaussian_filter(_unit(x), sigma=(0, 1.5, 1.5, 0),
                                mode="mirror", truncate=3 / 1.5)
  np.testing.assert_allclose(y, ref, atol=1e-5)
  assert positive.default_blur_kernel_size(224) == 23


# --- video -----------------------------------------------------------------------
def test_video_one_draw_per_clip():
  frame = _images(shape=(H, W, 3))
  clips = jnp.broadcast_to(frame, (4, 5, H, W, 3))  # 4 copies of a still clip
  aug = jax.jit(functools.partial(positive.mocov2_aug_video, out_size=8,
                                  p_flip=0.5, p_jitter=1.0))
  y = np.asarray(aug(jax.random.key(0), clips))
  assert y.shape == (4, 5, 8, 8, 3) and y.dtype == np.float32
  for t in range(1, 5):
    np.testing.assert_allclose(y[:, t], y[:, 0], atol=1e-6)
  # Identical clips still get their own draws.
  assert all(not np.allclose(y[0], y[i]) for i in range(1, 4))


# --- DPC clip augmentation -------------------------------------------------------
def _dpc(clips, seed=0, **kw):
  kw = {"out_size": 8, "crop_size": 8, "jitter": (0, 0, 0, 0), "p_gray": 0.0, **kw}
  return np.asarray(jax.jit(functools.partial(positive.dpc_aug_video, **kw))(
      jax.random.key(seed), clips))


def _find_crop(frame_out, frame_in, size):
  """(top, left, flipped) of the size x size crop of frame_in that frame_out is."""
  hits = []
  for top in range(frame_in.shape[0] - size + 1):
    for left in range(frame_in.shape[1] - size + 1):
      crop = frame_in[top:top + size, left:left + size]
      for flipped, c in ((False, crop), (True, crop[:, ::-1])):
        if np.allclose(frame_out, c, atol=1e-5):
          hits.append((top, left, flipped))
  return hits


def test_dpc_crop_and_flip_are_one_draw_per_clip():
  clips = _images(shape=(8, 3, 10, 10, 3))      # every frame different
  y = _dpc(clips, p_flip=0.5)
  assert y.shape == (8, 3, 8, 8, 3)
  draws = []
  for i in range(8):
    (hit,) = _find_crop(y[i, 0], np.asarray(clips[i, 0]), 8)
    for t in (1, 2):                             # the same box and flip on every frame
      top, left, flipped = hit
      crop = np.asarray(clips[i, t, top:top + 8, left:left + 8])
      np.testing.assert_allclose(y[i, t], crop[:, ::-1] if flipped else crop, atol=1e-5)
    draws.append(hit)
  assert len({d[:2] for d in draws}) > 1 and len({d[2] for d in draws}) == 2


def test_dpc_crop_is_resized_to_out_size():
  clips = _images(shape=(2, 2, 12, 12, 3))
  y = _dpc(clips, out_size=6, crop_size=12, p_flip=0.0)   # the whole frame, halved
  assert y.shape == (2, 2, 6, 6, 3)
  # Antialiased bilinear halving: a triangle filter widened to the input pixel pitch of 2.
  dist = np.abs(np.arange(12)[None] + 0.5 - 2 * (np.arange(6)[:, None] + 0.5)) / 2
  weights = np.maximum(1 - dist, 0)
  weights /= weights.sum(1, keepdims=True)
  halved = np.einsum("yh,xw,bthwc->btyxc", weights, weights, np.asarray(clips))
  np.testing.assert_allclose(y, halved, atol=1e-5)
  with pytest.raises(ValueError, match="crop_size"):
    _dpc(clips, crop_size=13)


def test_dpc_gray_copies_one_channel_per_frame():
  clips = _images(shape=(4, 16, 8, 8, 3))
  y = _dpc(clips, p_gray=1.0, p_flip=0.0)
  x = np.asarray(clips)
  channels = []
  for i in range(4):
    for t in range(16):
      (c,) = [c for c in range(3)
              if np.allclose(y[i, t], x[i, t, :, :, c:c + 1], atol=1e-6)]
      channels.append(c)
  assert set(channels) == {0, 1, 2}              # drawn per frame
  gray = _dpc(clips, p_gray=0.5, p_flip=0.0)
  is_gray = np.all(gray == gray[..., :1], axis=(2, 3, 4))   # [B, T]
  assert 0.25 < is_gray.mean() < 0.75
  assert is_gray.any(axis=1).all() and (~is_gray).any(axis=1).all()   # mixed within clips


def test_dpc_jitter_is_drawn_per_frame():
  frame = _images(shape=(8, 8, 3), low=-0.5, high=0.0)      # no brightness factor clips
  clips = jnp.broadcast_to(frame, (2, 6, 8, 8, 3))          # still clips
  y = _unit(_dpc(clips, jitter=(0.5, 0, 0, 0), p_flip=0.0))
  u = _unit(frame)
  factors = (y / u).reshape(2, 6, -1)
  np.testing.assert_allclose(factors, factors[..., :1] * np.ones_like(factors), rtol=1e-4)
  factors = factors[..., 0]
  assert factors.min() >= 0.5 - 1e-5 and factors.max() <= 1.5 + 1e-5
  assert len(np.unique(np.round(factors, 4))) == 12         # every frame its own factor
