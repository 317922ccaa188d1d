"""BigGAN G/D: shapes, parameter counts, spectral norm, conditioning, BN modes and sharded BN."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from nda_jax.models import biggan

KEY = jax.random.key(0)


def _inputs(batch, n_classes, dim_z=128, seed=0):
  kz, ky = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kz, (batch, dim_z)), jax.random.randint(ky, (batch,), 0, n_classes)


def _init(module, *args, seed=0):
  """Random variables of the module's tree from NumPy: a real init costs ~10 s of XLA:CPU
  compile time (one RNG op per variable), and these tests do not depend on the init."""
  shapes = jax.eval_shape(lambda: module.init(KEY, *args, train=False))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if name.endswith(("['var']", "['sigma']", "['scale']")):
      return jnp.ones(s.shape, s.dtype)
    if name.endswith("['mean']"):
      return jnp.zeros(s.shape, s.dtype)
    return jnp.asarray(rng.standard_normal(s.shape) * (1.0 if name.endswith("['u']") else 0.05), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def test_init_follows_the_official_recipe():
  """N(0, 0.02) weights and class embeddings, PyTorch-default biases, unit BN gain."""
  g = biggan.Generator(ch=4, resolution=16, n_classes=3)
  z, y = _inputs(2, 3)
  # An rbg key halves the XLA:CPU compile time of the init's RNG ops.
  params = jax.jit(lambda: g.init(jax.random.key(0, impl="unsafe_rbg"), z, y, train=False))()["params"]
  block = params["blocks_0"]
  for w in (block["conv1"]["kernel"], block["bn1"]["gain"]["embedding"], params["linear"]["kernel"]):
    assert abs(float(jnp.std(w)) - 0.02) < 0.004 and abs(float(jnp.mean(w))) < 0.004
  bound = 1 / np.sqrt(9 * 16)  # conv2: fan_in = 3 * 3 * 16
  b = np.asarray(block["conv2"]["bias"])
  assert np.all(np.abs(b) <= bound) and np.abs(b).max() > bound / 3
  np.testing.assert_array_equal(params["output_bn"]["scale"], 1.0)
  np.testing.assert_array_equal(params["output_bn"]["bias"], 0.0)


@pytest.mark.parametrize("resolution", [16, 32])
def test_shapes_and_ranges(resolution):
  g = biggan.Generator(ch=4, resolution=resolution, n_classes=2)
  d = biggan.Discriminator(ch=4, resolution=resolution, n_classes=2)
  z, y = _inputs(4, 2)
  g_vars = _init(g, z, y)
  x, _ = g.apply(g_vars, z, y, train=True, mutable=["batch_stats"])
  assert x.shape == (4, resolution, resolution, 3) and x.dtype == jnp.float32
  assert float(jnp.abs(x).max()) <= 1.0 and float(x.std()) > 0.05
  logits = d.apply(_init(d, x, y), x, y, train=False)
  assert logits.shape == (4,) and bool(jnp.all(jnp.isfinite(logits)))


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("n_classes", [1, 10])
def test_parameter_counts_of_paper_config(n_classes):
  # Defaults = paper config: ch=64 -> C=256, 32x32, dim_z=128, bottom 4.
  g, d = biggan.Generator(n_classes=n_classes), biggan.Discriminator(n_classes=n_classes)
  z, y = _inputs(2, n_classes)
  g_shapes = jax.eval_shape(lambda: _init(g, z, y))
  d_shapes = jax.eval_shape(lambda: _init(d, jnp.zeros((2, 32, 32, 3)), y))
  c, k, zdim, bw = 256, n_classes, 128, 4
  conv = lambda cin, cout, ks: ks * ks * cin * cout + cout
  g_block = 2 * conv(c, c, 3) + conv(c, c, 1) + 2 * 2 * k * c  # convs, shortcut, 2 ccbn (gain, bias)
  g_params = (zdim * bw * bw * c + bw * bw * c) + 3 * g_block + 2 * c + conv(c, 3, 3)
  d_params = (conv(3, c, 3) + conv(c, c, 3) + conv(3, c, 1)          # block 0
              + 2 * conv(c, c, 3) + conv(c, c, 1)                    # block 1 (down)
              + 2 * 2 * conv(c, c, 3)                                # blocks 2, 3 (identity sc)
              + (c + 1) + k * c)                                     # linear, projection
  assert _count(g_shapes["params"]) == g_params
  assert _count(d_shapes["params"]) == d_params
  # SN keeps u (output size) and sigma per layer; BN keeps mean and var.
  g_stats = (bw * bw * c + 1) + 3 * (3 * (c + 1) + 2 * 2 * c) + 2 * c + (3 + 1)
  d_stats = 10 * (c + 1) + (1 + 1) + (k + 1)
  assert _count(g_shapes["batch_stats"]) == g_stats
  assert _count(d_shapes["batch_stats"]) == d_stats


def _sn_sigmas_and_kernels(variables):
  """(stored sigma, kernel matrix [fan_in, out]) for every spectrally normalised layer."""
  pairs = []

  def walk(stats, params):
    for name, sub in stats.items():
      if name.endswith("_sn"):
        layer = params[name[:-len("_sn")]]
        w = np.asarray(layer["embedding"] if "embedding" in layer else layer["kernel"])
        pairs.append((float(sub["sigma"]), w.reshape(-1, w.shape[-1])))
      elif name in params:
        walk(sub, params[name])

  walk(variables["batch_stats"], variables["params"])
  return pairs


def test_spectral_norm_converges_to_top_singular_value():
  g = biggan.Generator(ch=4, resolution=16, n_classes=3)
  d = biggan.Discriminator(ch=4, resolution=16, n_classes=3)
  z, y = _inputs(2, 3)
  x = jnp.zeros((2, 16, 16, 3))

  def iterate(module, variables, *args, steps=400):
    def body(_, stats):
      _, upd = module.apply({**variables, "batch_stats": stats}, *args, train=True,
                            mutable=["batch_stats"])
      return upd["batch_stats"]
    stats = jax.jit(lambda s: jax.lax.fori_loop(0, steps, body, s))(variables["batch_stats"])
    return {**variables, "batch_stats": stats}

  for module, args in ((g, (z, y)), (d, (x, y))):
    variables = iterate(module, _init(module, *args), *args)
    pairs = _sn_sigmas_and_kernels(variables)
    assert len(pairs) == (8 if module is g else 11)  # G: linear, 2x3 convs, output; D: 3+2+2+2, linear, embed
    for sigma, w in pairs:
      np.testing.assert_allclose(sigma, np.linalg.svd(w, compute_uv=False)[0], rtol=2e-3)


class _SNDense(biggan.nn.Module):

  @biggan.nn.compact
  def __call__(self, x, train):
    return biggan.spectral_norm(biggan.nn.Dense(6, name="dense"), 1e-8)(x, update_stats=train)


def test_spectral_norm_normalises_layer():
  """The forward uses W / sigma: after convergence the effective matrix has spectral norm 1."""
  layer, x = _SNDense(), jnp.eye(5)
  variables = layer.init(KEY, x, train=False)

  def body(_, stats):
    return layer.apply({**variables, "batch_stats": stats}, x, train=True,
                       mutable=["batch_stats"])[1]["batch_stats"]

  stats = jax.jit(lambda s: jax.lax.fori_loop(0, 300, body, s))(variables["batch_stats"])
  out = layer.apply({**variables, "batch_stats": stats}, x, train=False)
  effective = np.asarray(out - variables["params"]["dense"]["bias"])  # rows of W / sigma
  np.testing.assert_allclose(np.linalg.svd(effective, compute_uv=False)[0], 1.0, rtol=1e-4)
  raw = np.linalg.svd(np.asarray(variables["params"]["dense"]["kernel"]), compute_uv=False)[0]
  assert abs(raw - 1.0) > 0.05  # the raw kernel is not normalised: the test can tell


def test_class_conditioning_changes_outputs():
  g = biggan.Generator(ch=4, resolution=16, n_classes=3)
  d = biggan.Discriminator(ch=4, resolution=16, n_classes=3)
  z, _ = _inputs(4, 3)
  y0, y1 = jnp.array([0, 1, 2, 0]), jnp.array([1, 2, 0, 0])
  g_vars = _init(g, z, y0)
  x0 = g.apply(g_vars, z, y0, train=False)
  x1 = g.apply(g_vars, z, y1, train=False)
  # BN batch statistics couple samples, but the per-class gain/bias differ per sample.
  assert float(jnp.abs(x0 - x1)[:3].max()) > 1e-3
  d_vars = _init(d, x0, y0)
  l0, l1 = d.apply(d_vars, x0, y0, train=False), d.apply(d_vars, x0, y1, train=False)
  assert np.all(np.abs(np.asarray(l0 - l1)[:3]) > 1e-4)
  np.testing.assert_allclose(l0[3], l1[3], rtol=1e-6)  # same label -> same logit (no BN in D)


def test_sampling_modes_and_eval_purity():
  g = biggan.Generator(ch=4, resolution=16, n_classes=2)
  z, y = _inputs(4, 2)
  g_vars = _init(g, z, y)
  x_train, upd = g.apply(g_vars, z, y, train=True, mutable=["batch_stats"])
  # Eval stores nothing (apply without `mutable` would raise on a write) and, with batch
  # statistics, is the training forward: both run one power iteration from the stored u.
  x_batch = g.apply(g_vars, z, y, train=False)
  np.testing.assert_allclose(x_batch, x_train, atol=1e-6)
  g_running = g.clone(sample_with_batch_stats=False)
  x_running = g_running.apply({**g_vars, **upd}, z, y, train=False)
  assert float(jnp.abs(x_running - x_batch).max()) > 1e-3
  # Running averages moved 10% of the way from (0, 1) towards the batch statistics.
  mean = upd["batch_stats"]["blocks_0"]["bn1"]["mean"]
  assert float(jnp.abs(mean).max()) > 0 and np.all(np.asarray(upd["batch_stats"]["output_bn"]["var"]) > 0)


def test_compute_dtype_bfloat16_keeps_float32_params():
  g = biggan.Generator(ch=4, resolution=16, dtype=jnp.bfloat16)
  d = biggan.Discriminator(ch=4, resolution=16, dtype=jnp.bfloat16)
  z, y = _inputs(2, 1)
  g_vars = _init(g, z, y * 0)
  x = g.apply(g_vars, z, y * 0, train=False)
  logits = d.apply(_init(d, x, y * 0), x, y * 0, train=False)
  assert x.dtype == jnp.float32 and logits.dtype == jnp.float32
  assert {v.dtype for v in jax.tree.leaves(g_vars)} == {jnp.dtype(jnp.float32)}
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_sharded_batch_norm_equals_full_batch():
  devices = jax.devices()
  assert len(devices) == 8, "tests/conftest.py sets 8 fake CPU devices"
  mesh = Mesh(np.array(devices), ("data",))
  g1 = biggan.Generator(ch=4, resolution=16, n_classes=3)
  g8 = g1.clone(axis_name="data")
  z, y = _inputs(16, 3)
  g_vars = _init(g1, z, y)

  def fwd(module, variables, z, y):
    return module.apply(variables, z, y, train=True, mutable=["batch_stats"])

  sharded = jax.jit(jax.shard_map(lambda v, z, y: fwd(g8, v, z, y), mesh=mesh,
                                  in_specs=(P(), P("data"), P("data")), out_specs=(P("data"), P())))
  x8, upd8 = sharded(g_vars, z, y)
  jax.block_until_ready((x8, upd8))
  x1, upd1 = jax.jit(lambda v, z, y: fwd(g1, v, z, y))(g_vars, z, y)
  np.testing.assert_allclose(x8, x1, atol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), upd8, upd1)
  # Without the axis name each device would normalise its own 2 samples: visibly different.
  local = jax.jit(jax.shard_map(lambda v, z, y: fwd(g1, v, z, y)[0], mesh=mesh,
                                in_specs=(P(), P("data"), P("data")), out_specs=P("data")))(g_vars, z, y)
  assert float(jnp.abs(jax.block_until_ready(local) - x1).max()) > 1e-3


def test_bad_configuration_errors():
  z, y = _inputs(2, 1)
  with pytest.raises(ValueError, match=r"resolution=64 .* valid choices: \[16, 32\]"):
    _init(biggan.Generator(ch=4, resolution=64), z, y)
  with pytest.raises(ValueError, match=r"valid choices: \[16, 32\]"):
    _init(biggan.Discriminator(ch=4, resolution=24), jnp.zeros((2, 24, 24, 3)), y)
  with pytest.raises(ValueError, match="use bottom_width=4"):
    _init(biggan.Generator(ch=4, resolution=32, bottom_width=8), z, y)
