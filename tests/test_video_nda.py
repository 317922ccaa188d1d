"""Tests of the video NDAs: contract, and the structure each one promises."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nda_jax.augment import negative
from nda_jax.augment import video

B, T, H, W, C = 6, 10, 8, 8, 2  # T: 2 blocks of the default block_len 5
DETERMINISTIC = ("temporal_reverse", "block_reverse")
# NDAs that change every block of a clip with distinct frames (DPC negatives).
FRAME_LEVEL = ("spatial_jigsaw", "frame_jigsaw", "block_frame_shuffle", "block_reverse",
               "temporal_reverse")


def _clips(b=B, t=T, h=H, w=W, c=C, seed=0):
  return np.random.RandomState(seed).uniform(-1, 1, (b, t, h, w, c)).astype(np.float32)


def _patch_ids(k, b=B, t=T, h=H, w=W):
  """Clips whose pixels hold the index of their row-major k x k patch (+ frame offset)."""
  cell = (np.arange(h)[:, None] // (h // k)) * k + np.arange(w)[None, :] // (w // k)
  ids = np.broadcast_to(cell[None, None, :, :, None], (b, t, h, w, 1)).astype(np.float32)
  return ids + 100 * np.arange(t)[None, :, None, None, None]


def _perm_of(frame, k):
  """Source patch index shown at each grid cell (row-major) of a patch-id frame."""
  h, w = frame.shape[:2]
  return tuple(int(frame[r * h // k, c * w // k, 0]) % 100
               for r, c in itertools.product(range(k), range(k)))


@pytest.mark.parametrize("name", sorted(video.VIDEO_NDAS))
def test_contract_shape_dtype_jit_determinism(name):
  fn = video.VIDEO_NDAS[name]
  x = jnp.asarray(_clips())
  key = jax.random.key(1)
  eager = np.asarray(fn(key, x))
  jitted = jax.jit(fn)(key, x)
  assert jitted.shape == x.shape and jitted.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(jitted), eager)
  assert np.any(eager != np.asarray(x))
  np.testing.assert_array_equal(np.asarray(fn(key, x)), eager)
  if name not in DETERMINISTIC:
    assert not np.array_equal(np.asarray(fn(jax.random.key(2), x)), eager)
  keys, _ = negative.split_rng(key, B)
  np.testing.assert_array_equal(np.asarray(fn(keys, x)), eager)
  half = fn(key, x.astype(jnp.bfloat16))
  assert half.dtype == jnp.bfloat16 and half.shape == x.shape
  np.testing.assert_array_equal(np.asarray(half, np.float32),
                                np.asarray(jnp.asarray(eager).astype(jnp.bfloat16), np.float32))


@pytest.mark.parametrize("name", ("spatial_jigsaw", "frame_jigsaw", "temporal_shuffle",
                                  "temporal_reverse", "block_frame_shuffle", "block_reverse"))
def test_per_sample_key_result_does_not_depend_on_rest_of_batch(name):
  fn = video.VIDEO_NDAS[name]
  x = jnp.asarray(_clips())
  keys = jax.random.split(jax.random.key(3), B)
  np.testing.assert_array_equal(np.asarray(fn(keys, x))[1:3], np.asarray(fn(keys[1:3], x[1:3])))


def test_spatial_jigsaw_shares_one_permutation_across_frames():
  k, n = 2, 64
  x = _patch_ids(k, b=n)
  out = np.asarray(video.spatial_jigsaw(jax.random.key(0), jnp.asarray(x), k=k))
  perms = set()
  for clip_in, clip_out in zip(x, out):
    per_frame = {_perm_of(f, k) for f in clip_out}
    assert len(per_frame) == 1
    perm = per_frame.pop()
    assert sorted(perm) == list(range(k * k)) and perm != tuple(range(k * k))
    # Frame t shows patches of frame t only.
    np.testing.assert_array_equal(clip_out // 100, clip_in // 100)
    perms.add(perm)
  assert len(perms) > 10  # different clips, different permutations (23 possible)


def test_spatial_jigsaw_official_layout_is_the_image_jigsaw_per_frame():
  x = _clips()
  key = jax.random.key(4)
  out = np.asarray(video.spatial_jigsaw(key, jnp.asarray(x), layout="official"))
  keys, _ = negative.split_rng(key, B)
  for t in range(T):
    frame = np.asarray(negative.jigsaw(keys, jnp.asarray(x[:, t]), layout="official"))
    np.testing.assert_array_equal(out[:, t], frame)


def test_frame_jigsaw_draws_a_permutation_per_frame():
  k = 2
  x = _patch_ids(k, t=8)
  out = np.asarray(video.frame_jigsaw(jax.random.key(0), jnp.asarray(x), k=k))
  distinct = []
  for clip_in, clip_out in zip(x, out):
    np.testing.assert_array_equal(clip_out // 100, clip_in // 100)
    frame_perms = [_perm_of(f, k) for f in clip_out]
    assert tuple(range(k * k)) not in frame_perms  # clean layout: every frame scrambled
    distinct.append(len(set(frame_perms)))
  assert max(distinct) > 1


@pytest.mark.parametrize("block,t", [(1, 4), (2, 6)])
def test_temporal_shuffle_never_returns_original_order(block, t):
  n = 256
  frame_id = np.broadcast_to(np.arange(t, dtype=np.float32)[None, :, None, None, None],
                             (n, t, 2, 2, 1))
  out = np.asarray(video.temporal_shuffle(jax.random.key(0), jnp.asarray(frame_id),
                                          block=block))
  order = out[:, :, 0, 0, 0].astype(int)
  assert np.all(np.sort(order, axis=1) == np.arange(t))
  assert not np.any(np.all(order == np.arange(t), axis=1))
  blocks = order.reshape(n, t // block, block)
  assert np.all(blocks % block == np.arange(block))  # blocks stay contiguous, in order
  assert len({tuple(o) for o in order}) == min(n, np.prod(np.arange(1, t // block + 1)) - 1)


def test_temporal_shuffle_rejects_bad_block():
  with pytest.raises(ValueError, match="multiple of block"):
    video.temporal_shuffle(jax.random.key(0), jnp.zeros((2, 4, 2, 2, 1)), block=3)


def test_temporal_reverse_reverses_frames():
  x = _clips()
  np.testing.assert_array_equal(np.asarray(video.temporal_reverse(None, jnp.asarray(x))),
                                x[:, ::-1])


def _frame_ids(n, t):
  """Clips whose frame t holds the value t in every pixel."""
  return np.broadcast_to(np.arange(t, dtype=np.float32)[None, :, None, None, None],
                         (n, t, 2, 2, 1))


@pytest.mark.parametrize("block_len,t", [(3, 6), (5, 40)])
def test_block_frame_shuffle_permutes_frames_within_each_block(block_len, t):
  n, num_blocks = 128, t // block_len
  key = jax.random.key(0)
  src = np.asarray(video.block_frame_shuffle(key, jnp.asarray(_frame_ids(n, t)),
                                             block_len=block_len))[:, :, 0, 0, 0].astype(int)
  blocks = src.reshape(n, num_blocks, block_len)
  own = np.arange(t).reshape(num_blocks, block_len)
  # The frames of each block, in another order: never the identity, never from another block.
  assert np.all(np.sort(blocks, axis=-1) == own)
  assert not np.any(np.all(blocks == own, axis=-1))
  # Whole frames move: the same key moves the frames of any clip the same way.
  x = _clips(b=n, t=t, h=2, w=2, c=1)
  out = np.asarray(video.block_frame_shuffle(key, jnp.asarray(x), block_len=block_len))
  np.testing.assert_array_equal(out, x[np.arange(n)[:, None], src])
  if block_len == 3:  # 5 non-identity permutations, independent per block and clip
    perms = [tuple(p) for p in (blocks - own[None, :, :1]).reshape(-1, block_len)]
    counts = {p: perms.count(p) for p in set(perms)}
    assert len(counts) == 5 and min(counts.values()) > 25  # mean 51
    same = np.mean(np.all(blocks[:, 0] == blocks[:, 1] - block_len, axis=-1))
    assert 0.08 < same < 0.35  # 1/5 for independent blocks


@pytest.mark.parametrize("block_len", (2, 5))
def test_block_reverse_reverses_frames_within_each_block(block_len):
  x = _clips()
  out = np.asarray(video.block_reverse(None, jnp.asarray(x), block_len=block_len))
  t = np.arange(T)
  src = (t // block_len) * block_len + block_len - 1 - t % block_len
  np.testing.assert_array_equal(out, x[:, src])


@pytest.mark.parametrize("name", FRAME_LEVEL)
def test_frame_level_ndas_leave_no_real_block(name):
  # DPC clips of 8 blocks x 5 frames with distinct frames: no block of an NDA clip
  # equals any block of any real clip.
  b, blocks, block_len = 4, 8, 5
  x = _clips(b=b, t=blocks * block_len, h=2, w=2, c=1)
  out = np.asarray(video.VIDEO_NDAS[name](jax.random.key(1), jnp.asarray(x)))
  real = {blk.tobytes() for blk in x.reshape(b * blocks, block_len, -1)}
  assert not real & {blk.tobytes() for blk in out.reshape(b * blocks, block_len, -1)}


def test_static_blocks_are_unchanged_by_the_temporal_ndas():
  # The documented limit: a block of identical frames is its own shuffle and reversal.
  x = np.repeat(_clips(b=2, t=1), T, axis=1)
  for fn in (video.block_frame_shuffle, video.block_reverse):
    np.testing.assert_array_equal(np.asarray(fn(jax.random.key(0), jnp.asarray(x))), x)


@pytest.mark.parametrize("name", ("block_frame_shuffle", "block_reverse"))
def test_block_ndas_reject_block_len_not_dividing_t(name):
  fn = video.VIDEO_NDAS[name]
  with pytest.raises(ValueError, match="block_len=3 must divide the clip length T=10"):
    fn(jax.random.key(0), jnp.zeros((2, 10, 2, 2, 1)), block_len=3)
  with pytest.raises(ValueError, match=">= 2"):
    fn(jax.random.key(0), jnp.zeros((2, 10, 2, 2, 1)), block_len=1)


def test_clip_stitch_is_prefix_of_clip_and_suffix_of_partner():
  n, t = 64, 4
  x = _clips(b=n, t=t, h=2, w=2, c=1)
  out = np.asarray(video.clip_stitch(jax.random.key(0), jnp.asarray(x)))
  splits, partners = [], []
  for i, o in enumerate(out):
    own = [np.array_equal(o[s], x[i, s]) for s in range(t)]
    s = own.index(False)
    assert all(own[:s]) and not any(own[s:]) and 1 <= s <= t - 1
    matches = [j for j in range(n) if np.array_equal(o[s:], x[j, s:])]
    assert len(matches) == 1 and matches[0] != i
    splits.append(s)
    partners.append(matches[0])
  assert set(splits) == {1, 2, 3}
  assert sorted(partners) == list(range(n))


def test_build_video_nda_errors_and_mixture():
  with pytest.raises(ValueError, match="choose one of .*'clip_stitch'.*'temporal_shuffle'"):
    video.build_video_nda({"name": "jigsaw"})
  with pytest.raises(ValueError, match=r"'k'.*valid: \['block'\]"):
    video.build_video_nda({"name": "temporal_shuffle", "params": {"temporal_shuffle": {"k": 2}}})
  with pytest.raises(ValueError, match=r"'block'.*valid: \['block_len'\]"):
    video.build_video_nda({"name": "block_reverse", "params": {"block_reverse": {"block": 2}}})
  n = 1000
  x = _clips(b=n, t=3, h=1, w=1, c=1)
  fn = video.build_video_nda({"name": "temporal_reverse+clip_stitch", "probs": [0.6, 0.4]})
  out = np.asarray(jax.jit(fn)(jax.random.key(0), jnp.asarray(x)))
  reversed_ = np.all(out == x[:, ::-1], axis=(1, 2, 3, 4))
  assert abs(reversed_.mean() - 0.6) < 0.05


def test_build_video_nda_mixes_frame_level_ndas_with_their_params():
  n, t = 200, 4
  x = _clips(b=n, t=t, h=2, w=2, c=1)
  fn = video.build_video_nda({"name": "block_reverse+spatial_jigsaw",
                              "params": {"block_reverse": {"block_len": 2}}})
  out = np.asarray(jax.jit(fn)(jax.random.key(0), jnp.asarray(x)))
  reversed_ = np.all(out == x[:, [1, 0, 3, 2]], axis=(1, 2, 3, 4))
  # Spatial jigsaw: frames in place, the pixels of each frame permuted.
  jigsawed = np.all(np.sort(out.reshape(n, t, -1), -1) == np.sort(x.reshape(n, t, -1), -1),
                    axis=(1, 2)) & np.any(out != x, axis=(1, 2, 3, 4))
  assert np.all(reversed_ ^ jigsawed)
  assert 0.35 < reversed_.mean() < 0.65
