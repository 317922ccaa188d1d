"""The MoCo method: queue, momentum encoder, BN groups on 1 vs 8 devices, NDA negatives,
on-device views, main's exact resume with the kNN monitor, config validation.

The step is observed through spies, not re-implemented: `losses.moco_infonce` and
`images.normalize_input` are wrapped (while the step is traced) to return what the step
hands them -- the queries, keys, NDA keys and queue given to the loss, and the views
given to the encoders -- gathered over the devices into the metrics. Spied programs
are the same for every test of a config (compiled once, cached on disk).
"""
import contextlib
import functools
import json
import os
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import notebook_runs
import step_spy
from configs import demo_moco
from nda_jax import checkpoint as ckpt_lib
from nda_jax import images as images_lib
from nda_jax import logs
from nda_jax import losses
from nda_jax import parallel
from nda_jax import trainers
from nda_jax.trainers import loop
from nda_jax.trainers import method as method_lib
from nda_jax.trainers import moco

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, S, K = 32, 16, 64    # demo_moco:tiny's batch and image size; a queue of 2 batches
SPY = "spy/"


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  c = demo_moco.get_config("tiny")
  c.checkpoint.async_save = False
  c.moco.queue_size = K
  c.update_from_flattened_dict(overrides)
  return c


# The step programs of this module (each compiles once); 'variants' also turns off the
# colour ops so that a view's geometry can be read back from a coordinate-ramp image.
CONFIGS = {
    "nda": {},
    "weight0": {"nda.weight": 0.0},
    "off": {"nda.enabled": False},
    "variants": {"nda.scope": "batch", "nda.source": "image", "nda.enqueue": True,
                 "aug.p_jitter": 0.0, "aug.p_gray": 0.0, "aug.p_blur": 0.0},
}


# ---------------------------------------------------------------- spies and runners
def _gather(x):
  return jax.lax.all_gather(x, parallel.AXIS, tiled=True)


@contextlib.contextmanager
def spying():
  """While active, a traced MoCo step reports its loss inputs and views as metrics."""
  real_loss, real_norm = losses.moco_infonce, images_lib.normalize_input
  views = []

  def normalize_input(config, images):
    views.append(images)   # In call order: key view, [NDA view], query view.
    return real_norm(config, images)

  def moco_infonce(q, k, queue, nda_k, **kwargs):
    loss, metrics = real_loss(q, k, queue, nda_k, **kwargs)
    seen = {"q": _gather(q), "k": _gather(k), "queue": queue,
            "key_view": _gather(views[0]), "query_view": _gather(views[-1])}
    if nda_k is not None:
      seen["nda_k"] = nda_k if kwargs["nda_scope"] == "batch" else _gather(nda_k)
      seen["nda_view"] = _gather(views[1])
    views.clear()
    return loss, {**metrics, **{SPY + name: x for name, x in seen.items()}}

  losses.moco_infonce, images_lib.normalize_input = moco_infonce, normalize_input
  try:
    yield
  finally:
    losses.moco_infonce, images_lib.normalize_input = real_loss, real_norm


@functools.cache
def runner(name: str, devices: int):
  """(DataParallel, jitted step) of CONFIGS[name] on `devices` devices, built once."""
  dp = parallel.DataParallel("shard_map", devices)
  method = moco.MoCo(tiny_config(**CONFIGS[name]))
  method.validate(dp.num_devices)
  return dp, dp.step(method.make_step())


@functools.cache
def initial_state():
  """The canonical initial state on the host (the same for every config here)."""
  return jax.device_get(moco.MoCo(tiny_config()).init_state(jax.random.PRNGKey(0)))


def random_images(step: int) -> np.ndarray:
  return np.random.RandomState(step).randint(0, 256, (B, S, S, 3)).astype(np.uint8)


def run_steps(name, devices, num=1, state=None, images=random_images):
  """`num` steps; (host states after each step, host metrics, the devices each step used)."""
  dp, step = runner(name, devices)
  carry = dp.put_state(initial_state() if state is None else state)
  states, metrics, used = [], [], []
  for i in range(num):
    batch = dp.shard_batch({"image": images(i)})
    assert batch["image"].dtype == np.uint8   # The host sends uint8; views are made on device.
    with spying():
      carry, m = step(carry, batch)
    jax.block_until_ready(m)
    shard_rows = {s.data.shape[0] for s in batch["image"].addressable_shards}
    used.append((len(batch["image"].sharding.device_set), shard_rows,
                 len(carry.queue.sharding.device_set)))
    states.append(jax.device_get(dp.get_state(carry)))
    metrics.append(jax.device_get(m))
  return states, metrics, used


@pytest.fixture(scope="module")
def nda_1():
  return run_steps("nda", 1, num=3)


@pytest.fixture(scope="module")
def nda_8():
  return run_steps("nda", 8, num=3)


def numpy_infonce(seen, temperature, weight=0.0, scope=None):
  """MoCo's InfoNCE from the formula (float64), over the global batch."""
  q, k, queue = (np.asarray(seen[SPY + n], np.float64) for n in ("q", "k", "queue"))
  logits = [np.sum(q * k, -1, keepdims=True), q @ queue.T]
  if scope is not None:
    nda = np.asarray(seen[SPY + "nda_k"], np.float64)
    sims = np.sum(q * nda, -1, keepdims=True) if scope == "own" else q @ nda.T
    logits.append(sims + temperature * np.log(weight))
  logits = np.concatenate(logits, -1) / temperature
  top = logits.max(-1)
  lse = top + np.log(np.exp(logits - top[:, None]).sum(-1))
  return float(np.mean(lse - logits[:, 0]))


def leaves(tree):
  return [(jax.tree_util.keystr(p), np.asarray(x)) for p, x in
          jax.tree_util.tree_leaves_with_path(tree)]


def assert_leaves_close(a, b, what: str = "") -> None:
  """Each leaf of `a` within 2e-5 of the largest magnitude of `b`'s (+1e-7): two runs
  that sum the same numbers in another order (see test_one_device_equals_eight_devices)."""
  for (name, x), (_, y) in zip(leaves(a), leaves(b)):
    scale = np.abs(y).max() if y.size else 0.0
    np.testing.assert_allclose(x, y, rtol=0, atol=2e-5 * scale + 1e-7, err_msg=f"{what} {name}")


# ---------------------------------------------------------------- the queue
def test_enqueue_is_a_ring_buffer_of_the_last_keys():
  rng = np.random.default_rng(0)
  n, size, dim = 4, 12, 5
  queue, ptr = rng.standard_normal((size, dim)).astype(np.float32), np.int32(0)
  pushed = []
  fn = jax.jit(moco.enqueue)
  for _ in range(5):   # 5 batches of 4 into 12 rows: wraps around once.
    keys = rng.standard_normal((n, dim)).astype(np.float32)
    pushed.append(keys)
    queue, ptr = fn(queue, ptr, keys)
  last = np.concatenate(pushed)[-size:]    # oldest first
  queue, ptr = np.asarray(queue), int(ptr)
  assert ptr == (5 * n) % size == 8
  np.testing.assert_array_equal(np.concatenate([queue[ptr:], queue[:ptr]]), last)
  with pytest.raises(ValueError, match="queue of 12 keys cannot take batches of 5"):
    moco.enqueue(queue, ptr, np.zeros((5, dim), np.float32))


@pytest.mark.parametrize("devices", [1, 8])
def test_queue_holds_the_last_k_keys_in_order(devices, nda_1, nda_8):
  states, metrics, _ = nda_1 if devices == 1 else nda_8
  keys = [m[SPY + "k"] for m in metrics]
  assert keys[0].shape == (B, tiny_config().model.head_dim)   # the global batch
  # The loss sees the queue as it was before the step (MoCo enqueues after the logits).
  # (Spied arrays went through the step's pmean of the metrics: equal to float round-off.)
  for before, m in zip([initial_state()] + states, metrics):
    np.testing.assert_allclose(m[SPY + "queue"], before.queue, rtol=0, atol=1e-6)
  # K = 2B, 3 steps: the ring holds steps 2 and 3 (oldest first from the pointer).
  final = states[-1]
  ptr = int(final.queue_ptr)
  assert ptr == (3 * B) % K == B
  ring = np.concatenate([final.queue[ptr:], final.queue[:ptr]])
  np.testing.assert_allclose(ring, np.concatenate(keys[1:]), rtol=0, atol=1e-6)
  # The keys are distinct unit vectors, so a wrong order or a stale row cannot pass.
  np.testing.assert_allclose(np.linalg.norm(ring, axis=-1), 1.0, atol=1e-5)
  assert np.abs(keys[1] - keys[2]).max() > 0.1


# ---------------------------------------------------------------- momentum encoder
def _perturbed(tree, seed, scale):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: (x + scale * (np.std(x) + 1e-3) * rng.standard_normal(x.shape)).astype(x.dtype),
      tree)


def test_momentum_update_comes_first_and_key_encoder_gets_no_gradient(nda_1):
  m = tiny_config().moco.momentum
  base = nda_1[0][0]   # after one step: the query encoder has moved away from the key encoder
  start = base.replace(key_params=_perturbed(base.key_params, 1, 0.1))
  (after,), (seen,), _ = run_steps("nda", 1, state=start)
  for (name, k0), (_, q0), (_, q1), (_, k1) in zip(
      leaves(start.key_params), leaves(start.params), leaves(after.params),
      leaves(after.key_params)):
    expected = m * k0.astype(np.float64) + (1 - m) * q0
    scale = np.abs(k0).max() + 1e-3
    np.testing.assert_allclose(k1, expected, rtol=0, atol=1e-6 * scale, err_msg=name)
  # The query encoder is trained (SGD moved it), and with the pre-step query params above:
  # the updated ones would not do.
  moved = [not np.allclose(a, b) for (_, a), (_, b) in zip(leaves(start.params),
                                                          leaves(after.params))]
  assert all(moved)
  post = [m * k0 + (1 - m) * q1 for (_, k0), (_, q1) in zip(leaves(start.key_params),
                                                           leaves(after.params))]
  wrong = [not np.allclose(k1, p, rtol=0, atol=1e-6 * (np.abs(p).max() + 1e-3))
           for (_, k1), p in zip(leaves(after.key_params), post)]
  assert np.mean(wrong) > 0.5

  # Keys come from the UPDATED key encoder: two states whose key encoders differ but
  # update to the same one (K + e with Q - e m/(1-m)) give the same keys...
  e = jax.tree.map(lambda a, b: a - b, _perturbed(start.key_params, 2, 0.01), start.key_params)
  same = start.replace(key_params=jax.tree.map(lambda k, d: k + d, start.key_params, e),
                       params=jax.tree.map(lambda q, d: (q - d * m / (1 - m)).astype(q.dtype),
                                           start.params, e))
  (_,), (seen_same,), _ = run_steps("nda", 1, state=same)
  np.testing.assert_allclose(seen_same[SPY + "k"], seen[SPY + "k"], rtol=0, atol=2e-4)
  # ... while the same change of the key encoder alone changes them.
  other = start.replace(key_params=same.key_params)
  (_,), (seen_other,), _ = run_steps("nda", 1, state=other)
  assert np.abs(seen_other[SPY + "k"] - seen[SPY + "k"]).max() > 1e-2


# ---------------------------------------------------------------- BN groups, devices
# 1 vs 8 devices sum BN moments, the loss and the gradients in another order (one device
# vs 8 partial sums + psum). bench/device_drift.py measures each quantity of one step
# (max |1 dev - 8 dev| over the quantity's scale), this CPU, demo_moco:tiny:
#   float32: views 0 (bit-equal), BN group statistics <= 1.9e-6, module outputs, q, k,
#     NDA keys, logits <= 1.5e-6, loss 0; gradients: median leaf 5.5e-3, worst 3.7e-2
#     (layer3_0 conv2). The gradients part at ONE ReLU input of 278,528: layer3_0's
#     output at one position is +6.0e-7 on 1 device and exactly 0 on 8 (6.5e-8 of the
#     layer's scale), so its gradient passes on one run and not on the other, and every
#     gradient below it moves (up to 3.7e-2 of a leaf's scale).
#   float64, the same code: every quantity and gradient <= 7.8e-15; that is the check a
#     wrong psum, group or pmean cannot pass (test_..._in_float64).
# So float32 forward quantities get 2e-5 of their scale (10x the measured), the gradients
# 0.3 of each leaf's scale (8x the one kink measured; gradients psum'd instead of pmean'd
# give 7.0 on all 64 leaves, BN moments not psum'd give q 0.56 apart and NaN gradients), and
# each step restarts from the 1-device state so that drift does not compound.
FORWARD_TOL = 2e-5
GRADIENT_KINK = 0.3
FLOAT64_TOL = 1e-12


def rel(a, b) -> float:
  """max |a - b| over max |b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = np.abs(b).max(initial=0.0)
  return np.abs(a - b).max(initial=0.0) / scale if scale else np.abs(a).max(initial=0.0)


def gradients(before, after) -> dict[str, np.ndarray]:
  """One step's gradient: SGD's trace after it less momentum x the trace before and
  the coupled weight decay (torch's SGD)."""
  opt = tiny_config().optim.encoder
  params = dict(leaves(before.params))
  trace = lambda s: {n.split(".trace", 1)[1]: x.astype(np.float64) for n, x in leaves(s.opt)
                     if ".trace" in n}
  t0, t1 = trace(before), trace(after)
  return {n: t1[n] - opt.momentum * t0[n] - opt.weight_decay * params[n] for n in t1}


def test_one_device_equals_eight_devices(nda_1):
  """One BN-group layout, whatever the device count: 3 steps on 1 device, each rerun on 8
  devices from the same state (see FORWARD_TOL for the bounds and their measurement)."""
  states1, metrics1, used1 = nda_1
  assert jax.device_count() == 8
  assert used1 == [(1, {B}, 1)] * 3
  for i, (s0, s1, m1) in enumerate(zip([initial_state()] + states1[:-1], states1, metrics1)):
    (s8,), (m8,), used8 = run_steps("nda", 8, state=s0, images=lambda _, i=i: random_images(i))
    # (devices holding the batch, rows per device, devices holding the state)
    assert used8 == [(8, {B // 8}, 8)]
    assert int(s1.step) == int(s8.step) == i + 1
    for name in ("query_view", "key_view", "nda_view", "q", "k", "nda_k"):
      assert rel(m8[SPY + name], m1[SPY + name]) <= FORWARD_TOL, (i, name)
    for name in ("loss", "top1", "pos_sim", "queue_sim", "nda_sim", "nda_beats_pos", "lr"):
      np.testing.assert_allclose(m8[name], m1[name], rtol=FORWARD_TOL, atol=1e-6, err_msg=name)
    for part in ("batch_stats", "key_batch_stats"):   # this step's group statistics
      for (name, old), (_, x1), (_, x8) in zip(leaves(getattr(s0, part)),
                                               leaves(getattr(s1, part)),
                                               leaves(getattr(s8, part))):
        assert rel(x8 - old, x1 - old) <= FORWARD_TOL, (i, part, name)
    for (name, x1), (_, x8) in zip(leaves(s1.key_params), leaves(s8.key_params)):
      np.testing.assert_array_equal(x8, x1, err_msg=name)   # m k + (1 - m) q of one state
    assert rel(s8.queue, s1.queue) <= FORWARD_TOL
    g1, g8 = gradients(s0, s1), gradients(s0, s8)
    for name in g1:
      assert rel(g8[name], g1[name]) <= GRADIENT_KINK, (i, name, rel(g8[name], g1[name]))
  # Guard: one step moves the parameters far more than FORWARD_TOL.
  init = initial_state()
  moved = [np.abs(a - b).max() / np.abs(b).max() for (_, a), (_, b) in
           zip(leaves(init.params), leaves(states1[0].params))]
  assert np.median(moved) > 1e-3, moved


@contextlib.contextmanager
def float64():
  """The product's float32 read as float64 while programs are traced: x64 on,
  `jnp.float32` and config.dtype='float32' mean float64 (host batches are uint8/int32)."""
  with jax.enable_x64(True), mock.patch.object(jnp, "float32", jnp.float64), \
      mock.patch.dict(method_lib.DTYPES, {"float32": jnp.float64}):
    yield


def step_in_float64(method, devices: int, state, batch: dict, batch_axis: int = 0):
  """One step of `method` on `devices` devices in float64 from a (float32) host state."""
  def up(x):
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.floating):
      return x.astype(np.float64)
    return x.astype(np.int64) if x.dtype == np.int32 and not x.ndim else x   # x64 indices
  with float64():
    dp = parallel.DataParallel("shard_map", devices)
    step = dp.step(method.make_step(), batch_axis=batch_axis)
    after, metrics = step(dp.put_state(jax.tree.map(up, state)),
                          dp.shard_batch(batch, batch_axis=batch_axis))
    return jax.device_get(dp.get_state(after)), dp.unreplicate_metrics(metrics)


def assert_float64_runs_agree(one, eight) -> None:
  """Every floating leaf is float64 and within FLOAT64_TOL of its scale."""
  checked = 0
  for (name, x1), (_, x8) in zip(leaves(one), leaves(eight)):
    if np.issubdtype(x1.dtype, np.floating):
      assert x1.dtype == x8.dtype == np.float64, name
      assert rel(x8, x1) <= FLOAT64_TOL, (name, rel(x8, x1))
      checked += 1
  assert checked > 10


def test_one_device_equals_eight_devices_in_float64():
  """In float64 the reordered sums agree to ~1e-14 (measured <= 7.8e-15 of a leaf's scale,
  see FORWARD_TOL): what a missing psum or pmean, or a per-device BN group, cannot pass."""
  method = moco.MoCo(tiny_config())
  batch = {"image": random_images(0)}
  (one, m1), (eight, m8) = (step_in_float64(method, n, initial_state(), batch) for n in (1, 8))
  assert_float64_runs_agree(one, eight)
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=FLOAT64_TOL)
  # Guard: the step moved the state far more than the bound.
  assert np.median([rel(a, b) for (_, a), (_, b) in
                    zip(leaves(one.params), leaves(initial_state().params))]) > 1e-3


# ---------------------------------------------------------------- NDA negatives
@pytest.fixture(scope="module")
def one_step_each():
  return {name: run_steps(name, 1) for name in ("weight0", "off")}


def test_weight_zero_is_plain_moco_exactly(one_step_each):
  (w0,), (m_w0,), _ = one_step_each["weight0"]
  (off,), (m_off,), _ = one_step_each["off"]
  for name in ("loss", "top1", "pos_sim", "queue_sim"):
    assert m_w0[name] == m_off[name], name
  for (name, a), (_, b) in zip(leaves(w0), leaves(off)):
    np.testing.assert_array_equal(a, b, err_msg=name)
  # The NDA keys were computed (and scored) in the weight-0 run, just not used.
  assert SPY + "nda_k" in m_w0 and SPY + "nda_k" not in m_off
  assert m_w0["nda_sim"] != 0 and m_off["nda_sim"] == 0


def test_nda_weight_enters_the_loss(nda_1, one_step_each):
  (nda,), (m_nda,), _ = [x[:1] for x in nda_1]
  (_,), (m_w0,), _ = one_step_each["weight0"]
  c = tiny_config()
  assert c.nda.weight == 1.0 and c.nda.scope == "own"
  np.testing.assert_allclose(
      m_nda["loss"], numpy_infonce(m_nda, c.moco.temperature, 1.0, "own"), rtol=1e-5)
  np.testing.assert_allclose(m_w0["loss"], numpy_infonce(m_w0, c.moco.temperature), rtol=1e-5)
  assert m_nda["loss"] > m_w0["loss"] + 1e-3   # an extra negative can only raise the loss
  # Same keys in both; the NDA pass leaves the key encoder's BN averages as without NDA.
  np.testing.assert_array_equal(m_nda[SPY + "k"], m_w0[SPY + "k"])
  (off,), _, _ = one_step_each["off"]
  for (name, a), (_, b) in zip(leaves(nda.key_batch_stats), leaves(off.key_batch_stats)):
    np.testing.assert_array_equal(a, b, err_msg=name)
  assert not np.allclose(m_nda[SPY + "nda_view"], m_nda[SPY + "query_view"])


def ramp_images(step: int) -> np.ndarray:
  """Channel 0 = 17 x column, channel 1 = 17 x row (0..255): a view's pixels name their
  source coordinates. Channel 2 is noise, which varies with the step."""
  x = np.broadcast_to(17 * np.arange(S)[None, :], (S, S))
  img = np.stack([x, x.T, np.random.RandomState(step).randint(0, 256, (S, S))], -1)
  return np.broadcast_to(img, (B, S, S, 3)).astype(np.uint8)


def decode_boxes(views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(top, left, h, w) and flips of crop+resize views of ramp_images (no colour ops).

  Output pixel j samples the source at left + (j + 0.5) w / S - 0.5 (bilinear, exact on a
  ramp away from the source's border), so the interior columns give w and left.
  """
  coords = (views[..., :2].astype(np.float64) + 1) * 127.5 / 17   # source coordinates
  x = coords[:, S // 2, :, 0]   # along a row: column coordinate
  y = coords[:, :, S // 2, 1]   # along a column: row coordinate
  flip = x[:, -2] < x[:, 1]
  x = np.where(flip[:, None], x[:, ::-1], x)
  j = np.arange(2, S - 1)
  fit = lambda v: np.polyfit(j + 0.5, v[:, 2:S - 1].T, 1)   # slope, intercept per view
  (sx, ix), (sy, iy) = fit(x), fit(y)
  w, h = sx * S, sy * S
  left, top = ix + 0.5, iy + 0.5
  return np.stack([top, left, h, w], -1), flip


@pytest.fixture(scope="module")
def variants_run():
  return run_steps("variants", 8, num=2, images=ramp_images)


def test_batch_scope_image_source_and_enqueued_nda_keys(variants_run):
  states, metrics, used = variants_run
  c = tiny_config(**CONFIGS["variants"])
  assert used == [(8, {B // 8}, 8)] * 2
  for m in metrics:
    assert all(np.isfinite(m[k]).all() for k in m), m
    # 'batch': every query is contrasted with the NDA keys of the whole global batch.
    assert m[SPY + "nda_k"].shape == (B, c.model.head_dim)
    np.testing.assert_allclose(m["loss"], numpy_infonce(m, c.moco.temperature, 1.0, "batch"),
                               rtol=1e-5)
  # enqueue=True: each step enqueues its B keys then its B NDA keys (K = 2B: all of it).
  for state, m in zip(states, metrics):
    assert int(state.queue_ptr) == 0
    np.testing.assert_allclose(state.queue, np.concatenate([m[SPY + "k"], m[SPY + "nda_k"]]),
                               rtol=0, atol=1e-6)
  # 'image': the NDA view is an aug+ view of the NDA image, not an NDA of the query view.
  nda_view, query_view = metrics[0][SPY + "nda_view"], metrics[0][SPY + "query_view"]
  assert nda_view.shape == query_view.shape == (B, S, S, 3)


def test_views_are_made_on_device_within_their_ranges(variants_run):
  """The step gets uint8 images; its views are aug+ crops (scale, ratio) with flips."""
  _, metrics, _ = variants_run
  c = tiny_config(**CONFIGS["variants"])
  scale, ratio = tuple(c.aug.scale), (3 / 4, 4 / 3)
  for m in metrics:
    q_view, k_view = m[SPY + "query_view"], m[SPY + "key_view"]
    assert q_view.dtype == np.float32 and q_view.shape == (B, S, S, 3)
    assert q_view.min() >= -1 and q_view.max() <= 1
    boxes, flips = [], []
    for view in (q_view, k_view):
      box, flip = decode_boxes(view)
      boxes.append(box)
      flips.append(flip)
      top, left, h, w = box.T
      # Integer boxes (the decoding is right), inside the image, area and aspect in range
      # (up to the rounding of h and w to whole pixels).
      np.testing.assert_allclose(box, np.round(box), atol=0.05)
      assert (top >= -0.05).all() and (left >= -0.05).all()
      assert (top + h <= S + 0.05).all() and (left + w <= S + 0.05).all()
      area = h * w
      assert (area >= scale[0] * S * S - (h + w) / 2 - 0.25).all(), area
      assert (area <= scale[1] * S * S + 0.05).all(), area
      assert ((w + 0.5) / (h - 0.5) >= ratio[0]).all() and ((w - 0.5) / (h + 0.5) <= ratio[1]).all()
      assert 0 < flip.sum() < B   # p_flip=0.5: some flipped, some not
    # Two independent views per image, and per image its own draw.
    assert np.mean(np.any(np.abs(boxes[0] - boxes[1]) > 0.5, -1) | (flips[0] != flips[1])) > 0.5
    assert len({tuple(np.round(b)) for b in boxes[0]}) > B // 2


# ---------------------------------------------------------------- main: train, resume, kNN
def test_main_trains_checkpoints_resumes_exactly_and_reports_knn(tmp_path, monkeypatch):
  """4 steps straight == 2 steps, then `main` resuming to 4, bit for bit.

  A constant learning rate: the first part stops by having total_steps=2, which would
  otherwise change its cosine schedule. The first two runs are in-process (the loop
  main hands over to), the resume is the command line.
  """
  def config(steps):
    c = demo_moco.get_config("tiny")
    c.checkpoint.async_save = False
    c.optim.encoder.schedule = "constant"
    c.train.total_steps = steps
    return c
  # Record what the loop hands the step (while it is traced): uint8 host images.
  seen = step_spy.record_batches(monkeypatch, moco.MoCo)
  straight, split = tmp_path / "straight", tmp_path / "split"
  loop.train_and_evaluate(config(4), str(straight))
  assert seen and all(s == (np.uint8, (B // 8, S, S, 3)) for s in seen), seen
  loop.train_and_evaluate(config(2), str(split))
  assert ckpt_lib.Checkpointer(str(split)).latest_step() == 2

  proc = subprocess.run(
      [sys.executable, "-m", "nda_jax.main", f"--config={REPO}/configs/demo_moco.py:tiny",
       f"--workdir={split}", "--config.checkpoint.async_save=False",
       "--config.optim.encoder.schedule=constant"],
      capture_output=True, text=True, cwd=REPO, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from step 2" in proc.stderr
  assert ckpt_lib.Checkpointer(str(split)).latest_step() == 4
  assert json.load(open(split / "config.json"))["trainer"] == "moco"

  records = logs.read_metrics(str(split))
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]   # restarted at 3
  knn = [(r["step"], r["knn_top1"]) for r in records if "knn_top1" in r]
  assert [s for s, _ in knn] == [2, 4] and all(0 <= v <= 1 for _, v in knn), knn
  straight_knn = [r["knn_top1"] for r in logs.read_metrics(str(straight)) if "knn_top1" in r]
  assert straight_knn == [knn[-1][1]]

  a = trainers.load_run(str(straight), config=config(4))[2]
  b = trainers.load_run(str(split), config=config(4))[2]
  assert int(a.step) == int(b.step) == 4
  for (name, x), (_, y) in zip(leaves(a), leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=name)


# ---------------------------------------------------------------- config validation
@pytest.mark.parametrize("overrides, fragments", [
    ({"moco.queue_size": 80}, ("config.moco.queue_size=80", "multiple", "32")),
    ({"model.bn_group_size": 16}, ("config.model.bn_group_size=16", "at least 3")),  # 2 groups
    ({"nda.scope": "global"}, ("config.nda.scope='global'", "'own', 'batch'")),
    ({"nda.enqueue": True, "moco.queue_size": 96}, ("config.nda.enqueue", "multiple of 64")),
])
def test_bad_config_names_the_key(overrides, fragments):
  with pytest.raises(ValueError) as info:
    loop.devices_and_method(tiny_config(**overrides))  # What main runs before the workdir.
  for fragment in fragments:
    assert fragment in str(info.value)


def test_good_config_passes():
  for c in (tiny_config(), tiny_config(**CONFIGS["variants"])):
    dp, method = loop.devices_and_method(c)
    assert isinstance(method, moco.MoCo) and method.config is c
    assert dp.num_devices == len(jax.devices())


# ---------------------------------------------------------------- the notebook
def test_notebook_shows_nearest_neighbours_of_a_run(tmp_path, monkeypatch):
  """notebooks/explore_moco.ipynb on a 2-step run: no error, the neighbour grid drawn,
  and the label agreement it prints equals one computed here from the digits loaded
  directly (not through the pipeline) and the run's embedder."""
  from nda_jax.data import digits
  run = tmp_path / "run"
  loop.train_and_evaluate(tiny_config(**{"train.total_steps": 2}), str(run))
  monkeypatch.setenv("NDA_WORKDIR", str(run))
  outputs = notebook_runs.run("explore_moco.ipynb")
  assert not [o for o in outputs if o.output_type == "error"]
  assert [o for o in outputs if "image/png" in o.get("data", {})]
  text = "".join(o.get("text", "") for o in outputs)
  printed = float(text.split("label agreement (top 5): ")[1].split()[0])

  config, _, state = trainers.load_run(str(run))
  embed = moco.make_embedder(config)
  (train, train_y), (test, test_y) = (digits.load_digits(s, S) for s in ("train", "test"))
  unit = lambda f: np.asarray(f) / np.linalg.norm(np.asarray(f), axis=1, keepdims=True)
  similarity = unit(embed(state, test)) @ unit(embed(state, train)).T
  top5 = np.argsort(-similarity, axis=1)[:, :5]
  np.testing.assert_allclose(printed, np.mean(train_y[top5] == test_y[:, None]), atol=1e-4)


# ------------------------------------------------------------------ online linear probe
PROBE = {"online_probe.enabled": True, "online_probe.optim.schedule": "constant"}


def _probe_runner(overrides):
  dp = parallel.DataParallel("shard_map", 1)
  method = moco.MoCo(tiny_config(**overrides))
  method.validate(dp.num_devices)
  return dp, method, dp.step(method.make_step())


def test_online_probe_features_are_stop_gradient():
  """One step with and without the probe: the encoders, BN statistics, optimizer and queue
  are the same numbers (the probe sees the features, no gradient flows back)."""
  images = random_images(0)
  labels = np.random.RandomState(1).randint(0, 10, B).astype(np.int32)
  out = {}
  for name, overrides in (("off", {}), ("probe", PROBE)):
    dp, method, step = _probe_runner(overrides)
    state = dp.put_state(method.init_state(jax.random.PRNGKey(0)))
    state, metrics = step(state, dp.shard_batch({"image": images, "label": labels}))
    out[name] = (jax.device_get(dp.get_state(state)), jax.device_get(metrics))
  (off, off_metrics), (probe, probe_metrics) = out["off"], out["probe"]
  for field in ("params", "batch_stats", "key_params", "key_batch_stats", "opt", "queue"):
    for (name, x), (_, y) in zip(leaves(getattr(probe, field)), leaves(getattr(off, field))):
      np.testing.assert_array_equal(x, y, err_msg=f"{field} {name}")
  assert off.probe is None and off_metrics["loss"] == probe_metrics["loss"]
  # Zero-initialised probe: uniform logits, cross-entropy log(10), then it moves.
  np.testing.assert_allclose(probe_metrics["probe_loss"], np.log(10), rtol=1e-6)
  assert np.abs(probe.probe["kernel"]).max() > 0


def test_online_probe_learns_a_separable_toy_and_serves_classify_fn():
  """Dark images are class 0, bright ones class 1: train top-1 reaches 1, and classify_fn
  (centre crops, inference-mode BN) gets held-out images right.

  Without colour jitter: its brightness factor (0.6-1.4) makes dark and bright views
  overlap (with it, train top-1 measured 0.96 over steps 25-29, not separable).
  """
  def toy(seed, n=B):
    rng = np.random.RandomState(seed)
    labels = rng.randint(0, 2, n).astype(np.int32)
    low = np.where(labels == 0, 0, 170)[:, None, None, None]
    return (low + rng.randint(0, 86, (n, S, S, 3))).astype(np.uint8), labels

  dp, method, step = _probe_runner({**PROBE, "train.total_steps": 30, "aug.p_jitter": 0.0})
  state = dp.put_state(method.init_state(jax.random.PRNGKey(0)))
  top1 = []
  for i in range(30):
    images, labels = toy(i)
    state, metrics = step(state, dp.shard_batch({"image": images, "label": labels}))
    top1.append(float(jax.device_get(metrics)["probe_top1"]))
  assert top1[0] < 0.9 and np.mean(top1[-5:]) == 1.0, top1
  images, labels = toy(100, n=64)
  logits = np.asarray(method.make_eval_fns(dp)["classify_fn"](state, images))
  assert logits.shape == (64, 10)
  assert np.mean(np.argmax(logits, -1) == labels) > 0.9
