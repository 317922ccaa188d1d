"""Feature extraction over all devices, one batch at a time.

A feature network (the FID Inception, the digits classifier) runs as one
jit-compiled `shard_map` over the mesh axis `parallel.AXIS`: every device
embeds its slice of the batch and the features are all-gathered, so every
process sees the whole batch's features. Statistics are accumulated on the
host in float64 (`metrics.GaussianStats`), so only one batch of images is ever
materialised.

Inputs are this process's images, uint8 in [0, 255] or float in [-1, 1],
NHWC. Batches are padded to a fixed size (one compilation) and the padding
is masked out again.
"""
import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from nda_jax import images as images_lib
from nda_jax import parallel
from nda_jax.evaluators import metrics

ApplyFn = Callable[[Any, jax.Array], Mapping[str, jax.Array]]
Features = dict[str, np.ndarray]


def to_unit_range(images: jax.Array, quantize: bool = False) -> jax.Array:
  """uint8 [0, 255] or float [-1, 1] -> float32 [-1, 1].

  uint8 goes through `images.to_float`, the conversion the models were
  trained with. `quantize` first truncates float images to the 256 levels a
  uint8 file would hold, as BigGAN-PyTorch's `sample.py`
  (`np.uint8(255 * (x + 1) / 2)`) does before the official FID is computed;
  those levels then take the same `to_float` path as real uint8 images.
  """
  if images.dtype == jnp.uint8:
    return images_lib.to_float(images)
  x = jnp.asarray(images, jnp.float32)
  if quantize:
    return images_lib.to_float(jnp.floor(jnp.clip(255.0 * (x + 1.0) / 2.0, 0.0, 255.0))
                             .astype(jnp.uint8))
  return x


class FeatureExtractor:
  """`apply_fn(variables, images [-1, 1]) -> {name: [B, ...]}` on all devices, batch by batch.

  Attributes:
    batch_size: images per process per call; a multiple of the local device count.
  """

  def __init__(self, apply_fn: ApplyFn, variables: Any, *, batch_size: int,
               mesh: jax.sharding.Mesh | None = None, quantize: bool = False,
               channels: int = 3, precision: str | None = "highest"):
    self.mesh = mesh or parallel.default_mesh()
    if parallel.AXIS not in self.mesh.axis_names:
      raise ValueError(f"The mesh needs an axis named {parallel.AXIS!r}, has "
                       f"{self.mesh.axis_names}.")
    local_devices = self.mesh.local_mesh.devices.size
    self.batch_size = -(-batch_size // local_devices) * local_devices
    self.channels = channels
    self.precision = precision
    self._sharding = NamedSharding(self.mesh, P(parallel.AXIS))
    self._variables = jax.device_put(variables, NamedSharding(self.mesh, P()))

    def per_device(variables, images, mask, labels):
      x = to_unit_range(images, quantize)
      if x.shape[-1] == 1 and channels != 1:
        x = jnp.repeat(x, channels, axis=-1)
      out = dict(apply_fn(variables, x))
      out["mask"], out["label"] = mask, labels
      return jax.tree.map(lambda a: jax.lax.all_gather(a, parallel.AXIS, tiled=True), out)

    batch = P(parallel.AXIS)
    self._fn = jax.jit(jax.shard_map(per_device, mesh=self.mesh, in_specs=(P(), batch, batch, batch),
                                     out_specs=P(), check_vma=False))

  def _run(self, images: np.ndarray, mask: np.ndarray, labels: np.ndarray) -> Features:
    """One padded batch of exactly `batch_size` images -> this batch's valid features
    (and their labels under 'label', gathered with them)."""
    put = lambda a: jax.make_array_from_process_local_data(self._sharding, a)
    precision = (jax.default_matmul_precision(self.precision) if self.precision
                 else contextlib.nullcontext())
    with precision:
      out = self._fn(self._variables, put(images), put(mask), put(labels))
    out = jax.device_get(out)   # Blocks: CPU collectives must not queue up.
    keep = out.pop("mask")
    return {k: v[keep] for k, v in out.items()}

  def batch_features(self, images: np.ndarray, mask: np.ndarray | None = None,
                     labels: np.ndarray | None = None) -> Features:
    """Features of `images` [N, H, W, C] (any N; `mask` False rows are dropped); with
    `labels` [N], their labels too (key 'label', in the features' order)."""
    images = np.asarray(images)
    chex.assert_rank(images, 4)
    mask = np.ones(len(images), bool) if mask is None else np.asarray(mask, bool)
    y = np.zeros(len(images), np.int32) if labels is None else np.asarray(labels, np.int32)
    chunks = []
    for start in range(0, len(images), self.batch_size):
      x = images[start:start + self.batch_size]
      m = mask[start:start + self.batch_size]
      c = y[start:start + self.batch_size]
      pad = self.batch_size - len(x)
      if pad:
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        m = np.concatenate([m, np.zeros(pad, bool)])
        c = np.concatenate([c, np.zeros(pad, np.int32)])
      chunks.append(self._run(x, m, c))
    if not chunks:
      raise ValueError("No images to embed.")
    out = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    if labels is None:
      del out["label"]
    return out

  def iterate(self, batches: Iterable[Mapping[str, np.ndarray]],
              labels: bool = False) -> Iterator[Features]:
    """Features of each {'image', optional 'mask', 'label'} batch (e.g. an `EvalData`
    pass); with `labels`, each batch's labels under 'label'."""
    for batch in batches:
      yield self.batch_features(batch["image"], batch.get("mask"),
                                batch["label"] if labels else None)


def gaussian_stats(feature_batches: Iterable[Features], key: str,
                   max_count: int | None = None) -> metrics.GaussianStats:
  """Running mu / sigma of `key` features over batches (the first `max_count` rows)."""
  stats = metrics.GaussianStats()
  for features in feature_batches:
    x = features[key]
    if max_count is not None:
      x = x[:max_count - stats.count]
    stats.update(x)
    if max_count is not None and stats.count >= max_count:
      break
  return stats


def sample_batches(sample_fn: Callable[[jax.Array, int], Any], rng: jax.Array, num: int,
                   call_size: int, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """`num` images from `sample_fn(fold_in(rng, i), n)` calls of `call_size`, in batches of
  `batch_size` (the last one smaller): how many images one call draws (a GAN's BN batch)
  is independent of how many the feature network embeds at once."""
  pending, count = [], 0
  for i, start in enumerate(range(0, num, call_size)):
    n = min(call_size, num - start)
    images = np.asarray(jax.device_get(sample_fn(jax.random.fold_in(rng, i), n)))
    if images.shape[0] != n:
      raise ValueError(f"sample_fn(rng, {n}) returned {images.shape[0]} images.")
    pending.append(images)
    count += n
    while count >= batch_size or (count and start + n == num):
      joined = np.concatenate(pending)
      yield {"image": joined[:batch_size]}
      rest = joined[batch_size:]
      pending, count = [rest], len(rest)
