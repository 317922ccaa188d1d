"""Every NDA gives the same images on 1, 4 and 8 devices as one call on the whole batch.

Inside a per-device step an NDA sees its shard and the per-example keys of the
trainer (`parallel.per_example_keys`) or one step key; with `axis_name` set it
must return, for each sample, exactly what one call on the global batch with
the global keys returns: same partners, same batch-level draws.
"""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from nda_jax import parallel
from nda_jax.augment import negative
from nda_jax.augment import video

DEVICE_COUNTS = (1, 4, 8)
B = 16
SHAPES = {"image": (B, 8, 8, 3), "video": (B, 10, 4, 4, 2)}  # clips: 2 blocks of 5 frames
REGISTRIES = {"image": negative.NDAS, "video": video.VIDEO_NDAS}
BUILDERS = {"image": negative.build_nda, "video": video.build_video_nda}
MIXTURES = {"image": "stitch+jigsaw", "video": "clip_stitch+temporal_reverse"}
# Outputs computed with float arithmetic whose association XLA may choose per shape.
FLOAT_ARITHMETIC = ("mixup", "cutout", "rotate")


def _cases():
  for kind, registry in REGISTRIES.items():
    for name, fn in sorted(registry.items()):
      yield kind, name, {}
      if "per_sample" in inspect.signature(fn).parameters:
        yield kind, name, {"per_sample": False}
    yield kind, MIXTURES[kind], {}


def _case_id(case):
  kind, name, params = case
  return "-".join([kind, name] + [f"{k}={v}" for k, v in params.items()])


def _example_keys(step_key, b):
  """What `parallel.per_example_keys` gives the whole batch: keys folded from the index."""
  return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(b))


def _on_mesh(nda, num_devices, step_key, x, per_example_keys=True):
  """The NDA of `x` over `num_devices` devices, as the trainer calls it.

  Each device passes its shard and the per-example keys of its samples
  (or, with per_example_keys=False, the step key itself).
  """
  dp = parallel.DataParallel(max_devices=num_devices)

  def per_device(key, shard):
    b = shard.shape[0]
    device = jnp.full((b,), jax.lax.axis_index(parallel.AXIS))
    return nda(parallel.per_example_keys(key, b) if per_example_keys else key, shard), device

  spec = P(parallel.AXIS)
  run = dp.map_fn(per_device, in_specs=(P(), spec), out_specs=(spec, spec))
  out, device = jax.block_until_ready(run(step_key, dp.shard_batch(x)))
  # The run used the devices it claims: one shard of B / n samples on each.
  assert dp.num_devices == num_devices == len(out.sharding.device_set)
  np.testing.assert_array_equal(np.asarray(device), np.repeat(np.arange(num_devices),
                                                              B // num_devices))
  return np.asarray(out)


@pytest.mark.parametrize("case", list(_cases()), ids=_case_id)
def test_nda_is_independent_of_the_device_count(case):
  kind, name, params = case
  x = np.random.RandomState(0).uniform(-1, 1, SHAPES[kind]).astype(np.float32)
  cfg = {"name": name, "params": {n: params for n in name.split("+")}}
  step_key = jax.random.key(7)
  # One call on the whole batch, outside any mesh (eager: its ops are cached across tests).
  expected = np.asarray(BUILDERS[kind](cfg)(_example_keys(step_key, B), jnp.asarray(x)))
  assert np.any(expected != x) or name == "shift" and not params.get("per_sample", True), (
      "the NDA changed nothing")  # one shift for the batch may be a multiple of the side
  atol = 1e-6 if any(n in FLOAT_ARITHMETIC for n in name.split("+")) else 0.0
  nda = BUILDERS[kind](cfg, axis_name=parallel.AXIS)
  for n in DEVICE_COUNTS:
    np.testing.assert_allclose(_on_mesh(nda, n, step_key, x), expected, atol=atol, rtol=0,
                               err_msg=f"{n} devices")


@pytest.mark.parametrize("kind,name", [("image", "stitch"), ("image", "mixup"),
                                       ("video", "frame_jigsaw")])
def test_one_step_key_on_every_device_is_split_over_the_global_batch(kind, name):
  x = np.random.RandomState(2).uniform(-1, 1, SHAPES[kind]).astype(np.float32)
  cfg = {"name": name, "params": {name: {"per_sample": False}} if name == "mixup" else {}}
  step_key = jax.random.key(5)
  expected = np.asarray(BUILDERS[kind](cfg)(step_key, jnp.asarray(x)))
  nda = BUILDERS[kind](cfg, axis_name=parallel.AXIS)
  np.testing.assert_allclose(_on_mesh(nda, 4, step_key, x, per_example_keys=False), expected,
                             atol=1e-6, rtol=0)


def test_pmap_gives_the_single_call_result():
  x = np.random.RandomState(1).uniform(-1, 1, SHAPES["image"]).astype(np.float32)
  step_key = jax.random.key(3)
  expected = np.asarray(negative.mosaic(_example_keys(step_key, B), jnp.asarray(x)))
  dp = parallel.DataParallel(kind="pmap", max_devices=4)
  nda = negative.build_nda({"name": "mosaic"}, axis_name=parallel.AXIS)
  run = jax.pmap(lambda k, shard: nda(parallel.per_example_keys(k, shard.shape[0]), shard),
                 axis_name=parallel.AXIS, in_axes=(None, 0), devices=dp.devices)
  out = np.asarray(jax.block_until_ready(run(step_key, dp.shard_batch(x))))
  assert out.shape == (4, B // 4) + x.shape[1:]
  np.testing.assert_array_equal(out.reshape(x.shape), expected)


def test_partners_cross_device_boundaries():
  # The partners of a shard are drawn from the whole batch, not from the shard.
  n, x = 8, np.arange(B, dtype=np.float32).reshape(B, 1, 1, 1) * np.ones((1, 2, 2, 1), np.float32)
  nda = negative.build_nda({"name": "stitch"}, axis_name=parallel.AXIS)
  out = _on_mesh(nda, n, jax.random.key(0), x)
  partner = out[:, -1, -1, 0].astype(int)  # bottom-right pixel: always the partner's
  assert sorted(partner) == list(range(B)) and np.all(partner != np.arange(B))
  assert np.any(partner // (B // n) != np.arange(B) // (B // n))
