"""FID / IS / KID math, statistics files, sharded features, fd_digits evaluator."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import linalg
from scipy import special

from nda_jax import evaluators
from nda_jax.evaluators import digits_classifier
from nda_jax.evaluators import features as features_lib
from nda_jax.evaluators import fid
from nda_jax.evaluators import metrics
from nda_jax.evaluators import ref_stats


def _random_cov(rng, d, scale=1.0):
  a = rng.normal(size=(d, 2 * d)) * scale
  return a @ a.T / (2 * d)


def _fid_by_eigenvalues(mu1, s1, mu2, s2):
  """Independent reference: Tr((S1 S2)^1/2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)) (symmetric PSD)."""
  w, v = linalg.eigh(s1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  eig = linalg.eigvalsh(root1 @ s2 @ root1)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
               - 2 * np.sum(np.sqrt(np.clip(eig, 0, None))))


# ------------------------------------------------------------------------------ FID
def test_fid_diagonal_gaussians_closed_form():
  rng = np.random.RandomState(0)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  v1, v2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
  got = metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
  np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_fid_commuting_covariances_closed_form():
  rng = np.random.RandomState(1)
  q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
  d1, d2 = rng.uniform(0.2, 2, 8), rng.uniform(0.2, 2, 8)
  s1, s2 = q @ np.diag(d1) @ q.T, q @ np.diag(d2) @ q.T
  expected = np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
  np.testing.assert_allclose(metrics.frechet_distance(np.zeros(8), s1, np.zeros(8), s2),
                             expected, rtol=1e-8)


def test_fid_same_statistics_is_zero():
  x = np.random.RandomState(2).normal(size=(400, 32)) @ np.diag(np.linspace(0.1, 3, 32))
  mu, sigma = x.mean(0), np.cov(x, rowvar=False)
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fid_matches_eigenvalue_reference():
  rng = np.random.RandomState(3)
  x = rng.normal(size=(300, 24)) @ rng.normal(size=(24, 24))
  y = rng.normal(size=(250, 24)) @ rng.normal(size=(24, 24)) + 0.3
  args = (x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
  np.testing.assert_allclose(metrics.frechet_distance(*args), _fid_by_eigenvalues(*args),
                             rtol=1e-7)


def test_fid_singular_covariances_stay_finite_and_correct():
  rng = np.random.RandomState(4)
  x = rng.normal(size=(5, 12))          # rank-4 covariances in 12 dimensions
  y = rng.normal(size=(5, 12)) + 1.0
  args = (x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
  got = metrics.frechet_distance(*args)
  assert np.isfinite(got)
  np.testing.assert_allclose(got, _fid_by_eigenvalues(*args), rtol=1e-3)


def test_fid_rejects_large_imaginary_part_and_bad_shapes():
  with pytest.raises(ValueError, match="imaginary"):
    metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([-1.0, 1.0]))
  with pytest.raises(ValueError, match="different dimensions"):
    metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_gaussian_stats_match_numpy_cov_with_large_offset():
  rng = np.random.RandomState(5)
  x = 1e4 + rng.normal(size=(103, 7)) @ rng.normal(size=(7, 7))
  stats = metrics.GaussianStats()
  for chunk in np.array_split(x, [10, 11, 50]):
    stats.update(chunk)
  assert stats.count == 103
  np.testing.assert_allclose(stats.mu, x.mean(0), rtol=1e-12)
  np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False), rtol=1e-7, atol=1e-9)
  with pytest.raises(ValueError, match="at least 2"):
    one = metrics.GaussianStats()
    one.update(x[:1])
    _ = one.sigma


# ---------------------------------------------------------------------------- files
def test_stats_file_round_trip_and_ttur_format(tmp_path):
  rng = np.random.RandomState(6)
  mu, sigma = rng.normal(size=5), _random_cov(rng, 5)
  path = str(tmp_path / "sub" / "stats.npz")
  metrics.save_stats(path, mu, sigma)
  mu2, sigma2 = metrics.load_stats(path)
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)
  # TTUR / pytorch-fid files: np.savez(f, mu=..., sigma=...), float32 in TTUR's.
  ttur = str(tmp_path / "fid_stats_cifar10_train.npz")
  np.savez(ttur, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
  mu3, sigma3 = metrics.load_stats(ttur)
  assert mu3.dtype == np.float64 and sigma3.shape == (5, 5)
  np.testing.assert_allclose(sigma3, sigma, rtol=1e-6)
  bad = str(tmp_path / "bad.npz")
  np.savez(bad, mean=mu, cov=sigma)
  with pytest.raises(ValueError, match="mu"):
    metrics.load_stats(bad)
  with pytest.raises(FileNotFoundError, match="ref_stats"):
    metrics.load_stats(str(tmp_path / "missing.npz"))


# ------------------------------------------------------------------------------- IS
def test_inception_score_uniform_and_confident_balanced():
  mean, std = metrics.inception_score(np.zeros((100, 7)), splits=10)
  np.testing.assert_allclose([mean, std], [1.0, 0.0], atol=1e-12)
  k = 8
  logits = 200.0 * np.eye(k)[np.arange(10 * k * 3) % k]
  mean, std = metrics.inception_score(logits, splits=10)
  np.testing.assert_allclose([mean, std], [k, 0.0], atol=1e-9)


def test_inception_score_matches_entropy_identity():
  logits = np.random.RandomState(7).normal(size=(200, 5)) * 2
  mean, _ = metrics.inception_score(logits, splits=1)
  p = special.softmax(logits, axis=1)
  # KL(p(y|x) || p(y)) averaged = H(p(y)) - E_x H(p(y|x)).
  expected = np.exp(special.entr(p.mean(0)).sum() - special.entr(p).sum(1).mean())
  np.testing.assert_allclose(mean, expected, rtol=1e-10)


# ------------------------------------------------------------------------------ KID
def test_polynomial_mmd_matches_brute_force():
  rng = np.random.RandomState(8)
  x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)) + 0.5
  k = lambda a, b: (a @ b / 3 + 1) ** 3
  m = 5
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
  np.testing.assert_allclose(metrics.polynomial_mmd2(x, y), xx + yy - 2 * xy, rtol=1e-10)


def test_kid_unbiased_near_zero_for_same_distribution_and_positive_otherwise():
  rng = np.random.RandomState(9)
  a, b = rng.normal(size=(600, 16)), rng.normal(size=(600, 16))
  same, same_std = metrics.kernel_inception_distance(a, b, num_subsets=40, subset_size=150)
  assert abs(same) < 3 * same_std / np.sqrt(40) + 1e-4
  diff, _ = metrics.kernel_inception_distance(a, b + 0.5, num_subsets=40, subset_size=150)
  assert diff > 20 * max(abs(same), same_std / np.sqrt(40))


# ------------------------------------------------------------------- sharded features
def _toy_apply(variables, x):
  flat = x.reshape(x.shape[0], -1)
  return {"features": jnp.tanh(flat @ variables["w"]), "logits": flat @ variables["w"][:, :3]}


def test_sharded_features_equal_unsharded_stats():
  assert jax.device_count() == 8
  rng = np.random.RandomState(10)
  variables = {"w": jnp.asarray(rng.normal(size=(4 * 4 * 3, 6)) * 0.2, jnp.float32)}
  images = rng.randint(0, 256, (37, 4, 4, 3)).astype(np.uint8)
  extractor = features_lib.FeatureExtractor(_toy_apply, variables, batch_size=12)
  assert extractor.batch_size == 16  # rounded up to a multiple of 8 devices
  batches = [{"image": images[:20]}, {"image": images[20:], "mask": np.arange(17) != 3}]
  got = list(extractor.iterate(batches))
  direct = np.asarray(_toy_apply(variables, jnp.asarray(images / 127.5 - 1, jnp.float32))
                      ["features"], np.float64)
  kept = np.concatenate([direct[:20], np.delete(direct[20:], 3, axis=0)])
  np.testing.assert_allclose(np.concatenate([g["features"] for g in got]), kept, atol=1e-6)
  stats = features_lib.gaussian_stats(iter(got), "features")
  np.testing.assert_allclose(stats.mu, kept.mean(0), atol=1e-6)
  np.testing.assert_allclose(stats.sigma, np.cov(kept, rowvar=False), atol=1e-6)
  capped = features_lib.gaussian_stats(iter(got), "features", max_count=25)
  np.testing.assert_allclose(capped.mu, kept[:25].mean(0), atol=1e-6)


def test_to_unit_range_and_quantize():
  u8 = np.array([0, 128, 255], np.uint8)
  np.testing.assert_allclose(features_lib.to_unit_range(u8), [-1, 128 / 127.5 - 1, 1], atol=1e-7)
  x = jnp.array([-1.0, 0.0, 0.999, 1.0])
  # np.uint8(255 * (x + 1) / 2) truncates: 0 -> 127, 0.999 -> 254.
  np.testing.assert_allclose(features_lib.to_unit_range(x, quantize=True),
                             np.array([0, 127, 254, 255]) / 127.5 - 1, atol=1e-6)


def test_sample_batches_chunks_and_determinism():
  calls = []

  def sample_fn(rng, n):
    calls.append(n)
    seed = np.asarray(jax.random.key_data(rng)).ravel()
    return np.random.RandomState(seed).uniform(-1, 1, (n, 2, 2, 3))

  rng = jax.random.key(3)
  a = np.concatenate([b["image"] for b in features_lib.sample_batches(sample_fn, rng, 10, 4)])
  b = np.concatenate([b["image"] for b in features_lib.sample_batches(sample_fn, rng, 10, 4)])
  assert calls == [4, 4, 2, 4, 4, 2]
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a[:4], a[4:8])


# --------------------------------------------------------------------- fd_digits / evaluators
def _digits_config(**eval_kw):
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict({"name": "digits", "image_size": 16, "train_split": "train"})
  c.eval = ml_collections.ConfigDict({"metrics": ("fd_digits",), "num_samples": 200,
                                      "batch_size": 64, **eval_kw})
  return c


@pytest.fixture(scope="module")
def digits_net(tmp_path_factory):
  """A briefly trained classifier, written to and read back from a cache file."""
  config = digits_classifier.TrainConfig(steps=40)
  path = str(tmp_path_factory.mktemp("cache") / "clf.msgpack")
  variables = digits_classifier.load_or_train(config, path)
  assert os.path.exists(path)
  again = digits_classifier.load_or_train(config, path)
  jax.tree.map(np.testing.assert_array_equal, variables, again)
  with pytest.raises(ValueError, match="another TrainConfig"):
    digits_classifier.load_or_train(digits_classifier.TrainConfig(steps=41), path)
  return fid.FeatureNet(digits_classifier.DigitsCNN().apply, variables, "features", "logits")


def test_digits_classifier_learns(digits_net):
  from nda_jax.data import digits  # pylint: disable=g-import-not-at-top
  images, labels = digits.load_digits("test", digits_classifier.INPUT_SIZE)
  assert digits_classifier.accuracy(digits_net.variables, images, labels) > 0.5


def test_fd_digits_evaluator_real_vs_noise(digits_net, tmp_path):
  from nda_jax.data import digits  # pylint: disable=g-import-not-at-top
  real, _ = digits.load_digits("train", 16)
  config = _digits_config(kid_subsets=10)
  config.eval.metrics = ("fd_digits", "kid_digits")
  ev = fid.SampleQualityEvaluator(config, "digits", ["fd_digits", "kid_digits"],
                                  workdir=str(tmp_path), net=digits_net)
  assert ev.requires == ("sample_fn",)

  def real_fn(rng, n):
    seed = np.asarray(jax.random.key_data(rng)).ravel()
    return real[np.random.RandomState(seed).choice(len(real), n, replace=False)]

  def noise_fn(rng, n):
    seed = np.asarray(jax.random.key_data(rng)).ravel()
    return np.random.RandomState(seed).uniform(-1, 1, (n, 16, 16, 3))

  good = dict(ev.run(sample_fn=real_fn))
  assert set(good) == {"fd_digits", "kid_digits", "kid_digits_std"}
  assert len(os.listdir(tmp_path / "eval_cache")) == 1   # reference statistics cached
  bad = dict(ev.run(sample_fn=noise_fn))
  assert good["fd_digits"] < 0.1 * bad["fd_digits"]
  assert bad["kid_digits"] > 10 * abs(good["kid_digits"])
  # A fresh evaluator reads the cached reference instead of embedding the data again.
  mu, sigma = ev.reference_stats()
  ev._reference.clear()
  ev._reference_batches = lambda: pytest.fail("reference recomputed despite the cache")
  mu2, sigma2 = ev.reference_stats()
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)


def test_ref_stats_compute_matches_direct(digits_net, monkeypatch):
  from nda_jax.data import digits  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(fid.FEATURE_NETS, "digits", lambda cfg: digits_net)
  data = ml_collections.ConfigDict({"name": "digits", "image_size": 16})
  stats = ref_stats.compute(data, "test", "digits", ml_collections.ConfigDict(), batch_size=64)
  images, _ = digits.load_digits("test", 16)
  direct = np.asarray(jax.jit(digits_net.apply_fn)(
      digits_net.variables, jnp.asarray(images / 127.5 - 1, jnp.float32))["features"], np.float64)
  assert stats.count == len(images) == 300
  np.testing.assert_allclose(stats.mu, direct.mean(0), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(stats.sigma, np.cov(direct, rowvar=False), rtol=1e-3, atol=1e-4)


def test_build_rejects_unknown_metric_and_groups_by_network():
  with pytest.raises(ValueError, match="valid choices"):
    evaluators.build(_digits_config(), metric_names=("fid", "bogus"))
  with pytest.raises(FileNotFoundError, match="pytorch-fid"):
    evaluators.build(_digits_config(inception_weights="/nonexistent.pth"),
                     metric_names=("fid", "is"))
