"""Video negative data augmentations for clips `[B, T, H, W, C]` in [-1, 1].

Same contract, randomness convention and device-count independence
(`axis_name`) as `negative.py`: one key or B per-sample keys, partner clips
along a random derangement of the global batch. The released NDA code has no
video part: these follow the paper's description of spatial (jigsaw) and
temporal (shuffle, reverse) NDAs for Dense Predictive Coding (DPC), plus a
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
  input): there is no released video code whose quirk to keep.
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
    "temporal_shuffle": temporal_shuffle,
    "temporal_reverse": temporal_reverse,
    "clip_stitch": clip_stitch,
}


def build_video_nda(cfg: Any, axis_name: str | None = None) -> Callable[[Array, Array], Array]:
  """Video NDA `fn(rng, clips)` from a config; same format as `negative.build_nda`."""
  return negative.build_from_registry(cfg, VIDEO_NDAS, rank=5, axis_name=axis_name)
