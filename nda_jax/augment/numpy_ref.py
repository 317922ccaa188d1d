"""NumPy re-implementations of the official NDA functions, sample by sample.

Straight translations of ermongroup/NDA `train_fns_aug.py` to NHWC numpy with
the official per-sample Python loops: the oracle for the tests of
`negative.py` and the baseline of `bench/augment.py`. Randomness comes from a
`np.random.Generator`; the tests pass the random choices explicitly where a
function takes them (`perms`, `shift`). Not used by training.
"""
import numpy as np
from PIL import Image


def get_perm(n: int, rng: np.random.Generator) -> np.ndarray:
  """A permutation of range(n), redrawn until it is not the identity."""
  perm = rng.permutation(n)
  while np.all(perm == np.arange(n)):
    perm = rng.permutation(n)
  return perm


def jigsaw_k(data: np.ndarray, k: int = 2, rng: np.random.Generator | None = None,
             perms: np.ndarray | None = None) -> np.ndarray:
  """Official `jigsaw_k`: row-major split, slot j <- patch perm[j], column-major merge."""
  _, h, w, _ = data.shape
  rows = np.split(data, k, axis=1)
  splits = []
  for i in range(k):
    splits += np.split(rows[i], k, axis=2)
  stacked = np.stack(splits, -1)  # [B, h/k, w/k, C, k*k]
  for idx in range(stacked.shape[0]):
    perm = get_perm(k * k, rng) if perms is None else perms[idx]
    stacked[idx] = stacked[idx][..., perm]
  slots = np.split(stacked, k * k, axis=-1)
  merged = [np.concatenate(slots[i * k:(i + 1) * k], axis=1) for i in range(k)]
  return np.concatenate(merged, axis=2)[..., 0]


def stitch(data: np.ndarray, rng: np.random.Generator, k: int = 2) -> np.ndarray:
  """Official `stitch`: first k//2 strips from the image, the rest from data[perm]."""
  perm = data[rng.permutation(len(data))]
  axis = 1 if rng.integers(2) == 0 else 2
  strip = data.shape[axis] // k
  out = perm.copy()
  index = [slice(None)] * 4
  index[axis] = slice(0, (k // 2) * strip)
  out[tuple(index)] = data[tuple(index)]
  return out


def mixup(data: np.ndarray, rng: np.random.Generator, alpha: float = 25.0) -> np.ndarray:
  """Official `mixup`: one lam ~ Beta(alpha, alpha) for the batch."""
  lam = rng.beta(alpha, alpha)
  return data * lam + (1 - lam) * data[rng.permutation(len(data))]


def cutout(data: np.ndarray, rng: np.random.Generator, min_size: int = 10,
           max_size: int = 20) -> np.ndarray:
  """Official `rand_blur`: one square per sample set to its per-channel mean."""
  data = data.copy()
  _, h, w, _ = data.shape
  for i in range(len(data)):
    k = int(min_size + (max_size - min_size) * rng.random())
    h_pos = int((h - k) * rng.random())
    w_pos = int((w - k) * rng.random())
    patch = data[i, h_pos:h_pos + k, w_pos:w_pos + k]
    data[i, h_pos:h_pos + k, w_pos:w_pos + k] = patch.mean(axis=(0, 1), keepdims=True)
  return data


def cutmix(data: np.ndarray, rng: np.random.Generator, beta: float = 1.0) -> np.ndarray:
  """Official `cut_mix` + `rand_bbox`: one box for the batch, pasted from data[perm]."""
  data = data.copy()
  _, h, w, _ = data.shape
  lam = rng.beta(beta, beta)
  perm = data[rng.permutation(len(data))]
  cut = np.sqrt(1.0 - lam)
  cut_h, cut_w = int(h * cut), int(w * cut)
  cy, cx = rng.integers(h), rng.integers(w)
  y1, y2 = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + cut_h // 2, 0, h)
  x1, x2 = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + cut_w // 2, 0, w)
  data[:, y1:y2, x1:x2] = perm[:, y1:y2, x1:x2]
  return data


def mosaic(data: np.ndarray, rng: np.random.Generator, k: int = 2) -> np.ndarray:
  """k x k cells per sample, each copied from the same cell of a random other image."""
  out = data.copy()
  b, h, w, _ = data.shape
  ch, cw = h // k, w // k
  for i in range(b):
    others = rng.permutation(np.delete(np.arange(b), i))
    for c in range(1, k * k):
      r, col = divmod(c, k)
      src = others[(c - 1) % len(others)]
      out[i, r * ch:(r + 1) * ch, col * cw:(col + 1) * cw] = (
          data[src, r * ch:(r + 1) * ch, col * cw:(col + 1) * cw])
  return out


def rotate(data: np.ndarray, angle: float = 60.0, fill: float = -1.0,
           resample: int = Image.BILINEAR) -> np.ndarray:
  """PIL `Image.rotate` per sample and channel, on float ('F' mode) images."""
  out = np.empty_like(data)
  for i in range(len(data)):
    for c in range(data.shape[-1]):
      img = Image.fromarray(np.ascontiguousarray(data[i, ..., c], np.float32))
      out[i, ..., c] = np.asarray(img.rotate(angle, resample=resample, fillcolor=fill))
  return out


def shifted(data: np.ndarray, rng: np.random.Generator | None = None,
            shift: int | None = None, min_shift: int = 10,
            max_shift: int = 25) -> np.ndarray:
  """Official `shifted`: three block copies (the bottom-right block stays unrolled)."""
  if shift is None:
    shift = int(min_shift + (max_shift - min_shift) * rng.random())
  k = shift
  new = data.copy()
  new[:, :k, :k] = data[:, -k:, -k:]
  new[:, :k, k:] = data[:, -k:, :-k]
  new[:, k:, :k] = data[:, :-k, -k:]
  return new
