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
import optax


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


# --------------------------------------------------------------------------- contrastive
# InfoNCE losses of the contrastive methods with NDA negatives (Ge et al. 2021):
# negative augmentations of an example are extra negatives of its query. Their
# exponentiated logits are weighted by `nda_weight` in the softmax denominator,
# i.e. log(nda_weight) is added to their logits; weight 0 drops them, which gives
# exactly the loss without NDA. Everything is computed in float32 (bf16 logits
# over a 65k queue lose the positive), the matmuls at full precision.
NDA_SCOPES_MOCO = ("own", "batch")
NDA_SCOPES_DPC = ("same_position", "all")
_HIGHEST = jax.lax.Precision.HIGHEST


def _check_nda_weight(nda_weight: float) -> None:
  if not nda_weight >= 0:
    raise ValueError(f"nda_weight must be >= 0 (a static Python number), got {nda_weight!r}")


def _weighted(nda_logits: jax.Array, nda_weight: float) -> jax.Array:
  """exp(logit + log w) = w exp(logit): the weight of NDA terms in the denominator."""
  return nda_logits + jnp.log(jnp.float32(nda_weight))


def moco_infonce(q: jax.Array, k: jax.Array, queue: jax.Array, nda_k: jax.Array | None, *,
                 temperature: float, nda_scope: str = "own", nda_weight: float = 1.0
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """MoCo's InfoNCE over [positive, queue, NDA keys] for this device's queries.

  Args:
    q, k: [b, D] L2-normalised queries and their positive keys.
    queue: [K, D] negative keys.
    nda_k: None (plain MoCo) or the NDA keys: [b, D] with nda_scope='own' (query i
      gets one extra negative, the key of its own NDA image), [B, D] with 'batch'
      (every query is contrasted with all B NDA keys the caller gathered).
    temperature: logits are cosines / temperature.
    nda_scope: 'own' or 'batch'.
    nda_weight: w >= 0 multiplying exp(NDA logit) in the denominator (0: no NDA).

  Returns:
    The mean cross-entropy (label 0 of logits [l_pos, l_queue, l_nda]) and metrics,
    means over the shard: loss, top1 (the positive is the argmax logit), pos_sim,
    queue_sim, nda_sim (cosines), nda_beats_pos (fraction of queries with an NDA
    key more similar than the positive key; w does not enter; 0 without NDA).
  """
  chex.assert_rank([q, k, queue], 2)
  chex.assert_equal_shape([q, k])
  chex.assert_equal_shape_suffix([q, queue], 1)
  if nda_scope not in NDA_SCOPES_MOCO:
    raise ValueError(f"nda_scope={nda_scope!r}; valid choices: {NDA_SCOPES_MOCO}")
  _check_nda_weight(nda_weight)
  q, k, queue = (x.astype(jnp.float32) for x in (q, k, queue))
  pos_sim = jnp.sum(q * k, axis=-1)
  queue_sim = jnp.matmul(q, queue.T, precision=_HIGHEST)
  logits = [pos_sim[:, None] / temperature, queue_sim / temperature]
  zero = jnp.zeros((), jnp.float32)
  nda_sim_mean, nda_beats_pos = zero, zero
  if nda_k is not None:
    chex.assert_rank(nda_k, 2)
    if nda_scope == "own":
      chex.assert_equal_shape([q, nda_k])
      nda_sim = jnp.sum(q * nda_k.astype(jnp.float32), axis=-1, keepdims=True)
    else:
      chex.assert_equal_shape_suffix([q, nda_k], 1)
      nda_sim = jnp.matmul(q, nda_k.astype(jnp.float32).T, precision=_HIGHEST)
    nda_sim_mean = jnp.mean(nda_sim)
    nda_beats_pos = jnp.mean((jnp.max(nda_sim, axis=-1) > pos_sim).astype(jnp.float32))
    if nda_weight != 0:
      logits.append(_weighted(nda_sim / temperature, nda_weight))
  logits = jnp.concatenate(logits, axis=-1)
  loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.zeros(q.shape[0], jnp.int32)))
  return loss, {
      "loss": loss,
      "top1": jnp.mean((jnp.argmax(logits, axis=-1) == 0).astype(jnp.float32)),
      "pos_sim": jnp.mean(pos_sim),
      "queue_sim": jnp.mean(queue_sim),
      "nda_sim": nda_sim_mean,
      "nda_beats_pos": nda_beats_pos,
  }


def dpc_dense_loss(pred: jax.Array, target: jax.Array, *, nda: jax.Array | None = None,
                   nda_scope: str = "same_position", nda_weight: float = 1.0,
                   query_index: jax.Array | None = None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Dense Predictive Coding's loss: each predicted block against all candidate blocks.

  A prediction (i, p, n) (clip i, future step p, grid position n) is scored by its
  dot product (no normalisation, no temperature) with every candidate feature
  target[c, p', n']; the positive is the true block (query_index[i], p, n), every
  other block of any clip is a negative (DPC's dense mask).

  Args:
    pred: [b, P, N, D] predicted features of this device's clips.
    target: [C, P, N, D] true features of the candidate clips (gathered by the caller).
    nda: None or [b, P, N, D] features of each clip's NDA clip: extra negatives,
      with nda_scope='same_position' nda[i, p, n] for prediction (i, p, n), with
      'all' every nda[i, p', n'] for each prediction of clip i.
    nda_scope: 'same_position' or 'all'.
    nda_weight: w >= 0 multiplying exp(NDA logit) in the denominator (0: no NDA).
    query_index: int [b], the row of `target` that is clip i; None: arange(b),
      with C == b.

  Returns:
    The mean cross-entropy over the b*P*N predictions and metrics (means): loss,
    top1 (the positive is the argmax logit), acc_same_clip / acc_other_clips /
    acc_nda (the positive's score beats every other block of the same clip / every
    block of the other clips / every NDA negative; acc_nda only with `nda`; these
    compare raw scores, w does not enter).
  """
  chex.assert_rank([pred, target], 4)
  chex.assert_equal_shape_suffix([pred, target], 3)
  if nda_scope not in NDA_SCOPES_DPC:
    raise ValueError(f"nda_scope={nda_scope!r}; valid choices: {NDA_SCOPES_DPC}")
  _check_nda_weight(nda_weight)
  b, steps, positions, dim = pred.shape
  blocks = steps * positions
  query_index = _query_index(query_index, b, target.shape[0])
  pred = pred.astype(jnp.float32).reshape(b, blocks, dim)
  scores = jnp.einsum("ikd,cjd->ikcj", pred, target.astype(jnp.float32).reshape(
      target.shape[0], blocks, dim), precision=_HIGHEST)     # [b, PN, C, PN]
  positive = query_index[:, None] * blocks + jnp.arange(blocks)       # flat index into C*PN
  logits = [scores.reshape(b, blocks, -1)]
  pos_score = jnp.take_along_axis(logits[0], positive[..., None], axis=-1)[..., 0]   # [b, PN]
  metrics = _dpc_block_accuracies(scores, pos_score, query_index)
  if nda is not None:
    chex.assert_shape(nda, (b, steps, positions, dim))
    nda_scores = _dpc_nda_scores(pred, nda.astype(jnp.float32).reshape(b, blocks, dim), nda_scope)
    metrics["acc_nda"] = _beats(pos_score, nda_scores, -1)
    if nda_weight != 0:
      logits.append(_weighted(nda_scores, nda_weight))
  logits = jnp.concatenate(logits, axis=-1).reshape(b * blocks, -1)
  positive = positive.reshape(-1)
  loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, positive))
  top1 = jnp.mean((jnp.argmax(logits, axis=-1) == positive).astype(jnp.float32))
  return loss, {"loss": loss, "top1": top1, **metrics}


def _query_index(query_index: jax.Array | None, b: int, num_candidates: int) -> jax.Array:
  """The row of the candidates that is each predicted clip (arange(b) when they are the clips)."""
  if query_index is None:
    if num_candidates != b:
      raise ValueError(f"target has {num_candidates} clips, pred {b}: pass query_index, "
                       "the row of target of each pred clip")
    query_index = jnp.arange(b)
  chex.assert_shape(query_index, (b,))
  chex.assert_type(query_index, int)
  return query_index


def _beats(pos_score: jax.Array, negatives: jax.Array, axes) -> jax.Array:
  """Fraction of predictions whose positive scores above all of their `negatives`."""
  return jnp.mean((pos_score > jnp.max(negatives, axis=axes)).astype(jnp.float32))


def _dpc_block_accuracies(scores: jax.Array, pos_score: jax.Array,
                          query_index: jax.Array) -> dict[str, jax.Array]:
  """acc_same_clip / acc_other_clips of scores [b, PN, C, PN] and positives [b, PN]."""
  blocks, num_candidates = scores.shape[1], scores.shape[2]
  own_block = jnp.arange(blocks)
  same_clip = jnp.take_along_axis(scores, query_index[:, None, None, None], axis=2)[:, :, 0]
  same_clip = jnp.where(own_block[:, None] == own_block[None, :], -jnp.inf, same_clip)
  other_clips = jnp.where((jnp.arange(num_candidates) == query_index[:, None])[:, None, :, None],
                          -jnp.inf, scores)
  return {"acc_same_clip": _beats(pos_score, same_clip, -1),
          "acc_other_clips": _beats(pos_score, other_clips, (2, 3))}


def _dpc_nda_scores(pred: jax.Array, nda: jax.Array, nda_scope: str) -> jax.Array:
  """Scores of predictions [b, PN, D] against NDA blocks [b, PN, D]: [b, PN, 1] at the
  same position ('same_position') or [b, PN, PN] against all of the clip's ('all')."""
  if nda_scope == "same_position":
    return jnp.sum(pred * nda, axis=-1, keepdims=True)
  return jnp.einsum("ikd,ijd->ikj", pred, nda, precision=_HIGHEST)
