"""GAN losses with the NDA term vs a NumPy reference of ermongroup/NDA `losses.py`."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from nda_jax import losses
from nda_jax.models import biggan


def _softplus(x):
  return np.logaddexp(0.0, x)


# (real penalty, fake penalty, generator penalty) per logit, written from losses.py.
NUMPY = {
    "hinge": (lambda d: np.maximum(0, 1 - d), lambda d: np.maximum(0, 1 + d), lambda d: -d),
    "dcgan": (lambda d: _softplus(-d), _softplus, lambda d: _softplus(-d)),
}


def _logits(seed=0, n=16):
  rng = np.random.default_rng(seed)
  return [3 * rng.standard_normal(n).astype(np.float32) for _ in range(3)]


@pytest.mark.parametrize("kind", sorted(NUMPY))
@pytest.mark.parametrize("alpha,beta", [(0.25, 0.75), (1.0, 0.0)])
def test_losses_match_numpy(kind, alpha, beta):
  real, fake, nda = _logits()
  r, f, g = NUMPY[kind]
  want = {"d_loss_real": r(real).mean(), "d_loss_fake": f(fake).mean(), "d_loss_nda": f(nda).mean()}
  loss, terms = losses.discriminator_loss(jnp.asarray(real), jnp.asarray(fake), jnp.asarray(nda),
                                          alpha=alpha, beta=beta, kind=kind)
  assert set(terms) == set(want)
  for k, v in want.items():
    np.testing.assert_allclose(terms[k], v, rtol=1e-6)
  total = want["d_loss_real"] + alpha * want["d_loss_fake"] + beta * want["d_loss_nda"]
  np.testing.assert_allclose(loss, total, rtol=1e-6)
  np.testing.assert_allclose(losses.generator_loss(jnp.asarray(fake), kind=kind), g(fake).mean(),
                             rtol=1e-6)


def test_hinge_is_zero_beyond_the_margin():
  confident = jnp.full((4,), 2.0)
  loss, _ = losses.discriminator_loss(confident, -confident, -confident, alpha=0.25, beta=0.75)
  assert float(loss) == 0.0


def test_no_nda_batch():
  real, fake, _ = _logits(1)
  loss, terms = losses.discriminator_loss(jnp.asarray(real), jnp.asarray(fake), None, alpha=1.0,
                                          beta=0.0)
  assert "d_loss_nda" not in terms
  np.testing.assert_allclose(loss, terms["d_loss_real"] + terms["d_loss_fake"], rtol=1e-6)
  with pytest.raises(ValueError, match=r"beta=0.75 .*\(d_nda=None\)"):
    losses.discriminator_loss(jnp.asarray(real), jnp.asarray(fake), None, alpha=0.25, beta=0.75)


def test_unknown_kind_lists_choices():
  x = jnp.zeros((2,))
  with pytest.raises(ValueError, match=r"'wgan'.*valid choices: \['dcgan', 'hinge'\]"):
    losses.discriminator_loss(x, x, x, alpha=1.0, beta=0.0, kind="wgan")
  with pytest.raises(ValueError, match="valid choices"):
    losses.generator_loss(x, kind="kl")


def test_beta_zero_leaves_discriminator_gradients_unchanged():
  """The baseline still runs D on the NDA batch (as the official code does); weight 0 adds nothing."""
  d = biggan.Discriminator(ch=4, resolution=16, n_classes=2)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-1, 1, (6, 16, 16, 3)), jnp.float32)  # [fake; real; nda]
  y = jnp.array([0, 1, 0, 1, 0, 1])
  shapes = jax.eval_shape(lambda: d.init(jax.random.key(0), x, y, train=False))
  variables = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)

  def grads(with_nda, beta):
    def loss_fn(params):
      logits = d.apply({**variables, "params": params}, x if with_nda else x[:4],
                       y if with_nda else y[:4], train=False)
      logits = logits / 50.0  # into the hinge margin, so that every term has a gradient
      nda = logits[4:] if with_nda else None
      return losses.discriminator_loss(logits[2:4], logits[:2], nda, alpha=1.0, beta=beta)[0]
    return jax.grad(loss_fn)(variables["params"])

  baseline, without = grads(True, 0.0), grads(False, 0.0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), baseline, without)
  # ...while a positive beta does change them (so the comparison can fail).
  nda = grads(True, 0.75)
  diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(nda), jax.tree.leaves(without)))
  assert diff > 1e-4
