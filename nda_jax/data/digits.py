"""Embedded demo data: scikit-learn's 8x8 handwritten digits, no download.

The only real labelled images a package ships (no dataset can be downloaded
here at run time: docs/offline.md), so the demo
configs and the tests train on them. Images are upsampled to `size`x`size`
RGB uint8 to match the CIFAR-shaped models; "moving digits" clips give the
video trainers (DPC, video NDA) a tiny real dataset as well.

Preprocessing, fixed so that every run sees the same pixels:
  * values 0..16 -> uint8 0..255 (`round(v * 255 / 16)`);
  * a 1-pixel black border is added (10x10) so the upsampled digit does not
    touch the image border, then PIL bilinear resize to `size`x`size`;
  * the gray channel is replicated to RGB.
Split: 30 examples of each class form 'test' (300, class-balanced), the other
1,497 form 'train'; chosen by a fixed-seed numpy permutation per class and
kept in the original order within each split.

Moving digits carry two labels: the digit, and the direction of its net
motion over the clip (`load_moving_digit_directions`, one of DIRECTIONS), so a
probe can tell appearance from motion features.
"""
import functools
import importlib.util
import os

import numpy as np
from PIL import Image

SPLITS = ("train", "test", "all")
NUM_CLASSES = 10
NUM_EXAMPLES = 1797
TEST_PER_CLASS = 30
_SPLIT_SEED = 0
_MOVING_SEED = 1234
_BORDER = 1
# Quadrant of the net motion (y grows downwards): label 2 * (dy > 0) + (dx > 0).
DIRECTIONS = ("up-left", "up-right", "down-left", "down-right")


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"Unknown digits split {split!r}; choose one of {SPLITS}.")


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
  """All 1,797 digits as uint8 [N,8,8] in 0..255 and int32 labels [N].

  Reads the CSV that scikit-learn ships (what `load_digits` parses) without
  importing scikit-learn, which takes seconds; uses its API if the file moved.
  """
  spec = importlib.util.find_spec("sklearn")
  csv = os.path.join(os.path.dirname(spec.origin), "datasets", "data",
                     "digits.csv.gz") if spec and spec.origin else ""
  if os.path.isfile(csv):
    table = np.loadtxt(csv, delimiter=",")
    values, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
  else:
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    bunch = datasets.load_digits()
    values, target = bunch.images, bunch.target
  if values.shape != (NUM_EXAMPLES, 8, 8):
    raise ValueError(f"scikit-learn digits have shape {values.shape}, expected "
                     f"({NUM_EXAMPLES}, 8, 8); reinstall scikit-learn.")
  images = np.round(values * (255.0 / 16.0)).astype(np.uint8)
  return images, target.astype(np.int32)


@functools.lru_cache(maxsize=None)
def split_indices(split: str) -> np.ndarray:
  """Sorted indices into the 1,797 digits for `split` (deterministic)."""
  _check_split(split)
  _, labels = _raw_digits()
  if split == "all":
    return np.arange(len(labels))
  rng = np.random.RandomState(_SPLIT_SEED)
  test = np.concatenate([
      rng.permutation(np.flatnonzero(labels == c))[:TEST_PER_CLASS]
      for c in range(NUM_CLASSES)
  ])
  is_test = np.zeros(len(labels), bool)
  is_test[test] = True
  return np.flatnonzero(is_test if split == "test" else ~is_test)


def upsample(images: np.ndarray, size: int) -> np.ndarray:
  """uint8 [N,h,w] gray -> uint8 [N,size,size] (1-px border, PIL bilinear)."""
  if images.ndim != 3 or images.dtype != np.uint8:
    raise ValueError(f"Expected uint8 [N,h,w], got {images.dtype} {images.shape}.")
  padded = np.pad(images, ((0, 0), (_BORDER, _BORDER), (_BORDER, _BORDER)))
  out = np.empty((len(images), size, size), np.uint8)
  for i, img in enumerate(padded):
    out[i] = np.asarray(
        Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))
  return out


@functools.lru_cache(maxsize=8)
def _gray_digits(split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
  images, labels = _raw_digits()
  idx = split_indices(split)
  return upsample(images[idx], size), labels[idx]


def load_digits(split: str, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """Digits of `split` as (uint8 [N,size,size,3], int32 [N]).

  The arrays are cached and shared between calls: treat them as read-only.
  """
  _check_split(split)
  if size < 8:
    raise ValueError(f"size must be >= 8 (the digits are 8x8), got {size}.")
  return _rgb_digits(split, size)


@functools.lru_cache(maxsize=8)
def _rgb_digits(split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
  gray, labels = _gray_digits(split, size)
  rgb = np.repeat(gray[..., None], 3, axis=-1)
  rgb.flags.writeable = False
  return rgb, labels


def bounce(start: np.ndarray, velocity: np.ndarray, num_frames: int,
           limit: int) -> np.ndarray:
  """Integer positions [T, 2] of a point moving in [0, limit], reflecting at the ends."""
  t = np.arange(num_frames)[:, None]
  p = np.mod(start[None] + velocity[None] * t, 2 * limit)
  return np.where(p > limit, 2 * limit - p, p)


def moving_trajectory(rng: np.random.RandomState, num_frames: int,
                      limit: int) -> np.ndarray:
  """Top-left (y, x) positions [T, 2] in [0, limit] of one moving-digit clip.

  Start position is uniform; along each axis the speed is 1 or 3 px/frame in
  a random direction. Odd speeds matter: an even one can bounce back onto the
  same position (e.g. 15 -> 17 -> 15 against a wall at 16), so the digit would
  sometimes stand still for a frame. They also make the displacement over an
  odd number of steps odd, never 0 (a reflection p -> 2 * limit - p keeps the
  parity), which `motion_direction` relies on.
  """
  start = rng.randint(0, limit + 1, size=2)
  velocity = rng.choice([1, 3], size=2) * rng.choice([-1, 1], size=2)
  return bounce(start, velocity, num_frames, limit)


def moving_clip(digit: np.ndarray, rng: np.random.RandomState, num_frames: int,
                size: int) -> np.ndarray:
  """One clip uint8 [T,size,size] of `digit` (uint8 [d,d]) bouncing on a black canvas.

  The trajectory is `moving_trajectory(rng, num_frames, size - d)`.
  """
  d = digit.shape[0]
  positions = moving_trajectory(rng, num_frames, size - d)
  clip = np.zeros((num_frames, size, size), np.uint8)
  for t, (y, x) in enumerate(positions):
    clip[t, y:y + d, x:x + d] = digit
  return clip


def motion_direction(positions: np.ndarray) -> np.ndarray:
  """Index into DIRECTIONS of the net motion of trajectories [..., T, 2] -> int32 [...].

  Per axis, the sign of the displacement from the first to the last frame;
  where that is 0 (possible only for odd T: the digit bounced back to where it
  started) the last-but-one frame is used instead. A bouncing digit's initial
  velocity is not used: within 8 frames it often reverses, so it would
  disagree with what the frames show.
  """
  if positions.ndim < 2 or positions.shape[-2] < 2 or positions.shape[-1] != 2:
    raise ValueError(f"Need trajectories [..., T >= 2, 2], got {positions.shape}.")
  last = positions[..., -1, :] - positions[..., 0, :]
  before = positions[..., -2, :] - positions[..., 0, :]
  moved = np.where(last != 0, last, before)
  if (moved == 0).any():
    raise ValueError("A trajectory stays put along an axis at both of its last "
                     "two frames; its direction is undefined.")
  return (2 * (moved[..., 0] > 0) + (moved[..., 1] > 0)).astype(np.int32)


def _check_moving(split: str, num_frames: int, size: int, digit_size: int) -> None:
  _check_split(split)
  if not 8 <= digit_size < size:
    raise ValueError(
        f"Need 8 <= digit_size < size, got digit_size={digit_size}, size={size}.")
  if num_frames < 1:
    raise ValueError(f"num_frames must be >= 1, got {num_frames}.")


def _clip_rng(global_index: int) -> np.random.RandomState:
  """The trajectory stream of the clip of digit `global_index` (any split)."""
  return np.random.RandomState([_MOVING_SEED, int(global_index)])


def load_moving_digits(split: str, num_frames: int = 8, size: int = 32,
                       digit_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """Moving-digit clips as (uint8 [N,T,size,size,3], int32 [N]).

  Clip i shows digit i of `split` (resized to `digit_size`) bouncing off the
  canvas borders with constant speed; its trajectory is seeded by the digit's
  global index, so a clip is the same whichever split it is read from. The
  arrays are cached and shared between calls: treat them as read-only.
  """
  _check_moving(split, num_frames, size, digit_size)
  return _moving_digits(split, num_frames, size, digit_size)


def load_moving_digit_directions(split: str, num_frames: int = 8, size: int = 32,
                                 digit_size: int = 16) -> np.ndarray:
  """Motion labels int32 [N] (index into DIRECTIONS) of `load_moving_digits` clips.

  Same arguments, same clips: label i is `motion_direction` of clip i's
  trajectory. Needs num_frames >= 2.
  """
  _check_moving(split, num_frames, size, digit_size)
  if num_frames < 2:
    raise ValueError(f"A motion direction needs num_frames >= 2, got {num_frames}.")
  return _moving_directions(split, num_frames, size - digit_size)


@functools.lru_cache(maxsize=4)
def _moving_directions(split: str, num_frames: int, limit: int) -> np.ndarray:
  positions = np.stack([moving_trajectory(_clip_rng(g), num_frames, limit)
                        for g in split_indices(split)])
  directions = motion_direction(positions)
  directions.flags.writeable = False
  return directions


@functools.lru_cache(maxsize=4)
def _moving_digits(split: str, num_frames: int, size: int,
                   digit_size: int) -> tuple[np.ndarray, np.ndarray]:
  digits, labels = _gray_digits(split, digit_size)
  clips = np.stack([
      moving_clip(digit, _clip_rng(g), num_frames, size)
      for digit, g in zip(digits, split_indices(split))
  ])
  clips = np.repeat(clips[..., None], 3, axis=-1)
  clips.flags.writeable = False
  return clips, labels
