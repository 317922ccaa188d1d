"""Image negative data augmentations (NDA), on device.

Every NDA has the signature `fn(rng, images, **params, axis_name=None) ->
images` for a batch `[B, H, W, C]` of floats in [-1, 1] (float32 or
bfloat16): pure, shape- and dtype-preserving, jit- and vmap-able, no Python
loop over the batch. Static parameters (sizes, angles, flags) are Python
values fixed at trace time.

Randomness (one convention, `split_rng`):
  * `rng` is ONE key: it is split into one key per sample of the batch;
  * `rng` is an array of B keys: key i drives sample i. The trainer folds them
    from the global example index.
Batch-level randomness (the partner assignment, `per_sample=False` draws)
comes from the batch key, folded from the key of sample 0.

Device-count independence (`axis_name`): inside a per-device step (shard_map
or pmap over the mesh axis `axis_name`), `images` is this device's shard of
the global batch and `rng` its per-sample keys, or one key that is the same
on every device. Every sample then gets exactly what one call on the whole
batch outside a mesh gives it, on any number of devices:
  * the batch key is folded from the key of GLOBAL sample 0, which every
    device gets by all-gathering the first key of each shard (one key per
    device); one key is split over the global batch, each device taking the
    keys of its slice;
  * partners follow a permutation of the GLOBAL batch, drawn identically on
    every device from the batch key, and are read by global index from the
    global batch, which each device all-gathers
    (`jax.lax.all_gather(..., tiled=True)`).
Why all-gather: the derangement is drawn at run time and sends an image to
any device, while a ppermute's pattern is fixed at trace time; an all-gather
is one collective that any draw can index, and the code path stays the one of
a single call. The cost is one copy of the global NDA input on every device:
B x H x W x C values, 6 MiB for 512 CIFAR-10 images in float32, small next
to a discriminator's activations (a mixture gathers once per partner NDA).
NDAs without partners gather no images. With `axis_name=None` the shard is
the whole batch: a single call, no mesh.

Partner images (stitch, mixup, cutmix, mosaic) follow a random cyclic
derangement of the batch (`partner_indices`): nobody is its own partner when
B >= 2. The official code used `torch.randperm`, which can pair an image with
itself; we deliberately do not.

Semantics and defaults follow the official `train_fns_aug.py` of
ermongroup/NDA; each docstring notes where, and why, a form differs.
"""
from collections.abc import Callable, Mapping
import functools
import inspect
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from nda_jax.augment import keys as keys_lib

Array = jax.Array
NDA = Callable[..., Array]

# Salts for keys derived from a sample key: distinct, arbitrary constants.
_BATCH_SALT = 0x6E6461  # "nda"
_CHOICE_SALT = 0x63686F  # "cho"
# Largest n for which n! - 1 fits int32, so a non-identity permutation of n
# items can be drawn exactly as one uniform integer (12! = 479,001,600).
_MAX_EXACT_PERM = 12
JIGSAW_LAYOUTS = ("official", "clean")
ROTATE_INTERPOLATIONS = ("bilinear", "nearest")


# ----------------------------------------------------------------------------
# Shared helpers (also used by video.py).
# ----------------------------------------------------------------------------
def split_rng(rng: Array, batch_size: int,
              axis_name: str | None = None) -> tuple[Array, Array]:
  """(per-sample keys of this shard, the batch key) from one key or B keys.

  `batch_size` is the shard's size. The batch key is folded from the key of
  global sample 0, so it is the same on every device and for any device
  count (see the module docstring).
  """
  if axis_name is None:
    keys = keys_lib.sample_keys(rng, batch_size)
    first = keys[0]
  elif keys_lib.is_one_key(rng):
    all_keys = keys_lib.sample_keys(rng, batch_size * jax.lax.axis_size(axis_name))
    keys = jax.lax.dynamic_slice_in_dim(
        all_keys, jax.lax.axis_index(axis_name) * batch_size, batch_size)
    first = all_keys[0]
  else:
    keys = keys_lib.sample_keys(rng, batch_size)
    first = jax.lax.all_gather(keys[:1], axis_name, tiled=True)[0]
  return keys, jax.random.fold_in(first, _BATCH_SALT)


def global_batch(x: Array, axis_name: str | None) -> tuple[Array, Array]:
  """(the global batch, global indices of this shard's samples).

  Inside a per-device step, all-gathers the shards along `axis_name`;
  outside, the shard is the whole batch.
  """
  b = x.shape[0]
  if axis_name is None:
    return x, jnp.arange(b)
  return (jax.lax.all_gather(x, axis_name, tiled=True),
          jax.lax.axis_index(axis_name) * b + jnp.arange(b))


def fold_keys(keys: Array, data: int) -> Array:
  """Folds `data` into each of a batch of keys (independent per-sample streams)."""
  return jax.vmap(lambda k: jax.random.fold_in(k, data))(keys)


def partner_indices(batch_key: Array, batch_size: int) -> Array:
  """int32 [B]: a uniformly random B-cycle, a derangement for B >= 2.

  pi is a random permutation and sample pi[j] is paired with pi[j + 1 mod B];
  B == 1 pairs the sample with itself (there is nobody else).
  """
  order = jax.random.permutation(batch_key, batch_size)
  return jnp.zeros(batch_size, jnp.int32).at[order].set(
      jnp.roll(order, -1).astype(jnp.int32))


def _lehmer_decode(index: Array, n: int) -> Array:
  """int32 [n]: the `index`-th permutation of range(n) in lexicographic order."""
  available = jnp.ones(n, bool)
  perm = []
  for i in range(n):
    digit = (index // math.factorial(n - 1 - i)) % (n - i)
    rank = jnp.cumsum(available) - 1
    pos = jnp.argmax(available & (rank == digit)).astype(jnp.int32)
    perm.append(pos)
    available = available & (jnp.arange(n) != pos)
  return jnp.stack(perm)


def _nonidentity_permutation(key: Array, n: int) -> Array:
  """One permutation of range(n), uniform over the n! - 1 non-identity ones.

  Exact for n <= 12: a uniform integer in [1, n!) decoded as a Lehmer code
  (0 is the identity). For n > 12 a uniform permutation is drawn and the
  identity, if drawn, is replaced by the swap of items 0 and 1; that swap
  then has probability 2/n! instead of 1/(n! - 1), a total-variation distance
  below 1/n! (< 5e-14 for 16 jigsaw patches).
  """
  if n < 2:
    raise ValueError(f"A non-identity permutation needs n >= 2 items, got {n}.")
  if n <= _MAX_EXACT_PERM:
    index = jax.random.randint(key, (), 1, math.factorial(n), jnp.int32)
    return _lehmer_decode(index, n)
  perm = jax.random.permutation(key, n).astype(jnp.int32)
  swap = jnp.arange(n, dtype=jnp.int32).at[:2].set(jnp.array([1, 0], jnp.int32))
  return jnp.where(jnp.all(perm == jnp.arange(n)), swap, perm)


@functools.partial(jax.jit, static_argnums=1)  # one compile when called eagerly
def nonidentity_permutations(keys: Array, n: int) -> Array:
  """int32 [B, n]: one non-identity permutation of range(n) per key."""
  return jax.vmap(lambda k: _nonidentity_permutation(k, n))(keys)


def check_images(x: Array, rank: int = 4) -> None:
  """Batch of float images (rank 4) or clips (rank 5), the NDA input contract."""
  chex.assert_rank(x, rank)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"NDAs take float images in [-1, 1], got dtype {x.dtype}.")


def _check_divisible(size: int, k: int, what: str) -> None:
  if k < 1 or size % k:
    raise ValueError(f"{what}: image side {size} must be divisible by k={k}.")


def _uniform_int(key: Array, low: int, high: int) -> Array:
  """floor(low + (high - low) * U[0, 1)), the official way of drawing sizes."""
  return jnp.floor(low + (high - low) * jax.random.uniform(key)).astype(jnp.int32)


def _per_sample_or_batch(draw: Callable[[Array], Any], keys: Array,
                         batch_key: Array, per_sample: bool) -> Any:
  """`draw` mapped over the sample keys, or drawn once and broadcast to B."""
  if per_sample:
    return jax.vmap(draw)(keys)
  value = draw(batch_key)
  return jax.tree.map(lambda v: jnp.broadcast_to(v, (keys.shape[0],) + v.shape),
                      value)


# ----------------------------------------------------------------------------
# Jigsaw.
# ----------------------------------------------------------------------------
def jigsaw_from_perms(x: Array, perms: Array, k: int,
                      layout: str = "official") -> Array:
  """Jigsaw with given permutations: slot j holds patch perms[:, j].

  Patches are numbered row-major (p = r * k + c). layout="official" places
  slot j at (row=j % k, col=j // k) (the column-major reassembly of the
  official `jigsaw_k`); layout="clean" places it at (row=j // k, col=j % k).
  """
  check_images(x)
  if layout not in JIGSAW_LAYOUTS:
    raise ValueError(f"Unknown jigsaw layout {layout!r}; choose one of {JIGSAW_LAYOUTS}.")
  b, h, w, c = x.shape
  _check_divisible(h, k, "jigsaw")
  _check_divisible(w, k, "jigsaw")
  chex.assert_shape(perms, (b, k * k))
  slot = np.arange(k * k).reshape(k, k)  # slot[r, c] for the clean layout
  if layout == "official":
    slot = slot.T  # slot j = c * k + r lands at (r, c)
  src = perms[:, slot.reshape(-1)]  # [B, k*k]: patch shown at grid cell r*k+c
  patches = x.reshape(b, k, h // k, k, w // k, c).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(b, k * k, h // k, w // k, c)
  out = jnp.take_along_axis(patches, src[:, :, None, None, None], axis=1)
  out = out.reshape(b, k, k, h // k, w // k, c).transpose(0, 1, 3, 2, 4, 5)
  return out.reshape(b, h, w, c)


def jigsaw(rng: Array, x: Array, k: int = 2, layout: str = "official", *,
           axis_name: str | None = None) -> Array:
  """k x k jigsaw with a per-sample non-identity patch permutation.

  layout="official" (default) is bit-for-bit the mapping of the official
  `jigsaw_k`: the permutation avoids the identity, but the column-major
  reassembly transposes the grid, so for k=2 the permutation [0, 2, 1, 3]
  (1 of the 23 drawn) returns the unchanged image (~4.3% of "negatives" are
  real images). It is the default for parity with the released models.
  layout="clean" draws uniformly among the arrangements that differ from the
  input. Both use `nonidentity_permutations`, so the permutations for given
  keys are the same and only the placement differs.
  """
  check_images(x)
  keys, _ = split_rng(rng, x.shape[0], axis_name)
  return jigsaw_from_perms(x, nonidentity_permutations(keys, k * k), k, layout)


# ----------------------------------------------------------------------------
# NDAs with a partner image.
# ----------------------------------------------------------------------------
def partners(x: Array, batch_key: Array, axis_name: str | None = None) -> Array:
  """The partner of each sample of this shard, along a derangement of the global batch."""
  x_all, index = global_batch(x, axis_name)
  return jnp.take(x_all, partner_indices(batch_key, x_all.shape[0])[index], axis=0)


def stitch(rng: Array, x: Array, k: int = 2, per_sample: bool = True, *,
           axis_name: str | None = None) -> Array:
  """First k//2 of k strips from the image, the rest from its partner.

  Strips are horizontal (top from the image) or vertical (left from the
  image) with probability 1/2, drawn per sample; per_sample=False draws one
  orientation for the batch, as the official `stitch`.
  """
  check_images(x)
  b, h, w, _ = x.shape
  _check_divisible(h, k, "stitch")
  _check_divisible(w, k, "stitch")
  keys, batch_key = split_rng(rng, b, axis_name)
  vertical = _per_sample_or_batch(jax.random.bernoulli, keys, batch_key, per_sample)
  rows = jnp.arange(h)[:, None] < (k // 2) * (h // k)
  cols = jnp.arange(w)[None, :] < (k // 2) * (w // k)
  own = jnp.where(vertical[:, None, None], cols, rows)[..., None]
  return jnp.where(own, x, partners(x, batch_key, axis_name))


def mixup(rng: Array, x: Array, alpha: float = 25.0, per_sample: bool = True, *,
          axis_name: str | None = None) -> Array:
  """lam * x + (1 - lam) * partner, lam ~ Beta(alpha, alpha).

  per_sample=False draws one lam for the batch, as the official `mixup`
  (called there with alpha=25, which keeps lam close to 0.5).
  """
  check_images(x)
  keys, batch_key = split_rng(rng, x.shape[0], axis_name)
  lam = _per_sample_or_batch(lambda key: jax.random.beta(key, alpha, alpha),
                             keys, batch_key, per_sample)[:, None, None, None]
  partner = partners(x, batch_key, axis_name).astype(jnp.float32)
  out = lam * x.astype(jnp.float32) + (1.0 - lam) * partner
  return out.astype(x.dtype)


def _box_mask(top: Array, bottom: Array, left: Array, right: Array,
              h: int, w: int) -> Array:
  """bool [B, H, W, 1]: rows [top, bottom) x cols [left, right) per sample."""
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  inside = ((rows >= top[:, None, None]) & (rows < bottom[:, None, None]) &
            (cols >= left[:, None, None]) & (cols < right[:, None, None]))
  return inside[..., None]


def cutmix(rng: Array, x: Array, beta: float = 1.0, per_sample: bool = True, *,
           axis_name: str | None = None) -> Array:
  """Pastes a box of the partner into the image (CutMix `rand_bbox` rule).

  lam ~ Beta(beta, beta); the box has half-sides int(H * sqrt(1 - lam)) // 2
  and int(W * sqrt(1 - lam)) // 2 around a uniform integer center and is
  clipped to the image. per_sample=False draws one box for the batch, as the
  official `cut_mix` (whose H/W naming swap cancels out).
  """
  check_images(x)
  b, h, w, _ = x.shape
  keys, batch_key = split_rng(rng, b, axis_name)

  def draw_box(key):
    k_lam, k_y, k_x = jax.random.split(key, 3)
    cut = jnp.sqrt(1.0 - jax.random.beta(k_lam, beta, beta))
    half_h = jnp.floor(h * cut).astype(jnp.int32) // 2
    half_w = jnp.floor(w * cut).astype(jnp.int32) // 2
    cy = jax.random.randint(k_y, (), 0, h)
    cx = jax.random.randint(k_x, (), 0, w)
    return (jnp.clip(cy - half_h, 0, h), jnp.clip(cy + half_h, 0, h),
            jnp.clip(cx - half_w, 0, w), jnp.clip(cx + half_w, 0, w))

  box = _per_sample_or_batch(draw_box, keys, batch_key, per_sample)
  return jnp.where(_box_mask(*box, h, w), partners(x, batch_key, axis_name), x)


def mosaic(rng: Array, x: Array, k: int = 2, *, axis_name: str | None = None) -> Array:
  """k x k grid whose cells come from the same cell of different images.

  Along the random B-cycle of `partner_indices`, cell c of sample i comes
  from the image offsets[c] steps ahead of i, where offsets is a per-sample
  random permutation of range(k*k): one random cell keeps the image itself,
  the others come from k*k - 1 distinct other images when B >= k*k (for
  smaller B the offsets wrap, but cell offset 1 is never the image itself).
  """
  check_images(x)
  b, h, w, _ = x.shape
  _check_divisible(h, k, "mosaic")
  _check_divisible(w, k, "mosaic")
  keys, batch_key = split_rng(rng, b, axis_name)
  x_all, index = global_batch(x, axis_name)
  n = x_all.shape[0]
  order = jax.random.permutation(batch_key, n)
  position = jnp.argsort(order)[index]  # position of each sample along the cycle
  offsets = jax.vmap(lambda key: jax.random.permutation(key, k * k))(keys)
  source = order[(position[:, None] + offsets) % n]  # [B, k*k] global indices
  cell = (np.arange(h)[:, None] // (h // k)) * k + np.arange(w)[None, :] // (w // k)
  pixel_source = source[:, cell]  # [B, H, W]
  return x_all[pixel_source, np.arange(h)[:, None], np.arange(w)[None, :]]


# ----------------------------------------------------------------------------
# NDAs on one image.
# ----------------------------------------------------------------------------
def cutout(rng: Array, x: Array, min_size: int = 10, max_size: int = 20, *,
           axis_name: str | None = None) -> Array:
  """Replaces one square per sample by its per-channel mean (official `rand_blur`).

  Side floor(U[min_size, max_size)), clipped to min(H, W) for small images;
  top-left floor((H - side) * U) and floor((W - side) * U).
  """
  check_images(x)
  b, h, w, _ = x.shape
  keys, _ = split_rng(rng, b, axis_name)

  def draw_box(key):
    k_size, k_y, k_x = jax.random.split(key, 3)
    side = jnp.minimum(_uniform_int(k_size, min_size, max_size), min(h, w))
    top = jnp.floor((h - side) * jax.random.uniform(k_y)).astype(jnp.int32)
    left = jnp.floor((w - side) * jax.random.uniform(k_x)).astype(jnp.int32)
    return top, top + side, left, left + side

  top, bottom, left, right = jax.vmap(draw_box)(keys)
  inside = _box_mask(top, bottom, left, right, h, w)
  xf = x.astype(jnp.float32)
  area = ((bottom - top) * (right - left)).astype(jnp.float32)[:, None, None, None]
  mean = jnp.sum(jnp.where(inside, xf, 0.0), axis=(1, 2), keepdims=True) / area
  return jnp.where(inside, mean, xf).astype(x.dtype)


def _rotation_taps(h: int, w: int, angle: float, interpolation: str):
  """Source taps of a rotation that follows PIL exactly (numpy, static).

  PIL's `Image.rotate(angle)` turns counter-clockwise about (W/2, H/2): output
  pixel center (j + 0.5, i + 0.5) is read at
    x = cos(a) (j + 0.5 - W/2) - sin(a) (i + 0.5 - H/2) + W/2
    y = sin(a) (j + 0.5 - W/2) + cos(a) (i + 0.5 - H/2) + H/2
  (pixel-corner coordinates). It is filled when (x, y) is outside the image
  rectangle; otherwise it interpolates at index (y - 0.5, x - 0.5), clamping
  neighbours to the border.
  Returns (inside [H*W] bool, [(flat index [H*W], weight [H*W]), ...]).
  """
  a = math.radians(angle)
  ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  dx, dy = jj + 0.5 - w / 2, ii + 0.5 - h / 2
  x = math.cos(a) * dx - math.sin(a) * dy + w / 2
  y = math.sin(a) * dx + math.cos(a) * dy + h / 2
  inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
  if interpolation == "nearest":
    corners = [(np.floor(y), np.floor(x), np.ones_like(x))]
  else:
    i0, j0 = np.floor(y - 0.5), np.floor(x - 0.5)
    fy, fx = y - 0.5 - i0, x - 0.5 - j0
    corners = [(i0, j0, (1 - fy) * (1 - fx)), (i0, j0 + 1, (1 - fy) * fx),
               (i0 + 1, j0, fy * (1 - fx)), (i0 + 1, j0 + 1, fy * fx)]
  taps = []
  for ci, cj, weight in corners:
    flat = np.clip(ci, 0, h - 1) * w + np.clip(cj, 0, w - 1)
    taps.append((flat.reshape(-1).astype(np.int32), weight.reshape(-1).astype(np.float32)))
  return inside.reshape(-1), taps


def rotate(rng: Array, x: Array, angle: float = 60.0, fill: float = -1.0,
           interpolation: str = "bilinear", *, axis_name: str | None = None) -> Array:
  """Rotates every image counter-clockwise by a fixed `angle` (degrees) about its center.

  `rng` is unused (the official NDA is deterministic). Pixels from outside the
  image take `fill`: -1.0 is black, what PIL's default fill 0 meant in the
  official code. Multiples of 90 degrees on square images (and of 180 on any)
  are exact `jnp.rot90` turns; other angles match PIL's `rotate` with the
  same `interpolation` on a float image, border pixels included.
  The official code went through torchvision's PIL `rotate`, whose default
  is nearest, after a uint8 conversion that wraps negative values; bilinear
  on the float image is the faithful-in-spirit, loss-free form.
  """
  del rng, axis_name
  check_images(x)
  if interpolation not in ROTATE_INTERPOLATIONS:
    raise ValueError(f"Unknown interpolation {interpolation!r}; choose one of "
                     f"{ROTATE_INTERPOLATIONS}.")
  b, h, w, c = x.shape
  angle = float(angle)
  if angle % 180 == 0 or (angle % 90 == 0 and h == w):
    return jnp.rot90(x, k=int(angle // 90) % 4, axes=(1, 2))
  flat = x.reshape(b, h * w, c).astype(jnp.float32)
  inside, taps = _rotation_taps(h, w, angle, interpolation)
  out = sum(weight[None, :, None] * jnp.take(flat, index, axis=1) for index, weight in taps)
  out = jnp.where(inside[None, :, None], out, fill)
  return out.reshape(b, h, w, c).astype(x.dtype)


def shift(rng: Array, x: Array, min_shift: int = 10, max_shift: int = 25,
          per_sample: bool = True, exact_roll: bool = True, *,
          axis_name: str | None = None) -> Array:
  """Cyclic roll by s = floor(U[min_shift, max_shift)) pixels along H and W.

  The official `shifted` (defined, unused in training) draws one s per batch
  (per_sample=False here) and builds the roll from three block copies,
  leaving the bottom-right block out[s:, s:] = img[s:, s:] unrolled;
  exact_roll=False reproduces that, the default is a true `np.roll`.
  """
  check_images(x)
  b, h, w, _ = x.shape
  keys, batch_key = split_rng(rng, b, axis_name)
  s = _per_sample_or_batch(lambda key: _uniform_int(key, min_shift, max_shift),
                           keys, batch_key, per_sample)
  rows = (jnp.arange(h)[None, :] - s[:, None]) % h  # roll: out[i] = x[(i - s) % n]
  cols = (jnp.arange(w)[None, :] - s[:, None]) % w
  out = jnp.take_along_axis(x, rows[:, :, None, None], axis=1)
  out = jnp.take_along_axis(out, cols[:, None, :, None], axis=2)
  if not exact_roll:
    keep = ((jnp.arange(h)[None, :, None] >= s[:, None, None]) &
            (jnp.arange(w)[None, None, :] >= s[:, None, None]))
    out = jnp.where(keep[..., None], x, out)
  return out


NDAS: dict[str, NDA] = {
    "jigsaw": jigsaw,
    "stitch": stitch,
    "mixup": mixup,
    "cutout": cutout,
    "cutmix": cutmix,
    "mosaic": mosaic,
    "rotate": rotate,
    "shift": shift,
}


# ----------------------------------------------------------------------------
# Config -> one callable.
# ----------------------------------------------------------------------------
def _to_dict(value: Any) -> dict[str, Any]:
  if value is None:
    return {}
  return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def _bind(registry: Mapping[str, NDA], name: str, kwargs: Mapping[str, Any],
          axis_name: str | None) -> Callable[[Array, Array], Array]:
  """registry[name] with `kwargs` and `axis_name` bound, after checking the names.

  Config parameters are those after (rng, images); the keyword-only
  `axis_name` belongs to the caller, not to the config.
  """
  fn = registry[name]
  valid = [p.name for p in list(inspect.signature(fn).parameters.values())[2:]
           if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
  unknown = sorted(set(kwargs) - set(valid))
  if unknown:
    raise ValueError(f"Unknown parameter(s) {unknown} for NDA {name!r}; valid: {valid}.")
  return lambda rng, x: fn(rng, x, **kwargs, axis_name=axis_name)


def build_from_registry(cfg: Any, registry: Mapping[str, NDA], rank: int,
                        axis_name: str | None = None) -> Callable[[Array, Array], Array]:
  """`build_nda` for any registry (shared by the image and video builders).

  cfg: `name` ('a' or 'a+b+...'), optional `probs` (one per name, default
  uniform) and `params` ({name: kwargs}; entries of registered NDAs that are
  not in `name` are ignored, so a config can switch NDA by name alone).
  Several names: each sample takes the output of one NDA, chosen from its own
  sample key with `probs`. `axis_name`: the mesh axis of the per-device step
  the returned function is called in (None: called on the whole batch); see
  the module docstring.
  """
  cfg = _to_dict(cfg)
  unknown_fields = sorted(set(cfg) - {"name", "probs", "params"})
  if unknown_fields:
    raise ValueError(f"Unknown NDA config field(s) {unknown_fields}; valid: "
                     "['name', 'probs', 'params'].")
  names = [n.strip() for n in str(cfg.get("name", "")).split("+")]
  for n in names:
    if n not in registry:
      raise ValueError(f"Unknown NDA {n!r}; choose one of {sorted(registry)} "
                       "(several joined with '+').")
  if len(set(names)) != len(names):
    raise ValueError(f"NDA names must be distinct, got {names}.")
  params = _to_dict(cfg.get("params"))
  stray = sorted(set(params) - set(registry))
  if stray:  # params of other registered NDAs are kept, so --config.nda.name can switch
    raise ValueError(f"params given for unknown NDA(s) {stray}; choose from {sorted(registry)}.")
  fns = [_bind(registry, n, _to_dict(params.get(n)), axis_name) for n in names]
  probs = cfg.get("probs")
  probs = np.full(len(names), 1.0 / len(names)) if probs is None else np.asarray(probs, float)
  if probs.shape != (len(names),) or np.any(probs < 0) or probs.sum() <= 0:
    raise ValueError(f"probs must be {len(names)} non-negative numbers with a positive "
                     f"sum (one per NDA in {names}), got {cfg.get('probs')}.")
  if len(fns) == 1:
    return fns[0]
  log_probs = jnp.log(jnp.asarray(probs / probs.sum(), jnp.float32))

  def apply(rng: Array, x: Array) -> Array:
    check_images(x, rank)
    keys, _ = split_rng(rng, x.shape[0], axis_name)
    choice = jax.vmap(lambda k: jax.random.categorical(k, log_probs))(
        fold_keys(keys, _CHOICE_SALT))
    choice = choice.reshape((-1,) + (1,) * (rank - 1))
    out = x
    for i, fn in enumerate(fns):
      out = jnp.where(choice == i, fn(fold_keys(keys, i), x), out)
    return out

  return apply


def build_nda(cfg: Any, axis_name: str | None = None) -> Callable[[Array, Array], Array]:
  """Image NDA `fn(rng, images)` from a config (see `build_from_registry`).

  Example: {'name': 'jigsaw+cutout', 'probs': [0.75, 0.25],
            'params': {'jigsaw': {'k': 2}}}. Inside a per-device step, pass
  the mesh axis as `axis_name` so the result does not depend on the device
  count.
  """
  return build_from_registry(cfg, NDAS, rank=4, axis_name=axis_name)
