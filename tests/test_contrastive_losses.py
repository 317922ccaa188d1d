"""MoCo InfoNCE and DPC dense losses (with NDA negatives) vs NumPy references from the formulas."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nda_jax import losses


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _moco_inputs(seed=0, b=6, dim=8, queue=20, nda_rows=None):
  rng = np.random.default_rng(seed)
  q = _unit(rng.standard_normal((b, dim)))
  k = _unit(q + 0.7 * rng.standard_normal((b, dim)))        # positives: correlated with q
  bank = _unit(rng.standard_normal((queue, dim)))
  rows = nda_rows or b                             # 'batch': the queries' NDA keys, then others'
  nda = _unit(np.resize(q, (rows, dim)) + 1.0 * rng.standard_normal((rows, dim)))
  return [a.astype(np.float32) for a in (q, k, bank, nda)]


def _numpy_moco(q, k, queue, nda, t, scope, w):
  """-log(e^{q.k/t} / (e^{q.k/t} + sum_queue e^{q.k-/t} + w sum_nda e^{q.n/t})), in float64."""
  q, k, queue = (np.asarray(a, np.float64) for a in (q, k, queue))
  pos = np.sum(q * k, -1)
  neg = q @ queue.T
  den = np.exp(pos / t) + np.exp(neg / t).sum(-1)
  out = {"pos_sim": pos.mean(), "queue_sim": neg.mean(), "nda_sim": 0.0, "nda_beats_pos": 0.0}
  best_neg = neg.max(-1) / t
  if nda is not None:
    nda = np.asarray(nda, np.float64)
    sim = np.sum(q * nda, -1)[:, None] if scope == "own" else q @ nda.T
    den = den + w * np.exp(sim / t).sum(-1)
    out["nda_sim"] = sim.mean()
    out["nda_beats_pos"] = np.mean(sim.max(-1) > pos)
    if w > 0:
      best_neg = np.maximum(best_neg, sim.max(-1) / t + np.log(w))
  out["loss"] = np.mean(np.log(den) - pos / t)
  out["top1"] = np.mean(pos / t >= best_neg)
  return out


@pytest.mark.parametrize("scope,nda_rows", [("own", None), ("batch", 10)])
@pytest.mark.parametrize("weight", [0.3, 2.5])
def test_moco_matches_numpy(scope, nda_rows, weight):
  q, k, bank, nda = _moco_inputs(nda_rows=nda_rows)
  loss, metrics = losses.moco_infonce(q, k, bank, nda, temperature=0.2, nda_scope=scope,
                                      nda_weight=weight)
  want = _numpy_moco(q, k, bank, nda, 0.2, scope, weight)
  assert set(metrics) == set(want)
  np.testing.assert_allclose(loss, want["loss"], rtol=1e-5)
  for name, value in want.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
  # The NDA term matters: the loss moves with its weight.
  plain = _numpy_moco(q, k, bank, None, 0.2, scope, 0.0)["loss"]
  assert float(loss) > plain + 1e-3


@pytest.mark.parametrize("scope,nda_rows", [("own", None), ("batch", 10)])
def test_moco_zero_weight_is_plain_moco_bitwise(scope, nda_rows):
  q, k, bank, nda = _moco_inputs(1, nda_rows=nda_rows)
  for fn in (losses.moco_infonce, jax.jit(losses.moco_infonce, static_argnames=(
      "temperature", "nda_scope", "nda_weight"))):
    plain, plain_metrics = fn(q, k, bank, None, temperature=0.1, nda_scope=scope)
    zero, zero_metrics = fn(q, k, bank, nda, temperature=0.1, nda_scope=scope, nda_weight=0.0)
    assert np.isfinite(float(zero))
    assert np.asarray(plain).tobytes() == np.asarray(zero).tobytes()
    assert float(plain_metrics["top1"]) == float(zero_metrics["top1"])
    # Without NDA keys the NDA metrics are 0; with weight 0 they still describe the keys.
    assert float(plain_metrics["nda_sim"]) == 0.0 == float(plain_metrics["nda_beats_pos"])
    np.testing.assert_allclose(zero_metrics["nda_sim"],
                               _numpy_moco(q, k, bank, nda, 0.1, scope, 0.0)["nda_sim"], rtol=1e-5)
  np.testing.assert_allclose(plain, _numpy_moco(q, k, bank, None, 0.1, scope, 0.0)["loss"],
                             rtol=1e-5)


def test_moco_top1_hand_made():
  eye = np.eye(4, dtype=np.float32)
  q = k = eye[:2]                                  # positive cosine 1
  bank = np.stack([eye[2], eye[3], -eye[0], _unit(eye[0] + eye[1])])   # all cosines < 1
  loss, metrics = losses.moco_infonce(q, k, bank, -q, temperature=0.5, nda_weight=3.0)
  assert float(metrics["top1"]) == 1.0 and float(metrics["nda_beats_pos"]) == 0.0
  assert float(metrics["pos_sim"]) == 1.0
  # An NDA key equal to the query ties the positive; its weight 3 (log 3 > 0) makes it win.
  _, metrics = losses.moco_infonce(q, k, bank, q, temperature=0.5, nda_weight=3.0)
  assert float(metrics["top1"]) == 0.0 and float(metrics["nda_beats_pos"]) == 0.0
  assert np.isfinite(float(loss))


def test_moco_bf16_inputs_give_float32_loss():
  q, k, bank, nda = _moco_inputs(2)
  as_bf16 = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, bank, nda)]
  loss, metrics = losses.moco_infonce(*as_bf16, temperature=0.2, nda_weight=0.5)
  assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in metrics.values())
  rounded = [np.asarray(a.astype(jnp.float32)) for a in as_bf16]
  np.testing.assert_allclose(loss, _numpy_moco(*rounded, 0.2, "own", 0.5)["loss"], rtol=1e-5)


def test_moco_jit_equals_eager():
  q, k, bank, nda = _moco_inputs(3, nda_rows=12)
  kwargs = dict(temperature=0.07, nda_scope="batch", nda_weight=1.5)
  eager = losses.moco_infonce(q, k, bank, nda, **kwargs)
  jitted = jax.jit(functools.partial(losses.moco_infonce, **kwargs))(q, k, bank, nda)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), eager, jitted)


def test_moco_rejects_bad_arguments():
  q, k, bank, nda = _moco_inputs(4)
  with pytest.raises(ValueError, match="valid choices"):
    losses.moco_infonce(q, k, bank, nda, temperature=0.2, nda_scope="global")
  with pytest.raises(ValueError, match="nda_weight"):
    losses.moco_infonce(q, k, bank, nda, temperature=0.2, nda_weight=-1.0)
  with pytest.raises(AssertionError):
    losses.moco_infonce(q, k, bank, nda[:3], temperature=0.2, nda_scope="own")


# ----------------------------------------------------------------------------------- DPC
def _dpc_inputs(seed=0, b=2, clips=4, steps=2, positions=3, dim=6):
  rng = np.random.default_rng(seed)
  target = 0.6 * rng.standard_normal((clips, steps, positions, dim))
  query_index = rng.permutation(clips)[:b].astype(np.int32)
  pred = target[query_index] + 0.4 * rng.standard_normal((b, steps, positions, dim))
  nda = target[query_index] + 0.6 * rng.standard_normal((b, steps, positions, dim))
  return pred.astype(np.float32), target.astype(np.float32), nda.astype(np.float32), query_index


def _numpy_dpc(pred, target, nda, scope, w, query_index):
  """Loop over predictions: -log(e^{s+} / (sum_all_blocks e^{s} + w sum_nda e^{s_nda}))."""
  b, steps, positions, _ = pred.shape
  losses_, top1, same, other, beats_nda = [], [], [], [], []
  for i in range(b):
    for p in range(steps):
      for n in range(positions):
        x = pred[i, p, n].astype(np.float64)
        s = np.einsum("cpnd,d->cpn", target.astype(np.float64), x)
        pos = s[query_index[i], p, n]
        den = np.exp(s).sum()
        best = s.copy()
        best[query_index[i], p, n] = -np.inf
        best = best.max()
        own = s[query_index[i]].copy()
        own[p, n] = -np.inf
        same.append(pos > own.max())
        others = np.delete(s, query_index[i], axis=0)
        other.append(pos > others.max())
        if nda is not None:
          negs = ([nda[i, p, n]] if scope == "same_position" else nda[i].reshape(-1, x.shape[0]))
          s_nda = np.asarray(negs, np.float64) @ x
          den += w * np.exp(s_nda).sum()
          beats_nda.append(pos > s_nda.max())
          if w > 0:
            best = max(best, s_nda.max() + np.log(w))
        losses_.append(np.log(den) - pos)
        top1.append(pos > best)
  out = {"loss": np.mean(losses_), "top1": np.mean(top1), "acc_same_clip": np.mean(same),
         "acc_other_clips": np.mean(other)}
  if nda is not None:
    out["acc_nda"] = np.mean(beats_nda)
  return out


@pytest.mark.parametrize("scope", ["same_position", "all"])
@pytest.mark.parametrize("weight", [0.5, 3.0])
def test_dpc_matches_numpy(scope, weight):
  pred, target, nda, query_index = _dpc_inputs()
  loss, metrics = losses.dpc_dense_loss(pred, target, nda=nda, nda_scope=scope,
                                        nda_weight=weight, query_index=query_index)
  want = _numpy_dpc(pred, target, nda, scope, weight, query_index)
  assert set(metrics) == set(want)
  for name, value in want.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
  plain = _numpy_dpc(pred, target, None, scope, 0.0, query_index)["loss"]
  assert float(loss) > plain + 1e-3


def test_dpc_metrics_are_not_trivial():
  """The random inputs above must exercise both outcomes of every accuracy."""
  pred, target, nda, query_index = _dpc_inputs()
  want = _numpy_dpc(pred, target, nda, "all", 1.0, query_index)
  for name in ("top1", "acc_same_clip", "acc_other_clips", "acc_nda"):
    assert 0.0 < want[name] < 1.0, name


@pytest.mark.parametrize("scope", ["same_position", "all"])
def test_dpc_zero_weight_and_default_query_index(scope):
  pred, target, nda, _ = _dpc_inputs(1, b=3, clips=3)
  for fn in (losses.dpc_dense_loss, jax.jit(losses.dpc_dense_loss,
                                            static_argnames=("nda_scope", "nda_weight"))):
    plain, plain_metrics = fn(pred, target)
    zero, zero_metrics = fn(pred, target, nda=nda, nda_scope=scope, nda_weight=0.0)
    explicit, _ = fn(pred, target, query_index=jnp.arange(3))
    assert np.asarray(plain).tobytes() == np.asarray(zero).tobytes()
    assert np.asarray(plain).tobytes() == np.asarray(explicit).tobytes()
    assert "acc_nda" not in plain_metrics and "acc_nda" in zero_metrics
  np.testing.assert_allclose(plain, _numpy_dpc(pred, target, None, scope, 0.0, np.arange(3))[
      "loss"], rtol=1e-5)


def test_dpc_hand_made_positive_is_argmax():
  steps, positions, clips = 2, 2, 3
  target = np.eye(clips * steps * positions, dtype=np.float32).reshape(clips, steps, positions, -1)
  query_index = np.array([2, 0], np.int32)
  pred = 5.0 * target[query_index]                  # scores: 5 for the positive, 0 elsewhere
  loss, metrics = losses.dpc_dense_loss(pred, target, nda=-pred, nda_scope="all",
                                        query_index=query_index)
  for name in ("top1", "acc_same_clip", "acc_other_clips", "acc_nda"):
    assert float(metrics[name]) == 1.0, name
  # Closed form: 12 candidates (one scores 5) and 4 NDA negatives (one scores -25).
  np.testing.assert_allclose(loss, np.log(np.exp(5) + 11 + 3 + np.exp(-25)) - 5, rtol=1e-5)


def test_dpc_bf16_and_jit():
  pred, target, nda, query_index = _dpc_inputs(2)
  kwargs = dict(nda_scope="all", nda_weight=2.0)
  bf16 = [jnp.asarray(a, jnp.bfloat16) for a in (pred, target, nda)]
  loss, metrics = losses.dpc_dense_loss(bf16[0], bf16[1], nda=bf16[2], query_index=query_index,
                                        **kwargs)
  assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in metrics.values())
  rounded = [np.asarray(a.astype(jnp.float32)) for a in bf16]
  np.testing.assert_allclose(loss, _numpy_dpc(*rounded, "all", 2.0, query_index)["loss"],
                             rtol=1e-5)
  eager = losses.dpc_dense_loss(pred, target, nda=nda, query_index=query_index, **kwargs)
  jitted = jax.jit(lambda p, t, n, i: losses.dpc_dense_loss(p, t, nda=n, query_index=i, **kwargs))(
      pred, target, nda, query_index)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), eager, jitted)


def test_dpc_rejects_bad_arguments():
  pred, target, nda, query_index = _dpc_inputs(3)
  with pytest.raises(ValueError, match="query_index"):
    losses.dpc_dense_loss(pred, target)
  with pytest.raises(ValueError, match="valid choices"):
    losses.dpc_dense_loss(pred, target, nda=nda, nda_scope="own", query_index=query_index)
  with pytest.raises(ValueError, match="nda_weight"):
    losses.dpc_dense_loss(pred, target, nda=nda, nda_weight=-0.5, query_index=query_index)
