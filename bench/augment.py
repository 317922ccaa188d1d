"""Throughput of the jitted image NDAs against the official per-sample loops.

  python bench/augment.py [--batch_sizes=64,256] [--sizes=32,224] [--repeats=3]

For every NDA, batch size and image side, prints images/s of the jitted JAX
NDA (compile excluded, best of --repeats) and of its NumPy translation of the
official per-sample code (`nda_jax.augment.numpy_ref`, best of
--numpy_repeats), measured in the same run on the same inputs, and their
ratio. mosaic has no official version: its baseline is the plain loop.
"""
from collections.abc import Callable, Sequence
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from nda_jax.augment import negative
from nda_jax.augment import numpy_ref

_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["64", "256"], "Batch sizes.")
_SIZES = flags.DEFINE_list("sizes", ["32", "224"], "Image sides (square, 3 channels).")
_NDAS = flags.DEFINE_list("ndas", list(negative.NDAS), "NDAs to time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls of each jitted NDA (best kept).")
_NUMPY_REPEATS = flags.DEFINE_integer("numpy_repeats", 1, "Timed calls of each NumPy loop.")

# name -> official-style NumPy NDA(data, rng), with the default parameters.
NUMPY_NDAS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "jigsaw": lambda x, rng: numpy_ref.jigsaw_k(x, 2, rng),
    "stitch": numpy_ref.stitch,
    "mixup": numpy_ref.mixup,
    "cutout": numpy_ref.cutout,
    "cutmix": numpy_ref.cutmix,
    "mosaic": numpy_ref.mosaic,
    "rotate": lambda x, rng: numpy_ref.rotate(x),
    "shift": numpy_ref.shifted,
}


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def bench(name: str, batch: int, side: int) -> tuple[float, float]:
  """(jit images/s, numpy images/s) for one NDA and input shape."""
  x = np.random.RandomState(0).uniform(-1, 1, (batch, side, side, 3)).astype(np.float32)
  xd = jnp.asarray(x)
  key = jax.random.key(0)
  fn = jax.jit(negative.NDAS[name])
  fn(key, xd).block_until_ready()  # compile
  jit_s = _best_seconds(lambda: fn(key, xd).block_until_ready(), _REPEATS.value)
  rng = np.random.default_rng(0)
  numpy_s = _best_seconds(lambda: NUMPY_NDAS[name](x, rng), _NUMPY_REPEATS.value)
  return batch / jit_s, batch / numpy_s


def main(argv: Sequence[str]) -> None:
  del argv
  unknown = sorted(set(_NDAS.value) - set(negative.NDAS))
  if unknown:
    raise app.UsageError(f"Unknown NDA(s) {unknown}; choose from {sorted(negative.NDAS)}.")
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"jit best of {_REPEATS.value}, numpy best of {_NUMPY_REPEATS.value}")
  print(f"{'nda':8s} {'batch':>5s} {'side':>4s} {'jit img/s':>12s} {'numpy img/s':>12s} "
        f"{'jit/numpy':>9s}")
  for side in map(int, _SIZES.value):
    for batch in map(int, _BATCH_SIZES.value):
      for name in _NDAS.value:
        jit_rate, numpy_rate = bench(name, batch, side)
        print(f"{name:8s} {batch:5d} {side:4d} {jit_rate:12.0f} {numpy_rate:12.0f} "
              f"{jit_rate / numpy_rate:9.1f}", flush=True)


if __name__ == "__main__":
  app.run(main)
