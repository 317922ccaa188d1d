"""config.dtype='bfloat16': the GAN computes activations in bf16, keeps parameters,
optimizer state, BN/SN statistics and losses in float32, and one step's losses and
gradients stay close to float32's.

Gradients are read off one plain-SGD step (no momentum, lr 1e-3, one D step):
(params before - params after) / lr, which Adam's per-parameter normalisation
would hide. Tolerances: losses and mean logits within 5% relative (measured:
at most 2.1%, G's loss), every weight tensor's gradient with cosine similarity
> 0.99 to float32's (measured: >= 0.9956, G) and its norm within 10% (measured:
at most 1.8%).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nda_jax import optim
from nda_jax.trainers import gan
from test_gan_trainer import run_iterations
from test_gan_trainer import tiny_config

LR = 1e-3
LOSS_RTOL = 5e-2
MIN_COSINE = 0.99
NORM_RTOL = 0.1


def sgd_config(dtype):
  c = tiny_config(**{"dtype": dtype, "train.num_d_steps": 1})
  for part in ("g", "d"):
    c.optim[part] = optim.default_config("sgd")
    c.optim[part].lr = LR
    c.optim[part].momentum = 0.0
  return c


@pytest.fixture(scope="module")
def steps():
  """{dtype: (state before, state after one step, metrics)} from the same initial state."""
  out = {}
  for dtype in ("float32", "bfloat16"):
    c = sgd_config(dtype)
    before = jax.device_get(gan.GAN(c).init_state(jax.random.PRNGKey(0)))
    after, metrics = run_iterations(c, 1, max_devices=1)
    out[dtype] = before, after, metrics
  return out


def _gradients(before, after, part):
  return jax.tree_util.tree_leaves_with_path(jax.tree.map(
      lambda b, a: (np.asarray(b, np.float64) - np.asarray(a, np.float64)) / LR,
      getattr(before, part), getattr(after, part)))


def test_same_initial_parameters(steps):
  for a, b in zip(jax.tree.leaves(steps["float32"][0]), jax.tree.leaves(steps["bfloat16"][0])):
    np.testing.assert_array_equal(a, b)


def test_state_stays_float32(steps):
  """Parameters, optimizer state, EMA, BN running statistics and SN vectors."""
  _, after, metrics = steps["bfloat16"]
  floats = [x for x in jax.tree.leaves(after) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.float32 for x in floats)
  assert all(np.isfinite(v) for v in metrics.values())


def test_activations_are_bfloat16():
  """D's convolutions take bf16 operands; its logits and G's images come out in float32."""
  c = sgd_config("bfloat16")
  generator, discriminator = gan.build_models(c, axis_name=None)
  state = gan.GAN(c).init_state(jax.random.PRNGKey(0))
  x = jnp.zeros((2, c.data.image_size, c.data.image_size, c.data.channels))
  y = jnp.zeros((2,), jnp.int32)
  d_vars = {"params": state.d_params, "batch_stats": state.d_stats}
  jaxpr = jax.make_jaxpr(lambda v: discriminator.apply(v, x, y, train=False))(d_vars)
  products = [e for e in _equations(jaxpr.jaxpr)
              if e.primitive.name in ("conv_general_dilated", "dot_general")]
  assert len([e for e in products if e.invars[0].aval.dtype == jnp.bfloat16]) >= 4, products
  logits = discriminator.apply(d_vars, x, y, train=False)
  images = generator.apply({"params": state.g_params, "batch_stats": state.g_stats},
                           jnp.zeros((2, c.model.dim_z)), y, train=False)
  assert logits.dtype == images.dtype == jnp.float32


def _equations(jaxpr):
  """Every equation of `jaxpr`, inside nested jaxprs (jit, custom_jvp, ...) too."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from _equations(sub)


def test_losses_close_to_float32(steps):
  full, half = steps["float32"][2], steps["bfloat16"][2]
  for key in ("d_loss", "g_loss", "d_real", "d_fake", "d_nda"):
    np.testing.assert_allclose(half[key], full[key], rtol=LOSS_RTOL, atol=1e-3, err_msg=key)


@pytest.mark.parametrize("part", ["d_params", "g_params"])
def test_gradients_close_to_float32(steps, part):
  full = _gradients(*steps["float32"][:2], part)
  half = _gradients(*steps["bfloat16"][:2], part)
  checked = 0
  for (path, g32), (_, g16) in zip(full, half):
    name = jax.tree_util.keystr(path)
    n32, n16 = np.linalg.norm(g32), np.linalg.norm(g16)
    if g32.ndim < 2 or n32 == 0:   # Weight matrices and kernels; biases follow them.
      continue
    cosine = float(np.vdot(g32, g16) / (n32 * n16))
    assert cosine > MIN_COSINE, (name, cosine)
    assert abs(n16 - n32) <= NORM_RTOL * n32, (name, n16, n32)
    checked += 1
  assert checked >= 5
