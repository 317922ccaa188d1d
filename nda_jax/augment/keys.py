"""The per-sample randomness convention shared by every augmentation.

An augmentation takes either ONE key (split into one key per sample) or a batch
of B keys, one per sample: the trainers pass keys folded from each example's
global index, so a sample's augmentation does not depend on how the batch is
split over devices. Typed (`jax.random.key`) and raw uint32 keys both work.
"""
import jax
import jax.numpy as jnp


def _one_key_ndim(rng: jax.Array) -> int:
  return 0 if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else 1


def is_one_key(rng: jax.Array) -> bool:
  """True for one key, False for a batch of keys."""
  rng = jnp.asarray(rng)
  return rng.ndim == _one_key_ndim(rng)


def sample_keys(rng: jax.Array, batch_size: int) -> jax.Array:
  """B per-sample keys from one key, or the B keys passed in."""
  rng = jnp.asarray(rng)
  if is_one_key(rng):
    return jax.random.split(rng, batch_size)
  if rng.ndim == _one_key_ndim(rng) + 1 and rng.shape[0] == batch_size:
    return rng
  raise ValueError(
      f"rng must be one PRNG key or {batch_size} keys (one per sample), got "
      f"shape {rng.shape} dtype {rng.dtype}.")
