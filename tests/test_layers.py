"""conv2d / Conv: the matmul weight gradient equals XLA's, on every path the models use."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from nda_jax.models import layers

# (kernel, strides, padding, dilation, cin, cout, input size): chosen so that every
# dW strategy is hit (checked by test_cases_cover_every_strategy).
CASES = [
    ((3, 3), 1, "SAME", 1, 40, 72, (17, 17)),        # input_columns
    ((3, 3), 2, "SAME", 1, 72, 40, (10, 11)),        # input_columns, stride 2, even/odd sizes
    ((3, 3), (2, 1), ((2, 0), (1, 3)), 1, 33, 96, (9, 8)),  # explicit pairs
    ((3, 3), 1, "VALID", 2, 96, 33, (11, 9)),        # dilation 2
    ((1, 1), 1, "SAME", 1, 40, 24, (6, 7)),          # 1x1 stride 1: a plain matmul
    ((1, 1), 2, "VALID", 1, 24, 80, (7, 6)),         # strided 1x1 projection
    ((7, 7), 2, 3, 1, 3, 16, (15, 14)),              # ResNet stem
    ((3, 3), 1, 1, 1, 3, 80, (8, 9)),                # D's first conv
    ((3, 3), 2, "SAME", 1, 40, 8, (9, 9)),           # thin Cout, stride 2
    ((3, 3), 1, "SAME", 1, 40, 3, (9, 8)),           # output_columns: G's last conv
    ((3, 3), 1, "VALID", (2, 1), 36, 5, (10, 9)),    # output_columns, dilation
    ((1, 7), 1, ((0, 0), (3, 3)), 1, 48, 8, (5, 9)),  # output_columns, non-square kernel
]


def _random(shape, seed, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _case_arrays(case, dtype=jnp.float32, batch=3):
  kernel_hw, strides, padding, dilation, cin, cout, hw = case
  x = _random((batch, *hw, cin), 0, dtype)
  kernel = _random((*kernel_hw, cin, cout), 1, jnp.float32) / np.sqrt(cin * np.prod(kernel_hw))
  y_shape = jax.eval_shape(lambda a, b: layers.conv2d(a, b, strides, padding, dilation, "xla"),
                           x, kernel.astype(dtype)).shape
  return x, kernel.astype(dtype), _random(y_shape, 2, dtype)


def _grads(x, kernel, dy, case, impl):
  """(dx, dW) of <conv(x, kernel), dy>, with `impl`'s backward pass."""
  _, strides, padding, dilation, *_ = case
  _, vjp = jax.vjp(lambda a, b: layers.conv2d(a, b, strides, padding, dilation, impl), x, kernel)
  return vjp(dy)


def _reference_grads(x, kernel, dy, case):
  """jax.grad of the plain lax convolution: the definition of the right answer."""
  _, strides, padding, dilation, *_ = case
  pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
  padding = (pair(padding),) * 2 if isinstance(padding, int) else padding
  conv = lambda a, b: lax.conv_general_dilated(
      a, b, pair(strides), padding, rhs_dilation=pair(dilation),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jax.vjp(conv, x, kernel)[1](dy)


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


def _strategy(case):
  kernel_hw, strides, _, _, cin, cout, _ = case
  strides = (strides, strides) if isinstance(strides, int) else strides
  return layers.weight_grad_strategy((*kernel_hw, cin, cout), strides)


def test_cases_cover_every_strategy():
  assert {_strategy(c) for c in CASES} == set(layers._WEIGHT_GRADS)


@pytest.mark.parametrize("chunk_bytes", [layers._CHUNK_BYTES, 1], ids=["whole", "chunked"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{_strategy(c)}-{c[0]}-{c[1]}-{c[2]}-{c[3]}")
def test_matmul_grads_equal_xla_float32(case, chunk_bytes, monkeypatch):
  monkeypatch.setattr(layers, "_CHUNK_BYTES", chunk_bytes)  # 1: one example per chunk.
  x, kernel, dy = _case_arrays(case)
  dx, dw = _grads(x, kernel, dy, case, "matmul")
  ref_dx, ref_dw = _reference_grads(x, kernel, dy, case)
  assert dw.dtype == jnp.float32 and dw.shape == kernel.shape and dx.shape == x.shape
  assert _rel_err(dw, ref_dw) < 1e-5
  assert _rel_err(dx, ref_dx) < 1e-5


def _random_case(seed):
  rng = np.random.default_rng(seed)
  kernel_hw = tuple(int(k) for k in rng.choice([1, 2, 3, 5, 7], 2))
  strides = tuple(int(s) for s in rng.integers(1, 3, 2))
  dilation = tuple(int(d) for d in rng.integers(1, 3, 2))
  padding = [str(rng.choice(["SAME", "VALID"])), int(rng.integers(0, 3)),
             tuple(tuple(int(p) for p in rng.integers(0, 4, 2)) for _ in range(2))][seed % 3]
  hw = tuple(int(rng.integers((k - 1) * d + 1, 14)) for k, d in zip(kernel_hw, dilation))
  cin, cout = (int(c) for c in rng.choice([1, 3, 8, 31, 32, 40, 70], 2))
  return kernel_hw, strides, padding, dilation, cin, cout, hw


@pytest.mark.parametrize("seed", range(8))
def test_matmul_grads_equal_xla_random_shapes(seed, monkeypatch):
  monkeypatch.setattr(layers, "_CHUNK_BYTES", 4096)  # Chunks of a few examples.
  case = _random_case(seed)
  x, kernel, dy = _case_arrays(case, batch=4)
  got = jax.jit(functools.partial(_grads, case=case, impl="matmul"))(x, kernel, dy)
  want = jax.jit(functools.partial(_reference_grads, case=case))(x, kernel, dy)
  for got, want in zip(got, want):
    assert got.shape == want.shape and _rel_err(got, want) < 1e-5, case


@pytest.mark.parametrize("case", CASES[:1] + CASES[4:5] + CASES[6:7] + CASES[9:10], ids=_strategy)
def test_matmul_grads_bfloat16(case):
  x, kernel, dy = _case_arrays(case, jnp.bfloat16)
  dx, dw = _grads(x, kernel, dy, case, "matmul")
  assert dx.dtype == dw.dtype == jnp.bfloat16
  exact_dx, exact_dw = _reference_grads(*(a.astype(jnp.float32) for a in (x, kernel, dy)), case)
  xla_dx, xla_dw = _grads(x, kernel, dy, case, "xla")
  # float32 accumulation: within bf16 rounding (2^-8) of the exact gradient, and of XLA's.
  assert _rel_err(dw, exact_dw) < 8e-3
  assert _rel_err(dw, xla_dw) < 1.6e-2
  np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(xla_dx, np.float32))


@pytest.mark.parametrize("kw", [
    dict(kernel_size=(3, 3)),
    dict(kernel_size=(3, 3), strides=2, padding="VALID"),
    dict(kernel_size=(1, 7), padding=((0, 0), (3, 3))),
    dict(kernel_size=(3, 3), kernel_dilation=2, padding=2, use_bias=False),
])
def test_conv_forward_equals_flax(kw):
  x = _random((2, 3, 9, 10, 5), 0)   # Leading batch dims [B, T, ...] as for clips.
  ours, theirs = layers.Conv(8, **kw), nn.Conv(8, **kw)
  params = theirs.init(jax.random.key(0), x)
  ours_params = ours.init(jax.random.key(0), x)
  assert jax.tree.structure(ours_params) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, ours_params, params)  # Same init.
  np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-6, atol=1e-6)
  # flax's dtype rule: bfloat16 inputs with float32 params compute in float32.
  xb = x.astype(jnp.bfloat16)
  assert ours.apply(params, xb).dtype == theirs.apply(params, xb).dtype == jnp.float32


def _loss(x, kernel, impl, **kw):
  return jnp.sum(jnp.sin(layers.conv2d(x, kernel, impl=impl, **kw)))


def test_path_switch_is_honoured(monkeypatch):
  x = _random((2, 34, 34, 40), 0)
  wide, thin = _random((3, 3, 40, 72), 1), _random((3, 3, 40, 3), 1)   # input/output_columns
  jaxpr = lambda kernel, impl: str(jax.make_jaxpr(_loss, static_argnums=2)(x, kernel, impl))
  assert "custom_vjp_call" in jaxpr(wide, "matmul") and "custom_vjp_call" not in jaxpr(wide, "xla")
  # This test runs on the CPU backend: "auto" takes the path measured faster per shape.
  assert not layers.matmul_is_faster(wide.shape, (1, 1)) and layers.matmul_is_faster(thin.shape, (1, 1))
  assert jaxpr(wide, "auto") == jaxpr(wide, "xla")
  assert jaxpr(thin, "auto") == jaxpr(thin, "matmul") != jaxpr(thin, "xla")

  def count(impl, op):
    hlo = jax.jit(jax.grad(_loss, 1), static_argnums=2).lower(x, wide, impl).as_text()
    return hlo.count(f"stablehlo.{op}")
  assert count("xla", "convolution") == 2 and count("xla", "dot_general") == 0   # fwd + dW.
  assert count("matmul", "convolution") == 1 and count("matmul", "dot_general") == 1  # dx DCE'd.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert layers.resolve_impl("auto", thin.shape, (1, 1)) == "xla"
  with pytest.raises(ValueError, match="one of"):
    layers.conv2d(x, wide, impl="fast")


def test_matmul_is_faster_where_measured():
  """The shapes of bench/conv_grad.py where "matmul" won (YNNPACK off), and where it lost."""
  faster = [((1, 1, 256, 64), 1), ((1, 1, 256, 512), 2), ((3, 3, 256, 3), 1), ((3, 3, 64, 3), 1)]
  slower = [((3, 3, 64, 64), 1), ((3, 3, 256, 256), 1), ((3, 3, 64, 128), 2), ((7, 7, 3, 64), 2),
            ((3, 3, 3, 64), 1)]
  assert all(layers.matmul_is_faster(k, (s, s)) for k, s in faster)
  assert not any(layers.matmul_is_faster(k, (s, s)) for k, s in slower)


def test_bad_arguments_raise():
  x, kernel = _random((1, 5, 5, 4), 0), _random((3, 3, 4, 2), 1)
  with pytest.raises(ValueError, match="SAME"):
    layers.conv2d(x, kernel, padding="CIRCULAR")
  with pytest.raises(ValueError, match="channels"):
    layers.conv2d(x, _random((3, 3, 5, 2), 1))


def test_vmap_of_grad_equals_xla(monkeypatch):
  monkeypatch.setattr(layers, "_CHUNK_BYTES", 1)  # The lax.scan over chunks, under vmap.
  xs, kernels = _random((4, 2, 9, 9, 36), 0), _random((4, 3, 3, 36, 72), 1)  # Per-example kernels.
  grad = lambda impl: jax.vmap(jax.grad(_loss, (0, 1)), (0, 0, None))(xs, kernels, impl)
  for got, want in zip(grad("matmul"), grad("xla")):
    assert _rel_err(got, want) < 1e-5


def test_grad_of_grad_equals_xla_and_forward_mode_raises(monkeypatch):
  monkeypatch.setattr(layers, "_CHUNK_BYTES", 1)
  x, kernel = _random((2, 9, 9, 36), 0), _random((3, 3, 36, 72), 1) * 0.1

  def penalty(kernel, impl):   # Gradient penalties differentiate a gradient.
    dx, dw = jax.grad(_loss, (0, 1))(x, kernel, impl)
    return jnp.sum(dx ** 2) + jnp.sum(dw ** 2)
  assert _rel_err(jax.grad(penalty)(kernel, "matmul"), jax.grad(penalty)(kernel, "xla")) < 1e-5
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jvp(lambda k: _loss(x, k, "matmul"), (kernel,), (kernel,))


def test_shard_map_and_pmap_equal_xla(monkeypatch):
  monkeypatch.setattr(layers, "_CHUNK_BYTES", 1)  # The scan's carry must get x's mesh axes.
  n = jax.device_count()
  assert n == 8, "tests/conftest.py should force 8 CPU devices"
  x, kernel = _random((2 * n, 9, 9, 36), 0), _random((3, 3, 36, 72), 1)
  mesh = jax.make_mesh((n,), ("data",))
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))

  def per_device(impl, x, kernel):
    return lax.pmean(jax.grad(_loss, 1)(x, kernel, impl), "data")
  for name, run in [
      ("shard_map", lambda impl: jax.jit(jax.shard_map(
          functools.partial(per_device, impl), mesh=mesh, in_specs=(P("data"), P()),
          out_specs=P()))(xs, kernel)),
      ("grad of shard_map", lambda impl: jax.jit(jax.grad(jax.shard_map(
          lambda x, k: lax.psum(_loss(x, k, impl), "data"), mesh=mesh,
          in_specs=(P("data"), P()), out_specs=P()), 1))(xs, kernel)),
      ("pmap", lambda impl: jax.pmap(functools.partial(per_device, impl), axis_name="data",
                                     in_axes=(0, None))(x.reshape(n, 2, 9, 9, 36), kernel)[0]),
  ]:
    want = jax.block_until_ready(run("xla"))
    got = jax.block_until_ready(run("matmul"))
    assert _rel_err(got, want) < 1e-5, name


class _SNConv(nn.Module):
  impl: str

  @nn.compact
  def __call__(self, x):
    return nn.SpectralNorm(layers.Conv(72, (3, 3), impl=self.impl))(x, update_stats=True)


def test_spectral_norm_grads_equal_across_paths():
  x = _random((2, 9, 9, 36), 0)
  variables = _SNConv("xla").init(jax.random.key(0), x)

  def loss(params, impl):
    y, _ = _SNConv(impl).apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                               mutable=["batch_stats"])
    return jnp.sum(y ** 2)
  want = jax.grad(loss)(variables["params"], "xla")
  got = jax.grad(loss)(variables["params"], "matmul")
  jax.tree.map(lambda g, w: np.testing.assert_array_less(_rel_err(g, w), 1e-5), got, want)


class _TwoLayer(nn.Module):
  impl: str

  @nn.compact
  def __call__(self, x):
    x = nn.relu(layers.Conv(72, (3, 3), strides=2, impl=self.impl)(x))  # input_columns
    return layers.Conv(3, (3, 3), impl=self.impl)(x)                       # output_columns


def test_training_is_identical_on_both_paths():
  x, target = _random((4, 12, 12, 3), 0), _random((4, 6, 6, 3), 1)
  params0 = _TwoLayer("xla").init(jax.random.key(0), x)["params"]
  tx = optax.sgd(0.05)

  def train(impl):
    loss = lambda p: jnp.mean((_TwoLayer(impl).apply({"params": p}, x) - target) ** 2)

    @jax.jit
    def step(params, opt_state):
      grads = jax.grad(loss)(params)
      updates, opt_state = tx.update(grads, opt_state)
      return optax.apply_updates(params, updates), opt_state
    params, opt_state = params0, tx.init(params0)
    for _ in range(3):
      params, opt_state = step(params, opt_state)
    return params
  want, got = train("xla"), train("matmul")
  moved = jax.tree.map(lambda w, p: float(np.max(np.abs(w - p))), want, params0)
  assert min(jax.tree.leaves(moved)) > 1e-4   # The steps really changed every param.
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want)
