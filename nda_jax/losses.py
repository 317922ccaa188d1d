"""GAN losses with the NDA term (ermongroup/NDA `losses.py`).

D sees three batches: real images, generator samples and NDA images (negative
augmentations of the real batch). NDA images are treated exactly like fakes:

  D loss = L_real + alpha * L_fake + beta * L_nda

alpha=0.25, beta=0.75 is the paper's NDA-GAN; alpha=1, beta=0 plain BigGAN.
The generator loss ignores NDA. Each kind gives per-logit penalties for "should
be real" and "should be fake" and the generator's penalty.
"""
from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp


class GanLoss(NamedTuple):
  """Per-logit penalties; losses are their batch means."""
  real: Callable[[jax.Array], jax.Array]       # D on real images
  fake: Callable[[jax.Array], jax.Array]       # D on fakes and NDA images
  generator: Callable[[jax.Array], jax.Array]  # G through D on its samples


LOSSES: dict[str, GanLoss] = {
    # loss_hinge_dis_new / loss_hinge_gen (the released scripts' --loss_type hinge).
    "hinge": GanLoss(real=lambda d: jax.nn.relu(1.0 - d), fake=lambda d: jax.nn.relu(1.0 + d),
                     generator=lambda d: -d),
    # loss_dcgan_dis_new / loss_dcgan_gen: the non-saturating logistic loss.
    "dcgan": GanLoss(real=lambda d: jax.nn.softplus(-d), fake=jax.nn.softplus,
                     generator=lambda d: jax.nn.softplus(-d)),
}


def get_loss(kind: str) -> GanLoss:
  if kind not in LOSSES:
    raise ValueError(f"unknown GAN loss kind {kind!r}; valid choices: {sorted(LOSSES)}")
  return LOSSES[kind]


def discriminator_loss(d_real: jax.Array, d_fake: jax.Array, d_nda: jax.Array | None, *,
                       alpha: float, beta: float, kind: str = "hinge"
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """D loss from logits `[B]` of reals, fakes and NDA images (None: no NDA batch, beta must be 0).

  Returns the loss and its unweighted terms {'d_loss_real', 'd_loss_fake', 'd_loss_nda'}.
  """
  loss = get_loss(kind)
  chex.assert_rank([d_real, d_fake], 1)
  l_real = jnp.mean(loss.real(d_real))
  l_fake = jnp.mean(loss.fake(d_fake))
  terms = {"d_loss_real": l_real, "d_loss_fake": l_fake}
  total = l_real + alpha * l_fake
  if d_nda is None:
    if beta != 0:
      raise ValueError(f"beta={beta} weights the NDA term but no NDA logits were given (d_nda=None)")
  else:
    chex.assert_rank(d_nda, 1)
    terms["d_loss_nda"] = jnp.mean(loss.fake(d_nda))
    total = total + beta * terms["d_loss_nda"]
  return total, terms


def generator_loss(d_fake: jax.Array, kind: str = "hinge") -> jax.Array:
  """G loss from D's logits `[B]` on generator samples."""
  chex.assert_rank(d_fake, 1)
  return jnp.mean(get_loss(kind).generator(d_fake))
