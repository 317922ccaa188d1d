"""BatchNorm over fixed-size groups of the global batch, whatever the device count.

MoCo's CIFAR demo splits a GPU's batch into BN groups ("SplitBatchNorm") to
mimic the per-GPU statistics of an 8-GPU run. Here a group is a fixed set of
examples of the GLOBAL batch (`BNGroups.ids` names the group of each example of
a device's shard), so a run normalises with the same statistics on 1 device or
on 8: `GroupBatchNorm` sums each group's moments over the shard with a one-hot
contraction and adds the shards' sums with one `psum`, which serves any layout
of groups over devices without moving data. One group of the whole batch is
cross-replica BN.

MoCo's key encoder must not normalise a key with statistics of its own query's
group (`key_groups`); query and key encoders share the group size.
"""
import math
from typing import Any, Callable

import chex
import flax
import flax.linen as nn
from flax.linen import dtypes as flax_dtypes
import jax
import jax.numpy as jnp
from jax import lax

from nda_jax import parallel

Dtype = Any


@flax.struct.dataclass
class BNGroups:
  """BN group of each example of this device's shard.

  ids: int32 [b], a GLOBAL group index in [0, num) per example; num: the number
  of groups in the global batch (static). Every group must be non-empty.
  """
  ids: jax.Array
  num: int = flax.struct.field(pytree_node=False)


def axis_is_bound(axis_name: str | None) -> bool:
  """Whether `axis_name` is a mapped axis here (inside shard_map / pmap over it)."""
  if axis_name is None:
    return False
  try:
    lax.axis_size(axis_name)
  except NameError:
    return False
  return True


def _global_index(local_batch: int, global_batch: int) -> jax.Array:
  """`parallel.example_index` in a per-device step; arange on one device outside one."""
  if axis_is_bound(parallel.AXIS):
    if local_batch * lax.axis_size(parallel.AXIS) != global_batch:
      raise ValueError(f"local_batch={local_batch} x {lax.axis_size(parallel.AXIS)} devices "
                       f"!= global_batch={global_batch}")
    return parallel.example_index(local_batch)
  if local_batch != global_batch:
    raise ValueError(f"outside a per-device step the batch is the global batch, got "
                     f"local_batch={local_batch} != global_batch={global_batch}")
  return jnp.arange(local_batch)


def _num_groups(group_size: int, global_batch: int) -> int:
  if group_size < 1 or global_batch % group_size:
    raise ValueError(f"bn_group_size={group_size} must be a positive divisor of the global "
                     f"batch {global_batch}")
  return global_batch // group_size


def query_groups(local_batch: int, group_size: int, global_batch: int) -> BNGroups:
  """Consecutive examples of the global batch, `group_size` at a time: group = index // size.

  `group_size == global_batch` (one group) is cross-replica BN.
  """
  num = _num_groups(group_size, global_batch)
  index = _global_index(local_batch, global_batch)
  return BNGroups(ids=(index // group_size).astype(jnp.int32), num=num)


def key_groups(rng: jax.Array, local_batch: int, group_size: int,
               global_batch: int) -> BNGroups:
  """Groups for MoCo's key encoder: no key shares a group with its own query.

  Why: if a key were normalised in a group of the same images as its query
  (its own query group, or that query group moved elsewhere whole), the two
  views of an image would carry the same batch statistics, a signature the
  encoders can match instead of the content: the leak MoCo's shuffle-BN
  prevents. So each key group mixes examples of several query groups.

  Construction: the example in query group g at slot r (its index in the group)
  goes to key group (g + 1 + ((rho(r) + c) mod (n - 1))) mod n, with n groups,
  rho a random permutation of the slots and c a random offset in [0, n - 1),
  both drawn from `rng`. The shift 1 + (...) lies in [1, n - 1], never 0, so a
  key never lands in its query's group; each slot r sends exactly one example
  to each key group, so every key group has `group_size` members; and the
  distinct shifts over slots come from min(group_size, n - 1) query groups.
  Needs n >= 3: with 2 groups the shift is always 1 and a key group is its
  query's partner group moved whole.

  `rng` must be the same on every device (a step key, not a per-device key):
  all devices must agree on the assignment.
  """
  num = _num_groups(group_size, global_batch)
  if num < 3:
    raise ValueError(f"key_groups needs >= 3 BN groups so that key groups mix query groups; "
                     f"got {num} (global batch {global_batch} / bn_group_size {group_size}): "
                     f"lower bn_group_size or raise the batch")
  perm_key, offset_key = jax.random.split(rng)
  rho = jax.random.permutation(perm_key, group_size)
  offset = jax.random.randint(offset_key, (), 0, num - 1)
  index = _global_index(local_batch, global_batch)
  query_group, slot = index // group_size, index % group_size
  ids = (query_group + 1 + (rho[slot] + offset) % (num - 1)) % num
  return BNGroups(ids=ids.astype(jnp.int32), num=num)


class GroupBatchNorm(nn.Module):
  """BatchNorm with statistics per `BNGroups` group of the global batch.

  Normalises over all axes but the last (channels), so [b, H, W, C] images and
  [b, T, H, W, C] clips alike; statistics are computed in float32 whatever
  `dtype` is. Training normalises each example with its group's mean and biased
  variance; the running averages (`momentum * running + (1 - momentum) * batch`,
  Flax's convention, = PyTorch momentum 0.1) take the mean over groups of the
  group means and of the UNBIASED group variances, as PyTorch's BN on each
  group (MoCo's SplitBatchNorm) does. `groups=None` in training is one group of
  the whole global batch. Outside shard_map / pmap over `axis_name` the shard
  is the whole batch (no psum).

  Variables: params 'scale', 'bias'; batch_stats 'mean', 'var' (like Flax's
  BatchNorm). Apply with mutable=['batch_stats'] when training.

  Not biggan.batch_norm: that is BigGAN-PyTorch's whole-batch F.batch_norm, stored
  in the calling layer for its importer and with an update_stats switch; this one
  normalises fixed groups of examples (MoCo's query and key groups, DPC's clips).
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  axis_name: str | None = parallel.AXIS
  use_scale: bool = True
  use_bias: bool = True
  scale_init: Callable = nn.initializers.ones

  @nn.compact
  def __call__(self, x: jax.Array, *, use_running_average: bool,
               groups: BNGroups | None = None) -> jax.Array:
    chex.assert_rank(x, {2, 3, 4, 5})
    features = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    scale = (self.param("scale", self.scale_init, (features,), self.param_dtype)
             if self.use_scale else None)
    bias = (self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
            if self.use_bias else None)
    out_dtype = flax_dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
    xf = x.astype(jnp.float32)

    if use_running_average:
      mean, inv = ra_mean.value, lax.rsqrt(ra_var.value + self.epsilon)
    else:
      num, ids = (1, jnp.zeros(x.shape[:1], jnp.int32)) if groups is None else (groups.num,
                                                                               groups.ids)
      chex.assert_shape(ids, x.shape[:1])
      mean, var, count = self._group_moments(xf, ids, num)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean.mean(0)
        unbiased = var * (count / jnp.maximum(count - 1, 1))[:, None]
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased.mean(0)
      mean, inv = _per_example(mean, ids, x.ndim), _per_example(
          lax.rsqrt(var + self.epsilon), ids, x.ndim)
    if scale is not None:
      inv = inv * scale.astype(jnp.float32)
    y = (xf - mean) * inv
    if bias is not None:
      y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype)

  def _group_moments(self, xf: jax.Array, ids: jax.Array,
                     num: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-group mean, biased variance [n, C] and element count [n] over the global batch.

    Two passes (mean, then centred squares) for float32 accuracy; one-hot
    contractions gather each group's sums from this shard, psum adds the shards.
    """
    one_hot = jax.nn.one_hot(ids, num, dtype=jnp.float32)  # [b, n]
    reduce_axes = tuple(range(1, xf.ndim - 1))
    sync = axis_is_bound(self.axis_name)
    total = lambda a: lax.psum(a, self.axis_name) if sync else a
    # HIGHEST: GPUs/TPUs would otherwise round these sums to TF32 / bfloat16.
    group_sum = lambda per_example: total(
        jnp.dot(one_hot.T, per_example, precision=lax.Precision.HIGHEST))

    count = total(one_hot.sum(0)) * math.prod(xf.shape[1:-1])
    mean = group_sum(xf.sum(reduce_axes)) / count[:, None]
    var = group_sum(jnp.square(xf - _per_example(mean, ids, xf.ndim)).sum(reduce_axes))
    return mean, var / count[:, None], count


def _per_example(group_values: jax.Array, ids: jax.Array, ndim: int) -> jax.Array:
  """[n, C] per group -> [b, 1, ..., 1, C], broadcastable against a rank-`ndim` input."""
  values = group_values[ids]
  return values.reshape(values.shape[:1] + (1,) * (ndim - 2) + values.shape[1:])
