"""DPC model: R2D3D shapes and size, block-wise encoding, ConvGRU, fed-back predictions, BN."""
import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from nda_jax import parallel
from nda_jax.models import batch_norm, dpc
from nda_jax.models.batch_norm import BNGroups

# The demo size: 4 blocks of 4 frames at 64x64 (a 2x2 grid), width 8 (32-d
# features); observe 2 blocks, predict 2, so one prediction is fed back.
MODEL = dpc.DPC(width=8, num_seq=4, seq_len=4, pred_step=2, gru_dropout=0.5)
SIZE = 64
GRID = 2
D = 32


def _clips(batch, seed=0, model=MODEL, size=SIZE):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(-1, 1, (batch, model.num_seq * model.seq_len, size, size, 3)),
                     jnp.float32)


def _fill(shapes, seed=0):
  """Random variables of a variable tree from NumPy: a real init costs ~40 s of XLA:CPU
  compile time (one RNG op per variable); running statistics away from (0, 1) so that
  using them or not shows."""
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if name.endswith("['var']"):
      return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype)
    if name.endswith("['scale']"):
      return jnp.asarray(1 + 0.1 * rng.standard_normal(s.shape), s.dtype)
    if name.endswith(("['mean']", "['bias']")):
      return jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype)
    fan_in = np.prod(s.shape[:-1])
    return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(fan_in), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def variables():
  return _fill(jax.eval_shape(lambda: MODEL.init(jax.random.key(0), _clips(1), train=False)))


_encode = jax.jit(lambda v, x: MODEL.apply(v, x, method=dpc.DPC.encode))
_eval = jax.jit(lambda v, x: MODEL.apply(v, x, train=False))
_context = jax.jit(lambda v, x: MODEL.apply(v, x, method=dpc.DPC.context))


@functools.partial(jax.jit, static_argnames="num_groups")
def _train(v, x, ids, keys, num_groups):
  groups = BNGroups(ids=ids, num=num_groups)
  return MODEL.apply(v, x, train=True, groups=groups, dropout_keys=keys, mutable=["batch_stats"])


def _keys(batch, seed=1):
  return jax.random.split(jax.random.key(seed), batch)


# ------------------------------------------------------------------ shapes, size, init

@pytest.mark.parametrize("depth", [18, 34])
@pytest.mark.parametrize("size", [32, 64, 112])
def test_shapes(depth, size):
  """Grid ceil(size / 32): 32 -> 1x1, 64 -> 2x2, 112 -> 4x4 (five ceil(n / 2) halvings)."""
  model = dpc.DPC(depth=depth, width=8, num_seq=4, seq_len=4, pred_step=2)
  x = _clips(2, model=model, size=size)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  grid = {32: 1, 64: 2, 112: 4}[size]
  assert dpc.grid_size(size) == grid
  pred, target, context = jax.eval_shape(lambda v: model.apply(v, x, train=False), shapes)
  assert pred.shape == target.shape == (2, 2, grid * grid, 32)
  assert context.shape == (2, 32)
  feats = jax.eval_shape(lambda v: model.apply(v, x, method=dpc.DPC.encode), shapes)
  assert feats.shape == (2, 4, grid, grid, 32)
  num_blocks = {18: 2, 34: 6}[depth]  # stage 3's blocks
  assert len([k for k in shapes["params"]["encoder"] if k.startswith("layer3_")]) == num_blocks


def test_dpc_defaults_are_the_paper_setting():
  """128 px, 8 blocks x 5 frames, predict 3: a 4x4 grid of 256-d features; 5 frames -> 2."""
  model = dpc.DPC()
  x = jnp.zeros((2, 40, 128, 128, 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  pred, target, context = jax.eval_shape(lambda v: model.apply(v, x, train=False), shapes)
  assert pred.shape == target.shape == (2, 3, 16, 256) and context.shape == (2, 256)
  enc = dpc.R2D3D()
  blocks = jnp.zeros((2, 8, 5, 128, 128, 3))
  out = jax.eval_shape(lambda: enc.init_with_output(jax.random.key(0), blocks, train=False,
                                                    groups=None)[0])
  assert out.shape == (2, 8, 2, 4, 4, 256)


def test_param_count_r18_full_width():
  """R18-2D3D at width 64, counted by hand from DPC's layer list (no conv biases; BN: 2C):

  stem   conv 1x7x7 3->64: 7*7*3*64 = 9,408; BN 128                              ->     9,536
  layer1 (1x3x3, 64): 2 blocks x (2 convs 3*3*64*64 = 36,864 + 2 BN 128)          ->   147,968
  layer2 (1x3x3, 128, stride 2): block0 3*3*64*128 = 73,728 + 3*3*128*128 = 147,456
         + 2 BN 256 + proj 1x1 64*128 = 8,192 + BN 256 = 230,144;
         block1 2 * 147,456 + 512 = 295,424                                         ->   525,568
  layer3 (3x3x3, 256, stride 2): block0 27*128*256 = 884,736 + 27*256*256 = 1,769,472
         + 1,024 + proj 128*256 = 32,768 + 512 = 2,688,512; block1 2 * 1,769,472 + 1,024
         = 3,539,968                                                                -> 6,228,480
  layer4 (3x3x3, 256, stride 2): block0 3,539,968 + proj 256*256 = 65,536 + 512
         = 3,606,016; block1 3,539,968                                              -> 7,145,984
  encoder total                                                                       14,057,536
  ConvGRU (kernel 1): 3 gates x (512*256 + 256) = 393,984; head: 2 x (256*256 + 256) = 131,584.
  """
  encoder = 9_536 + 147_968 + 525_568 + 6_228_480 + 7_145_984
  assert encoder == 14_057_536
  model = dpc.DPC()
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 40, 128, 128, 3)),
                                             train=False))["params"]
  count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))
  assert count(shapes["encoder"]) == encoder
  assert count(shapes["agg"]) == 3 * (512 * 256 + 256)
  assert count(shapes["pred_hidden"]) + count(shapes["pred_out"]) == 2 * (256 * 256 + 256)
  assert count(shapes) == encoder + 393_984 + 131_584


def test_init_follows_dpc():
  """Encoder convs Kaiming-normal fan_out (untruncated), BN (1, 0); GRU/head orthogonal, bias 0."""
  # An rbg key halves the XLA:CPU compile time of the init's RNG ops.
  variables = jax.jit(lambda: MODEL.init(jax.random.key(0, impl="unsafe_rbg"), _clips(1),
                                         train=False))()
  params = variables["params"]
  w = np.asarray(params["encoder"]["layer3_block1"]["conv2"]["kernel"])  # 3x3x3, 32 -> 32
  assert w.shape == (3, 3, 3, D, D)
  std = np.sqrt(2 / (27 * D))  # fan_out = out channels x taps
  assert abs(w.std() / std - 1) < 0.05 and abs(w.mean()) < 0.05 * std
  assert np.abs(w).max() > 3 * std  # a normal truncated at 2 sigma could not reach this
  stem = np.asarray(params["encoder"]["stem_conv"]["kernel"])
  assert stem.shape == (7, 7, 3, 8) and abs(stem.std() / np.sqrt(2 / (49 * 8)) - 1) < 0.1
  for gate in ("update_gate", "reset_gate", "out_gate"):
    k = np.asarray(params["agg"][gate]["kernel"]).reshape(2 * D, D)
    np.testing.assert_allclose(k.T @ k, np.eye(D), atol=1e-5)
    np.testing.assert_array_equal(params["agg"][gate]["bias"], 0)
  for name in ("pred_hidden", "pred_out"):
    k = np.asarray(params[name]["kernel"]).reshape(D, D)
    np.testing.assert_allclose(k.T @ k, np.eye(D), atol=1e-5)
    np.testing.assert_array_equal(params[name]["bias"], 0)
  bn = params["encoder"]["layer2_block0"]["proj_bn"]
  np.testing.assert_array_equal(bn["scale"], 1)
  np.testing.assert_array_equal(bn["bias"], 0)
  stats = variables["batch_stats"]["encoder"]["stem_bn"]
  np.testing.assert_array_equal(stats["mean"], 0)
  np.testing.assert_array_equal(stats["var"], 1)


# ------------------------------------------------------------------ encoder

def test_each_block_is_encoded_on_its_own(variables):
  """New frames in block j change block j's features only (eval mode: running statistics)."""
  clips = _clips(2)
  feats = np.asarray(_encode(variables, clips))
  assert feats.shape == (2, 4, GRID, GRID, D)
  assert feats.min() < 0  # no ReLU after the last block
  for j in (0, 2):
    changed = clips.at[:, j * 4:(j + 1) * 4].set(_clips(2, seed=5)[:, :4])
    new = np.asarray(_encode(variables, changed))
    others = [k for k in range(4) if k != j]
    np.testing.assert_allclose(new[:, others], feats[:, others], rtol=1e-6, atol=1e-6)
    assert np.abs(new[:, j] - feats[:, j]).max() > 0.1 * np.abs(feats[:, j]).max()


# ------------------------------------------------------------------ ConvGRU

def _np_conv(x, kernel, bias):
  """'SAME' conv of NHWC x with an odd HWIO kernel, from the definition."""
  k = kernel.shape[0]
  pad = k // 2
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  h, w = x.shape[1:3]
  out = sum(xp[:, i:i + h, j:j + w] @ kernel[i, j] for i in range(k) for j in range(k))
  return out + bias


def _np_gru(p, x, h):
  sigmoid = lambda a: 1 / (1 + np.exp(-a))
  conv = lambda name, a: _np_conv(a, np.asarray(p[name]["kernel"], np.float64),
                                  np.asarray(p[name]["bias"], np.float64))
  xh = np.concatenate([x, h], -1)
  z, r = sigmoid(conv("update_gate", xh)), sigmoid(conv("reset_gate", xh))
  out = np.tanh(conv("out_gate", np.concatenate([x, r * h], -1)))
  return (1 - z) * h + z * out


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_conv_gru_cell(kernel_size):
  cell = dpc.ConvGRUCell(features=6, kernel_size=kernel_size)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 3, 4, 5)), jnp.float32)
  h = jnp.asarray(rng.uniform(-1, 1, (2, 3, 4, 6)), jnp.float32)
  params = _fill(jax.eval_shape(lambda: cell.init(jax.random.key(0), x, h)))
  apply = jax.jit(cell.apply)
  np.testing.assert_allclose(apply(params, x, h), _np_gru(params["params"], np.float64(x),
                                                          np.float64(h)), rtol=1e-5, atol=1e-6)
  # Zero biases, input and state: every gate pre-activation is 0 and tanh(0) = 0.
  zero_bias = jax.tree_util.tree_map_with_path(
      lambda path, a: a * 0 if jax.tree_util.keystr(path).endswith("['bias']") else a, params)
  zeros = np.asarray(apply(zero_bias, x * 0, h * 0))
  assert np.abs(np.asarray(params["params"]["out_gate"]["kernel"])).min() > 0
  np.testing.assert_array_equal(zeros, 0)


# ------------------------------------------------------------------ aggregation and prediction

def test_predictions_match_numpy_and_are_fed_back(variables):
  """pred from a NumPy roll-out of the ConvGRU over ReLU(features) with ReLU(pred) fed back;
  `context` (probes) is the pooled state after all blocks, __call__'s after the observed ones."""
  clips = _clips(2)
  pred, target, context = (np.asarray(a, np.float64) for a in _eval(variables, clips))
  feats = np.asarray(_encode(variables, clips), np.float64)
  p = variables["params"]
  relu = lambda a: np.maximum(a, 0)
  head = lambda a: _np_conv(relu(_np_conv(a, np.asarray(p["pred_hidden"]["kernel"]),
                                          np.asarray(p["pred_hidden"]["bias"]))),
                            np.asarray(p["pred_out"]["kernel"]), np.asarray(p["pred_out"]["bias"]))
  h = np.zeros_like(feats[:, 0])
  for step in range(2):
    h = _np_gru(p["agg"], relu(feats[:, step]), h)
  np.testing.assert_allclose(context, h.mean(axis=(1, 2)), rtol=1e-4, atol=1e-5)
  h_all = h
  for step in range(2, 4):
    h_all = _np_gru(p["agg"], relu(feats[:, step]), h_all)
  np.testing.assert_allclose(_context(variables, clips), h_all.mean(axis=(1, 2)), rtol=1e-4,
                             atol=1e-5)
  expected = []
  for _ in range(2):
    expected.append(head(h))
    h = _np_gru(p["agg"], relu(expected[-1]), h)
  expected = np.stack(expected, 1).reshape(2, 2, GRID * GRID, D)  # positions row-major
  np.testing.assert_allclose(pred, expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(target, feats[:, 2:].reshape(2, 2, GRID * GRID, D), rtol=1e-6)


def test_predictions_do_not_see_the_true_future(variables):
  """New frames in the predicted blocks change the targets, not the predictions or context."""
  clips = _clips(2)
  future = clips.at[:, 8:].set(_clips(2, seed=7)[:, 8:])
  pred, target, context = _eval(variables, clips)
  pred2, target2, context2 = _eval(variables, future)
  np.testing.assert_allclose(pred2, pred, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(context2, context, rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(target2 - target).max()) > 0.1 * float(jnp.abs(target).max())
  # and the second prediction depends on the observed blocks through the first one
  observed = clips.at[:, :4].set(_clips(2, seed=8)[:, :4])
  assert float(jnp.abs(_eval(variables, observed)[0][:, 1] - pred[:, 1]).max()) > 1e-3


# ------------------------------------------------------------------ BN and dropout in training

def test_eval_uses_running_averages(variables):
  """Inference mode: a clip alone gives what it gives in a batch; training updates the stats."""
  clips = _clips(2)
  alone = _eval(variables, clips[:1])
  together = _eval(variables, clips)
  for a, b in zip(alone, together):
    np.testing.assert_allclose(a, b[:1], rtol=1e-5, atol=1e-5)
  _, updated = _train(variables, _clips(4), jnp.array([0, 0, 1, 1], jnp.int32), _keys(4), 2)
  old = jax.tree.leaves(variables["batch_stats"])
  new = jax.tree.leaves(updated["batch_stats"])
  assert len(old) == len(new) and all(float(jnp.abs(a - b).min()) > 0 for a, b in zip(old, new))
  changed = _eval({**variables, **updated}, clips)[0]
  assert float(jnp.abs(changed - together[0]).max()) > 1e-3


def test_training_bn_groups_and_dropout_follow_each_clip(variables):
  """Training: each clip (all of its blocks) is normalised with its own BN group only, and its
  ConvGRU dropout mask comes from its own key: 2 groups of 2 clips = each pair on its own."""
  clips, keys = _clips(4), _keys(4)
  (pred, target, context), _ = _train(variables, clips, jnp.array([0, 0, 1, 1], jnp.int32),
                                      keys, 2)
  for pair in (slice(0, 2), slice(2, 4)):
    (p, t, c), _ = _train(variables, clips[pair], jnp.zeros(2, jnp.int32), keys[pair], 1)
    np.testing.assert_allclose(p, pred[pair], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(t, target[pair], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(c, context[pair], rtol=1e-4, atol=1e-5)
  # Other keys: other dropout masks, so other predictions; the encoder is not affected.
  (p, t, _), _ = _train(variables, clips[:2], jnp.zeros(2, jnp.int32), _keys(2, seed=9), 1)
  assert float(jnp.abs(p - pred[:2]).max()) > 1e-3
  np.testing.assert_allclose(t, target[:2], rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="dropout_keys"):
    jax.eval_shape(lambda v: MODEL.apply(v, clips, train=True, mutable=["batch_stats"]),
                   variables)


def test_two_devices_match_one(variables):
  """A per-device step on 2 devices (BN groups = the clips of each device, dropout keys per clip)
  gives the single-device outputs and running statistics."""
  clips, keys = _clips(4), _keys(4)
  ids = jnp.array([0, 0, 1, 1], jnp.int32)
  expected, expected_stats = _train(variables, clips, ids, keys, 2)

  def per_device(v, x, key_data):
    groups = batch_norm.query_groups(x.shape[0], group_size=2, global_batch=4)
    return MODEL.apply(v, x, train=True, groups=groups,
                       dropout_keys=jax.random.wrap_key_data(key_data), mutable=["batch_stats"])

  dp = parallel.DataParallel("shard_map", max_devices=2)
  data = P(parallel.AXIS)
  step = dp.map_fn(per_device, in_specs=(P(), data, data), out_specs=((data, data, data), P()))
  outputs, stats = jax.block_until_ready(step(
      dp.put_state(variables), *dp.shard_batch((clips, jax.random.key_data(keys)))))
  for got, want in zip(outputs, expected):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats,
               expected_stats)
