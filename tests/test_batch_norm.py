"""GroupBatchNorm and its BN groups: NumPy reference, device-count independence, key groups."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from nda_jax import parallel
from nda_jax.models import batch_norm

GLOBAL_BATCH = 32  # 4 examples per device on the 8 test devices
TOL = 1e-5  # 1 vs 8 devices: the same sums added in another order


def _random_variables(x, seed):
  """Random affine params and running stats, so that every term of the formula shows."""
  rng = np.random.default_rng(seed)
  c = x.shape[-1]
  return {"params": {"scale": 1 + 0.5 * rng.standard_normal(c, np.float32),
                     "bias": rng.standard_normal(c, np.float32)},
          "batch_stats": {"mean": rng.standard_normal(c, np.float32),
                          "var": rng.uniform(0.5, 1.5, c).astype(np.float32)}}


def _numpy_group_bn(x, ids, num, variables, momentum=0.9, eps=1e-5):
  """Per-group BN from the formula, float64: (output, new running mean, new running var)."""
  x = np.asarray(x, np.float64)
  y = np.empty_like(x)
  means, unbiased_vars = [], []
  for g in range(num):
    xg = x[ids == g].reshape(-1, x.shape[-1])
    mean, var = xg.mean(0), xg.var(0)
    y[ids == g] = (x[ids == g] - mean) / np.sqrt(var + eps)
    means.append(mean)
    unbiased_vars.append(var * len(xg) / (len(xg) - 1))
  params, stats = variables["params"], variables["batch_stats"]
  y = y * params["scale"] + params["bias"]
  ra_mean = momentum * stats["mean"] + (1 - momentum) * np.mean(means, 0)
  ra_var = momentum * stats["var"] + (1 - momentum) * np.mean(unbiased_vars, 0)
  return y, ra_mean, ra_var


def _inputs(shape, seed):
  rng = np.random.default_rng(seed)
  # A mean far from 0 relative to the spread: a one-pass E[x^2] - E[x]^2 would lose digits.
  return (3.0 + rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("shape", [(12, 5, 5, 3), (12, 2, 3, 3, 4)], ids=["image", "video"])
def test_matches_numpy_reference(shape):
  """One device (no mesh axis bound): per-group statistics, running averages, eval mode."""
  x = _inputs(shape, seed=1)
  bn = batch_norm.GroupBatchNorm()
  variables = _random_variables(x, seed=2)
  groups = batch_norm.query_groups(shape[0], group_size=4, global_batch=shape[0])
  np.testing.assert_array_equal(groups.ids, np.arange(shape[0]) // 4)
  y, updates = bn.apply(variables, x, use_running_average=False, groups=groups,
                        mutable=["batch_stats"])
  want_y, want_mean, want_var = _numpy_group_bn(x, np.asarray(groups.ids), 3, variables)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], want_mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(updates["batch_stats"]["var"], want_var, rtol=1e-6, atol=1e-6)

  # groups=None: one group of the whole batch.
  y_all, _ = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  want_all, _, _ = _numpy_group_bn(x, np.zeros(shape[0], int), 1, variables)
  np.testing.assert_allclose(y_all, want_all, rtol=1e-5, atol=1e-5)

  # Eval: the running averages, whatever the batch.
  y_eval = bn.apply(variables, x[:1], use_running_average=True)
  stats, params = variables["batch_stats"], variables["params"]
  want_eval = ((x[:1] - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * params["scale"]
               + params["bias"])
  np.testing.assert_allclose(y_eval, want_eval, rtol=1e-5, atol=1e-5)


def test_bfloat16_activations_keep_float32_statistics():
  x = jnp.asarray(_inputs((8, 4, 4, 3), seed=3), jnp.bfloat16)
  bn = batch_norm.GroupBatchNorm(dtype=jnp.bfloat16)
  variables = _random_variables(x, seed=4)
  groups = batch_norm.query_groups(8, group_size=4, global_batch=8)
  y, updates = bn.apply(variables, x, use_running_average=False, groups=groups,
                        mutable=["batch_stats"])
  assert y.dtype == jnp.bfloat16
  assert updates["batch_stats"]["mean"].dtype == jnp.float32
  want_y, want_mean, want_var = _numpy_group_bn(np.asarray(x, np.float32), np.asarray(groups.ids),
                                                2, variables)
  # Statistics of the bf16 inputs are exact to float32 precision (bf16 sums would be ~1e-2 off).
  np.testing.assert_allclose(updates["batch_stats"]["mean"], want_mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(updates["batch_stats"]["var"], want_var, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(y, np.float32), want_y, rtol=1e-2, atol=2e-2)


def _run_on_mesh(dp, fn, variables, x, rng):
  """fn(variables, x_shard, rng) -> (y_shard, batch_stats, ids_shard) over dp's mesh."""
  mapped = dp.map_fn(fn, in_specs=(P(), P(parallel.AXIS), P()),
                     out_specs=(P(parallel.AXIS), P(), P(parallel.AXIS)))
  out = mapped(dp.put_state(variables), dp.shard_batch(x), dp.put_state(rng))
  return jax.device_get(jax.block_until_ready(out))


def _bn_step(group_size, keys):
  bn = batch_norm.GroupBatchNorm()

  def step(variables, x, rng):
    make = batch_norm.key_groups if keys else (lambda _, *a: batch_norm.query_groups(*a))
    groups = make(rng, x.shape[0], group_size, GLOBAL_BATCH)
    y, updates = bn.apply(variables, x, use_running_average=False, groups=groups,
                          mutable=["batch_stats"])
    return y, updates["batch_stats"], groups.ids
  return bn, step


# Group sizes below, equal to and above the 8-device shard of 4, and the whole batch.
@pytest.mark.parametrize("group_size,keys", [(2, False), (4, False), (8, False), (32, False),
                                             (8, True)])
def test_one_device_equals_eight(group_size, keys):
  x = _inputs((GLOBAL_BATCH, 3, 3, 4), seed=group_size)
  bn, step = _bn_step(group_size, keys)
  variables = _random_variables(x, seed=5)
  rng = jax.random.key(7)
  one = _run_on_mesh(parallel.DataParallel(max_devices=1), step, variables, x, rng)
  eight_dp = parallel.DataParallel()
  assert eight_dp.num_devices == 8
  eight = _run_on_mesh(eight_dp, step, variables, x, rng)
  np.testing.assert_array_equal(one[2], eight[2])  # the same groups
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL), one[:2],
               eight[:2])
  ids = eight[2]
  num = GLOBAL_BATCH // group_size
  assert np.all(np.bincount(ids, minlength=num) == group_size)
  want_y, want_mean, want_var = _numpy_group_bn(x, ids, num, variables)
  np.testing.assert_allclose(eight[0], want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(eight[1]["mean"], want_mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(eight[1]["var"], want_var, rtol=1e-6, atol=1e-6)


def test_input_gradients_do_not_depend_on_device_count():
  """d(sum over the global batch of <y, w>)/dx: psum's transpose brings other shards' terms."""
  group_size = 8  # groups spanning two devices
  x = _inputs((GLOBAL_BATCH, 3, 3, 4), seed=11)
  weights = np.random.default_rng(12).standard_normal(x.shape).astype(np.float32)
  bn = batch_norm.GroupBatchNorm()
  variables = _random_variables(x, seed=13)

  def step(variables, xw, rng):
    del rng
    x, w = xw[..., :4], xw[..., 4:]
    groups = batch_norm.query_groups(x.shape[0], group_size, GLOBAL_BATCH)
    local_loss = lambda x: jnp.sum(bn.apply(variables, x, use_running_average=False,
                                            groups=groups, mutable=["batch_stats"])[0] * w)
    return jax.grad(local_loss)(x), variables["batch_stats"], groups.ids

  xw = np.concatenate([x, weights], axis=-1)
  one, eight = (_run_on_mesh(parallel.DataParallel(max_devices=n), step, variables, xw,
                             jax.random.key(0))[0] for n in (1, 8))
  assert np.abs(one).max() > 0.1
  np.testing.assert_allclose(one, eight, rtol=TOL, atol=TOL)


def _key_group_problems(query_ids, key_ids, group_size, num):
  """What breaks the key-group contract: shared groups, sizes, too little mixing."""
  problems = []
  if np.any(query_ids == key_ids):
    problems.append(f"{np.sum(query_ids == key_ids)} keys share their query's group")
  if np.any(np.bincount(key_ids, minlength=num) != group_size):
    problems.append("key groups of unequal size")
  for k in range(num):
    sources = len(set(query_ids[key_ids == k]))
    if sources != min(group_size, num - 1):
      problems.append(f"key group {k} draws from {sources} query groups")
  return problems


@pytest.mark.parametrize("group_size,num", [(2, 3), (4, 8), (8, 4), (1, 32), (16, 3)])
def test_key_groups_mix_query_groups(group_size, num):
  batch = group_size * num
  query_ids = np.arange(batch) // group_size
  seen = set()
  for seed in range(3):
    ids = np.asarray(batch_norm.key_groups(jax.random.key(seed), batch, group_size, batch).ids)
    assert _key_group_problems(query_ids, ids, group_size, num) == []
    seen.add(ids.tobytes())
  assert len(seen) > 1  # the assignment changes with the step key


def test_checker_rejects_assignments_without_the_reassignment():
  """Keys in their query groups, or query groups moved whole, are caught."""
  group_size, num = 4, 8
  query = batch_norm.query_groups(group_size * num, group_size, group_size * num)
  query_ids = np.asarray(query.ids)
  assert _key_group_problems(query_ids, query_ids, group_size, num)
  moved_whole = (query_ids + 1) % num
  problems = _key_group_problems(query_ids, moved_whole, group_size, num)
  assert problems and all("draws from 1 query groups" in p for p in problems)


def test_invalid_group_sizes_raise():
  with pytest.raises(ValueError, match="lower bn_group_size or raise the batch"):
    batch_norm.key_groups(jax.random.key(0), 16, 8, 16)
  with pytest.raises(ValueError, match="positive divisor of the global batch 32"):
    batch_norm.query_groups(32, 6, 32)
  with pytest.raises(ValueError, match="local_batch=8 != global_batch=32"):
    batch_norm.query_groups(8, 4, 32)
