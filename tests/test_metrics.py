"""FID / IS / KID / PRDC math, statistics files, sharded features, fd_digits evaluator."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import linalg
from scipy import special

from nda_jax import evaluators
from nda_jax import images as images_lib
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


# ----------------------------------------------------------------------------- PRDC
def _prdc_reference(real, fake, k):
  """prdc.compute_prdc's formulas in float64: full distance matrices, a point's radius the
  max of its k + 1 smallest distances within its set (itself included), strict `<`."""
  dist = lambda a, b: np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
  def radii(x):
    d = dist(x, x)
    smallest = np.take_along_axis(d, np.argpartition(d, k + 1, axis=-1)[..., :k + 1], axis=-1)
    return smallest.max(-1)
  real_r, fake_r, d = radii(real), radii(fake), dist(real, fake)
  return {"precision": (d < real_r[:, None]).any(0).mean(),
          "recall": (d < fake_r[None, :]).any(1).mean(),
          "density": (1.0 / k) * (d < real_r[:, None]).sum(0).mean(),
          "coverage": (d.min(1) < real_r).mean()}


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prdc_matches_the_prdc_package_formulas(k):
  rng = np.random.RandomState(20 + k)
  real = rng.normal(size=(230, 6))
  fake = rng.normal(size=(170, 6)) * 1.3 + 0.4    # partial overlap: every metric strictly in (0, 1)
  expected = _prdc_reference(real, fake, k)
  got = metrics.prdc(real.astype(np.float32), fake.astype(np.float32), k, chunk=64)
  ref32 = _prdc_reference(real.astype(np.float32).astype(np.float64),
                          fake.astype(np.float32).astype(np.float64), k)
  assert set(got) == set(metrics.PRDC_KEYS)
  for key in metrics.PRDC_KEYS:
    assert 0 < expected[key] < (k if key == "density" else 1), (key, expected[key])
    np.testing.assert_allclose(got[key], ref32[key], rtol=1e-12, err_msg=key)
    np.testing.assert_allclose(got[key], expected[key], atol=2 / 170, err_msg=key)


def test_prdc_invariants():
  rng = np.random.RandomState(30)
  x = rng.normal(size=(300, 10))
  same = metrics.prdc(x, x.copy(), 5)
  assert (same["precision"], same["recall"], same["coverage"]) == (1.0, 1.0, 1.0)
  # Naeem et al.: E[density] = 1 for one distribution. Measured over 10 seeds of
  # 2000 vs 2000 draws in 8-D (k=5): mean 0.9986, sd 0.0144; 4 sd bound.
  a, b = rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8))
  assert abs(metrics.prdc(a, b, 5)["density"] - 1.0) < 4 * 0.0144
  # Farther apart than every k-NN radius (radii of unit Gaussians in 10-D are < 10).
  far = metrics.prdc(x, x + 100.0, 5)
  assert far == {key: 0.0 for key in metrics.PRDC_KEYS}
  with pytest.raises(ValueError, match="nearest_k=5 needs more than 5"):
    metrics.prdc(x[:5], x, 5)


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
  np.testing.assert_array_equal(features_lib.to_unit_range(u8), images_lib.to_float(u8))
  x = jnp.array([-1.0, 0.0, 0.999, 1.0])
  np.testing.assert_array_equal(features_lib.to_unit_range(x), x)
  # np.uint8(255 * (x + 1) / 2) truncates: 0 -> 127, 0.999 -> 254.
  expected = np.uint8(255 * (np.asarray(x, np.float64) + 1) / 2)
  np.testing.assert_array_equal(expected, [0, 127, 254, 255])
  np.testing.assert_allclose(features_lib.to_unit_range(x, quantize=True),
                             expected / 127.5 - 1, atol=1e-6)


def test_sample_batches_calls_and_batches_are_independent():
  calls = []

  def sample_fn(rng, n):
    calls.append(n)
    seed = np.asarray(jax.random.key_data(rng)).ravel()
    return np.random.RandomState(seed).uniform(-1, 1, (n, 2, 2, 3))

  rng = jax.random.key(3)
  batches = [b["image"] for b in features_lib.sample_batches(sample_fn, rng, 10, 4, 3)]
  assert calls == [4, 4, 2]
  assert [len(b) for b in batches] == [3, 3, 3, 1]
  calls.clear()
  whole = [b["image"] for b in features_lib.sample_batches(sample_fn, rng, 10, 4, 100)]
  assert calls == [4, 4, 2] and [len(b) for b in whole] == [10]
  np.testing.assert_array_equal(np.concatenate(batches), whole[0])
  # Call i draws from fold_in(rng, i): the images do not depend on the feature batch size.
  second = sample_fn(jax.random.fold_in(rng, 1), 4)
  np.testing.assert_array_equal(whole[0][4:8], second)
  assert not np.allclose(whole[0][:4], whole[0][4:8])


# --------------------------------------------------------------------- fd_digits / evaluators
DIGITS = ml_collections.ConfigDict({"name": "digits", "image_size": 16, "train_split": "train",
                                    "eval_split": "test"})


def _digits_config(**overrides) -> ml_collections.ConfigDict:
  cfg = evaluators.default_config("sample_quality")
  cfg.update({"metrics": ("fd_digits",), "num_samples": 200, "batch_size": 64, **overrides})
  return cfg


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


@pytest.fixture
def use_digits_net(digits_net, monkeypatch):
  monkeypatch.setitem(fid.FEATURE_NETS, "digits", lambda cfg: digits_net)
  return digits_net


def test_digits_classifier_learns(digits_net):
  from nda_jax.data import digits  # pylint: disable=g-import-not-at-top
  images, labels = digits.load_digits("test", digits_classifier.INPUT_SIZE)
  assert digits_classifier.accuracy(digits_net.variables, images, labels) > 0.5


def test_fd_digits_evaluator_real_vs_noise(use_digits_net, tmp_path):
  from nda_jax.data import digits  # pylint: disable=g-import-not-at-top
  real, _ = digits.load_digits("train", 16)
  cfg = _digits_config(metrics=("fd_digits", "kid_digits"), kid_subsets=10, sample_batch_size=48)
  (ev,) = evaluators.build(ml_collections.ConfigDict({"fd": cfg}), DIGITS,
                           workdir=str(tmp_path)).values()
  assert isinstance(ev, fid.SampleQualityEvaluator) and ev.requires == ("sample_fn",)
  calls = []

  def real_fn(rng, n):
    calls.append(n)
    seed = np.asarray(jax.random.key_data(rng)).ravel()
    return real[np.random.RandomState(seed).choice(len(real), n, replace=False)]

  def noise_fn(rng, n):
    seed = np.asarray(jax.random.key_data(rng)).ravel()
    return np.random.RandomState(seed).uniform(-1, 1, (n, 16, 16, 3))

  good = dict(ev.run(sample_fn=real_fn))
  assert calls == [48, 48, 48, 48, 8]     # num_samples=200 in calls of sample_batch_size
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


def test_fd_digits_is_the_frechet_distance_of_the_features(use_digits_net):
  """The evaluator's number against NumPy statistics of the same images' features."""
  from nda_jax.data import digits  # pylint: disable=g-import-not-at-top
  real, _ = digits.load_digits("train", 16)
  test, _ = digits.load_digits("test", 16)
  cfg = _digits_config(num_samples=100, sample_batch_size=32, ref_split="test")
  ev = fid.SampleQualityEvaluator(cfg, DIGITS)
  value = dict(ev.run(sample_fn=lambda rng, n: real[:n]))["fd_digits"]
  embed = lambda x: np.asarray(jax.jit(use_digits_net.apply_fn)(
      use_digits_net.variables, jnp.asarray(x / 127.5 - 1, jnp.float32))["features"], np.float64)
  # sample_fn returns the first n train images on every call: 3 x 32 + 4 of them.
  x = embed(np.concatenate([real[:32]] * 3 + [real[:4]]))
  y = embed(test)
  expected = _fid_by_eigenvalues(x.mean(0), np.cov(x, rowvar=False), y.mean(0),
                                 np.cov(y, rowvar=False))
  np.testing.assert_allclose(value, expected, rtol=1e-3)


def test_prdc_digits_are_prdc_of_the_classifier_features(use_digits_net):
  """PRDC in the evaluator: the samples' and the first num_samples reference images' features."""
  from nda_jax.data import digits  # pylint: disable=g-import-not-at-top
  real, _ = digits.load_digits("train", 16)
  test, _ = digits.load_digits("test", 16)
  cfg = _digits_config(metrics=("fd_digits", "prdc_digits"), num_samples=120,
                       sample_batch_size=40, ref_split="test", nearest_k=3)
  got = dict(fid.SampleQualityEvaluator(cfg, DIGITS).run(sample_fn=lambda rng, n: real[:n]))
  assert set(got) == {"fd_digits"} | {k + "_digits" for k in metrics.PRDC_KEYS}
  embed = lambda x: np.asarray(jax.jit(use_digits_net.apply_fn)(
      use_digits_net.variables, jnp.asarray(x / 127.5 - 1, jnp.float32))["features"], np.float64)
  expected = _prdc_reference(embed(test[:120]), embed(np.concatenate([real[:40]] * 3)), 3)
  # The sample features repeat 3 times: density counts each, coverage / precision as one.
  for key in metrics.PRDC_KEYS:
    np.testing.assert_allclose(got[key + "_digits"], expected[key], atol=1e-9, err_msg=key)


def test_truncation_reaches_sample_fn(use_digits_net):
  from nda_jax.data import digits  # pylint: disable=g-import-not-at-top
  real, _ = digits.load_digits("train", 16)
  seen = []
  def sample_fn(rng, n, **kwargs):
    seen.append(kwargs)
    return real[:n]
  for truncation, expected in ((0.0, {}), (0.7, {"truncation": 0.7})):
    seen.clear()
    cfg = _digits_config(num_samples=64, sample_batch_size=32, truncation=truncation)
    dict(fid.SampleQualityEvaluator(cfg, DIGITS).run(sample_fn=sample_fn))
    assert seen == [expected, expected]
  with pytest.raises(ValueError, match="truncation=-0.5"):
    fid.SampleQualityEvaluator(_digits_config(truncation=-0.5), DIGITS)


def test_ref_stats_compute_matches_direct(use_digits_net):
  from nda_jax.data import digits  # pylint: disable=g-import-not-at-top
  data = ml_collections.ConfigDict({"name": "digits", "image_size": 16})
  stats = ref_stats.compute(data, "test", "digits", ml_collections.ConfigDict(), batch_size=64)
  images, _ = digits.load_digits("test", 16)
  direct = np.asarray(jax.jit(use_digits_net.apply_fn)(
      use_digits_net.variables, jnp.asarray(images / 127.5 - 1, jnp.float32))["features"],
      np.float64)
  assert stats.count == len(images) == 300
  np.testing.assert_allclose(stats.mu, direct.mean(0), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(stats.sigma, np.cov(direct, rowvar=False), rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------- the registry
def test_build_rejects_bad_entries_naming_the_valid_ones():
  build = lambda **entry: evaluators.build(ml_collections.ConfigDict({"e": entry}), DIGITS)
  with pytest.raises(ValueError, match=r"type='sample_qualty' .*did you mean 'sample_quality'"):
    build(type="sample_qualty")
  with pytest.raises(ValueError, match=r"config.evals.e.num_sampels is not a setting of a "
                     r"'sample_quality' evaluator \(did you mean 'num_samples'\?\)"):
    build(type="sample_quality", num_sampels=10)
  with pytest.raises(ValueError, match=r"unknown \['bogus'\]; valid choices"):
    build(type="sample_quality", metrics=("fid", "bogus"))
  with pytest.raises(ValueError, match="one config.evals entry per network"):
    build(type="sample_quality", metrics=("fid", "fd_digits"))
  with pytest.raises(ValueError, match=r"resize='bicubic': valid modes \['clean', 'legacy_pytorch'\]"):
    build(type="sample_quality", metrics=("fid",), resize="bicubic")
  with pytest.raises(FileNotFoundError, match="pytorch-fid"):
    build(type="sample_quality", metrics=("fid", "is"), inception_weights="/nonexistent.pth")
  with pytest.raises(ValueError, match=r"no evaluator 'fdd' in config.evals \(did you mean 'fd'"):
    evaluators.build(ml_collections.ConfigDict({"fd": _digits_config()}), DIGITS, only=["fdd"])


class FakeEvaluator:
  """A new evaluator type: one class, one REGISTRY line."""
  requires = ("embed_fn",)

  @staticmethod
  def default_config():
    return ml_collections.ConfigDict({"type": "fake", "every": 0, "scale": 1.0, "split": ""})

  def __init__(self, cfg, data_cfg, *, workdir, mesh):
    self.cfg, self.data_cfg, self.workdir, self.mesh = cfg, data_cfg, workdir, mesh

  def run(self, embed_fn):
    yield "fake/sum", self.cfg.scale * float(np.sum(embed_fn(np.ones((2, 1), np.uint8))))


def test_registry_takes_a_new_type_with_no_other_change(monkeypatch):
  monkeypatch.setitem(evaluators.REGISTRY, "fake", f"{__name__}:FakeEvaluator")
  assert evaluators.default_config("fake").to_dict() == FakeEvaluator.default_config().to_dict()
  evals = ml_collections.ConfigDict({"f": {"type": "fake", "scale": 3.0},
                                     "fd": _digits_config()})
  built = evaluators.build(evals, DIGITS, workdir="/w", mesh="m", only=["f"])
  (ev,) = built.values()
  assert list(built) == ["f"] and isinstance(ev, FakeEvaluator)
  assert ev.cfg.to_dict() == {"type": "fake", "every": 0, "scale": 3.0, "split": ""}
  assert (ev.data_cfg, ev.workdir, ev.mesh) == (DIGITS, "/w", "m")
  assert dict(ev.run(embed_fn=lambda x: x * 2)) == {"fake/sum": 12.0}
  with pytest.raises(ValueError, match=r"config.evals.f.scal is not a setting of a 'fake' "
                     r"evaluator \(did you mean 'scale'\?\)"):
    evaluators.validate(ml_collections.ConfigDict({"f": {"type": "fake", "scal": 2.0}}))


def _labelled(num_classes: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({**DIGITS.to_dict(), "num_classes": num_classes})


def test_intra_class_fd_is_the_mean_of_per_class_frechet_distances(use_digits_net):
  """Intra-class fd_digits (StudioGAN's IFID) against float64 NumPy statistics per class.

  The 'generator' returns training digits of the class after the one asked for
  (a mislabelling G), so every per-class distance is far from 0; a correct one
  scores lower.
  """
  from nda_jax.data import digits  # pylint: disable=g-import-not-at-top
  train, labels = digits.load_digits("train", 16)
  num, call = 140, 70
  by_class = {c: train[labels == c] for c in range(10)}

  def make_sample_fn(shift):
    calls = {}

    def sample_fn(rng, n, labels):
      del rng
      c = int(labels[0])
      assert np.all(labels == c)
      start = calls.get(c, 0)
      calls[c] = start + n
      return by_class[(c + shift) % 10][start:start + n]
    return sample_fn

  cfg = _digits_config(num_samples=100, sample_batch_size=call, intra_class=True,
                       intra_per_class=num)
  ev = fid.SampleQualityEvaluator(cfg, _labelled(10))
  with_main = lambda fn: lambda rng, n, labels=None: train[:n] if labels is None else fn(
      rng, n, labels)
  got = dict(ev.run(sample_fn=with_main(make_sample_fn(1))))
  embed = lambda x: np.asarray(jax.jit(use_digits_net.apply_fn)(
      use_digits_net.variables, jnp.asarray(x / 127.5 - 1, jnp.float32))["features"], np.float64)
  expected = {}
  for c in range(10):
    x, y = embed(by_class[(c + 1) % 10][:num]), embed(by_class[c])
    expected[c] = _fid_by_eigenvalues(x.mean(0), np.cov(x, rowvar=False), y.mean(0),
                                      np.cov(y, rowvar=False))
  assert set(got) == {"fd_digits", "intra_fd_digits"} | {f"intra_fd_digits/{c}" for c in range(10)}
  # Measured: relative error 1.4e-7 (float32 features, float64 statistics) on a 2-core
  # x86 CPU; 1e-5 leaves room for other CPUs' float32 convolutions.
  for c in range(10):
    np.testing.assert_allclose(got[f"intra_fd_digits/{c}"], expected[c], rtol=1e-5)
  np.testing.assert_allclose(got["intra_fd_digits"], np.mean(list(expected.values())), rtol=1e-5)
  right = dict(ev.run(sample_fn=with_main(make_sample_fn(0))))
  assert right["intra_fd_digits"] < 0.5 * got["intra_fd_digits"]


def test_intra_class_needs_a_frechet_metric_and_classes():
  with pytest.raises(ValueError, match="needs a Fréchet-distance metric"):
    fid.SampleQualityEvaluator(_digits_config(metrics=("kid_digits",), intra_class=True),
                               _labelled(10))
  with pytest.raises(ValueError, match="num_classes >= 2"):
    fid.SampleQualityEvaluator(_digits_config(intra_class=True), _labelled(1))
