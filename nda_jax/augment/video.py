"""Video negative data augmentations for clips `[B, T, H, W, C]` in [-1, 1].

Same contract, randomness convention and device-count independence
(`axis_name`) as `negative.py`: one key or B per-sample keys, partner clips
along a random derangement of the global batch. The released NDA code has no
video part: these follow the paper's description of spatial (jigsaw) and
temporal (shuffle, reverse) NDAs for Dense Predictive Coding (DPC), plus a
temporal analogue of stitching.

DPC cuts a clip into blocks of `block_len` frames (T = num_blocks * block_len,
e.g. 8 blocks x 5 frames) and predicts the features of future blocks. Its NDA
clips are made at the frame level so that no block of an NDA clip is a block
of a real clip:
  * `spatial_jigsaw`: one patch permutation for all frames of a clip;
  * `frame_jigsaw`: one patch permutation per frame;
  * `block_frame_shuffle`: frames shuffled within each block, never in order;
  * `block_reverse`: frames reversed within each block;
  * `temporal_reverse`: the clip backwards (blocks reversed, and their order).
A block whose frames are all identical (a static video) is its own shuffle and
reversal: the temporal NDAs return such a block unchanged, and nothing at the
frame order level can change it (the spatial jigsaws still do).
The block-level NDAs keep real blocks: `temporal_shuffle` with
`block=block_len` reorders whole blocks, and `clip_stitch` joins a prefix of
the clip to the suffix of its partner, so every block but the one holding the
cut is a real block.

Inside a per-device step `clip_stitch` all-gathers the clips of the global
batch to read partners (see `negative.py`): B x T x H x W x C values per
device, e.g. 480 MiB for 64 clips of 40 frames at 128 x 128 in float32.
"""
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from nda_jax.augment import negative

Array = jax.Array


def _check_clips(x: Array) -> None:
  negative.check_images(x, rank=5)


def _num_blocks(x: Array, block_len: int, what: str) -> int:
  """T // block_len, after checking that the clip splits into blocks of >= 2 frames."""
  t = x.shape[1]
  if block_len < 2 or t % block_len:
    raise ValueError(f"{what}: block_len={block_len} must divide the clip length T={t} "
                     "(T = num_blocks * block_len) and be >= 2 (one frame has no order).")
  return t // block_len


def _split_each(keys: Array, n: int) -> Array:
  """[B * n] keys: n independent keys per sample key, sample-major."""
  sub = jax.vmap(lambda key: jax.random.split(key, n))(keys)
  return sub.reshape((-1,) + sub.shape[2:])  # raw keys keep their trailing [2]


def _frames_jigsaw(x: Array, perms: Array, k: int, layout: str) -> Array:
  """Jigsaw of every frame with perms [B, T, k*k] (one permutation per frame)."""
  b, t, h, w, c = x.shape
  out = negative.jigsaw_from_perms(x.reshape(b * t, h, w, c),
                                   perms.reshape(b * t, k * k), k, layout)
  return out.reshape(x.shape)


def spatial_jigsaw(rng: Array, x: Array, k: int = 2, layout: str = "clean", *,
                   axis_name: str | None = None) -> Array:
  """One non-identity k x k patch permutation per clip, shared by all its frames.

  The clip stays temporally coherent but every frame is spatially scrambled
  the same way. Default layout "clean" (every arrangement differs from the
  input, so no frame, hence no block, is real): there is no released video
  code whose quirk to keep.
  """
  _check_clips(x)
  b, t = x.shape[:2]
  keys, _ = negative.split_rng(rng, b, axis_name)
  perms = negative.nonidentity_permutations(keys, k * k)
  return _frames_jigsaw(x, jnp.repeat(perms[:, None], t, axis=1), k, layout)


def frame_jigsaw(rng: Array, x: Array, k: int = 2, layout: str = "clean", *,
                 axis_name: str | None = None) -> Array:
  """An independent non-identity patch permutation for every frame."""
  _check_clips(x)
  b, t = x.shape[:2]
  keys, _ = negative.split_rng(rng, b, axis_name)
  perms = negative.nonidentity_permutations(_split_each(keys, t), k * k)
  return _frames_jigsaw(x, perms.reshape(b, t, k * k), k, layout)


def block_frame_shuffle(rng: Array, x: Array, block_len: int = 5, *,
                        axis_name: str | None = None) -> Array:
  """Shuffles the frames within each block of `block_len` frames, never in order.

  Each block of each clip gets its own permutation, uniform over the
  block_len! - 1 non-identity ones; frames never leave their block. A block
  with repeated frames can still come out equal to the input (a static block
  always does).
  """
  _check_clips(x)
  b, t = x.shape[:2]
  num_blocks = _num_blocks(x, block_len, "block_frame_shuffle")
  keys, _ = negative.split_rng(rng, b, axis_name)
  perms = negative.nonidentity_permutations(_split_each(keys, num_blocks), block_len)
  frames = jnp.arange(num_blocks)[:, None] * block_len + perms.reshape(b, num_blocks, block_len)
  return jnp.take_along_axis(x, frames.reshape(b, t)[:, :, None, None, None], axis=1)


def block_reverse(rng: Array, x: Array, block_len: int = 5, *,
                  axis_name: str | None = None) -> Array:
  """Reverses the frames within each block, blocks in place (`rng` unused)."""
  del rng, axis_name
  _check_clips(x)
  b = x.shape[0]
  num_blocks = _num_blocks(x, block_len, "block_reverse")
  blocks = x.reshape((b, num_blocks, block_len) + x.shape[2:])
  return blocks[:, :, ::-1].reshape(x.shape)


def temporal_shuffle(rng: Array, x: Array, block: int = 1, *,
                     axis_name: str | None = None) -> Array:
  """Shuffles the T // block blocks of `block` frames, never in the original order."""
  _check_clips(x)
  b, t = x.shape[:2]
  if block < 1 or t % block or t // block < 2:
    raise ValueError(f"temporal_shuffle: T={t} must be a multiple of block={block} "
                     "with at least 2 blocks.")
  keys, _ = negative.split_rng(rng, b, axis_name)
  perms = negative.nonidentity_permutations(keys, t // block)  # [B, T//block]
  frames = (perms[:, :, None] * block + jnp.arange(block)).reshape(b, t)
  return jnp.take_along_axis(x, frames[:, :, None, None, None], axis=1)


def temporal_reverse(rng: Array, x: Array, *, axis_name: str | None = None) -> Array:
  """Plays every clip backwards (`rng` unused: deterministic)."""
  del rng, axis_name
  _check_clips(x)
  return x[:, ::-1]


def clip_stitch(rng: Array, x: Array, *, axis_name: str | None = None) -> Array:
  """Frames [0, s) from the clip, [s, T) from its partner; s uniform in [1, T-1] per clip."""
  _check_clips(x)
  b, t = x.shape[:2]
  if t < 2:
    raise ValueError(f"clip_stitch needs at least 2 frames, got T={t}.")
  keys, batch_key = negative.split_rng(rng, b, axis_name)
  split = jax.vmap(lambda key: jax.random.randint(key, (), 1, t))(keys)
  own = (jnp.arange(t)[None, :] < split[:, None])[:, :, None, None, None]
  return jnp.where(own, x, negative.partners(x, batch_key, axis_name))


VIDEO_NDAS: dict[str, Callable[..., Array]] = {
    "spatial_jigsaw": spatial_jigsaw,
    "frame_jigsaw": frame_jigsaw,
    "block_frame_shuffle": block_frame_shuffle,
    "block_reverse": block_reverse,
    "temporal_shuffle": temporal_shuffle,
    "temporal_reverse": temporal_reverse,
    "clip_stitch": clip_stitch,
}


def build_video_nda(cfg: Any, axis_name: str | None = None) -> Callable[[Array, Array], Array]:
  """Video NDA `fn(rng, clips)` from a config; same format as `negative.build_nda`.

  Example (DPC, 8 blocks of 5 frames): {'name': 'spatial_jigsaw+block_frame_shuffle',
  'params': {'block_frame_shuffle': {'block_len': 5}}}.
  """
  return negative.build_from_registry(cfg, VIDEO_NDAS, rank=5, axis_name=axis_name)
