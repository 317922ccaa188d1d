"""Video negative data augmentations for clips `[B, T, H, W, C]` in [-1, 1].

Same contract and randomness convention as `negative.py` (one key or B
per-sample keys, partner clips along a random derangement). The released NDA
code has no video part (PAPER.md §4.2): these follow the paper's description
of spatial (jigsaw) and temporal (shuffle, reverse) NDAs for DPC, plus a
temporal analogue of stitching.
"""
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from nda_jax.augment import negative

Array = jax.Array


def _check_clips(x: Array) -> None:
  negative.check_images(x, rank=5)


def _frames_jigsaw(x: Array, perms: Array, k: int, layout: str) -> Array:
  """Jigsaw of every frame with perms [B, T, k*k] (one permutation per frame)."""
  b, t, h, w, c = x.shape
  out = negative.jigsaw_from_perms(x.reshape(b * t, h, w, c),
                                   perms.reshape(b * t, k * k), k, layout)
  return out.reshape(x.shape)


def spatial_jigsaw(rng: Array, x: Array, k: int = 2, layout: str = "clean") -> Array:
  """One non-identity k x k patch permutation per clip, shared by all its frames.

  The clip stays temporally coherent but every frame is spatially scrambled
  the same way. Default layout "clean" (every arrangement differs from the
  input): there is no released video code whose quirk to keep.
  """
  _check_clips(x)
  b, t = x.shape[:2]
  keys, _ = negative.split_rng(rng, b)
  perms = negative.nonidentity_permutations(keys, k * k)
  return _frames_jigsaw(x, jnp.repeat(perms[:, None], t, axis=1), k, layout)


def frame_jigsaw(rng: Array, x: Array, k: int = 2, layout: str = "clean") -> Array:
  """An independent non-identity patch permutation for every frame."""
  _check_clips(x)
  b, t = x.shape[:2]
  keys, _ = negative.split_rng(rng, b)
  frame_keys = jax.vmap(lambda key: jax.random.split(key, t))(keys)
  frame_keys = frame_keys.reshape((b * t,) + frame_keys.shape[2:])  # raw keys keep [.., 2]
  perms = negative.nonidentity_permutations(frame_keys, k * k)
  return _frames_jigsaw(x, perms.reshape(b, t, k * k), k, layout)


def temporal_shuffle(rng: Array, x: Array, block: int = 1) -> Array:
  """Shuffles the T // block blocks of `block` frames, never in the original order."""
  _check_clips(x)
  b, t = x.shape[:2]
  if block < 1 or t % block or t // block < 2:
    raise ValueError(f"temporal_shuffle: T={t} must be a multiple of block={block} "
                     "with at least 2 blocks.")
  keys, _ = negative.split_rng(rng, b)
  perms = negative.nonidentity_permutations(keys, t // block)  # [B, T//block]
  frames = (perms[:, :, None] * block + jnp.arange(block)).reshape(b, t)
  return jnp.take_along_axis(x, frames[:, :, None, None, None], axis=1)


def temporal_reverse(rng: Array, x: Array) -> Array:
  """Plays every clip backwards (`rng` unused: deterministic)."""
  del rng
  _check_clips(x)
  return x[:, ::-1]


def clip_stitch(rng: Array, x: Array) -> Array:
  """Frames [0, s) from the clip, [s, T) from its partner; s uniform in [1, T-1] per clip."""
  _check_clips(x)
  b, t = x.shape[:2]
  if t < 2:
    raise ValueError(f"clip_stitch needs at least 2 frames, got T={t}.")
  keys, batch_key = negative.split_rng(rng, b)
  split = jax.vmap(lambda key: jax.random.randint(key, (), 1, t))(keys)
  own = (jnp.arange(t)[None, :] < split[:, None])[:, :, None, None, None]
  partner = jnp.take(x, negative.partner_indices(batch_key, b), axis=0)
  return jnp.where(own, x, partner)


VIDEO_NDAS: dict[str, Callable[..., Array]] = {
    "spatial_jigsaw": spatial_jigsaw,
    "frame_jigsaw": frame_jigsaw,
    "temporal_shuffle": temporal_shuffle,
    "temporal_reverse": temporal_reverse,
    "clip_stitch": clip_stitch,
}


def build_video_nda(cfg: Any) -> Callable[[Array, Array], Array]:
  """Video NDA `fn(rng, clips)` from a config; same format as `negative.build_nda`."""
  return negative.build_from_registry(cfg, VIDEO_NDAS, rank=5)
