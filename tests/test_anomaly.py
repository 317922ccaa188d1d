"""Anomaly detection: AUROC, batched scoring over devices, the evaluator's table."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nda_jax import evaluators
from nda_jax.data import digits
from nda_jax.evaluators import anomaly


def _pairwise_auroc(pos, neg):
  """Mann-Whitney: P(pos > neg) + P(pos == neg) / 2, by brute force."""
  pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
  return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def test_auroc_matches_pairwise_definition_with_ties():
  rng = np.random.RandomState(0)
  pos = np.round(rng.normal(0.5, 1, 57), 1)     # rounding makes ties
  neg = np.round(rng.normal(0.0, 1, 43), 1)
  np.testing.assert_allclose(anomaly.auroc(pos, neg), _pairwise_auroc(pos, neg), rtol=1e-12)
  assert anomaly.auroc(pos + 100, neg) == 1.0
  assert anomaly.auroc(neg, pos + 100) == 0.0


def _pixel_sum(x, y):
  del y
  return jnp.sum(x, axis=(1, 2, 3))


def test_scorer_over_devices_pads_masks_and_labels():
  assert jax.device_count() == 8
  rng = np.random.RandomState(1)
  images = rng.randint(0, 256, (37, 4, 4, 3)).astype(np.uint8)
  labels = rng.randint(0, 10, 37).astype(np.int32)
  scorer = anomaly.Scorer(jax.jit(_pixel_sum), batch_size=12)
  assert scorer.batch_size == 16
  expected = (images / 127.5 - 1).sum(axis=(1, 2, 3))
  np.testing.assert_allclose(scorer.score_array(images, labels), expected, rtol=1e-5, atol=1e-4)
  label_fn = jax.jit(lambda x, y: y.astype(jnp.float32))
  given = anomaly.Scorer(label_fn, 16, labels="given")
  np.testing.assert_array_equal(given.score_array(images, labels), labels)
  zeros = anomaly.Scorer(label_fn, 16)
  np.testing.assert_array_equal(zeros.score_array(images, labels), np.zeros(37))
  gray = anomaly.Scorer(jax.jit(_pixel_sum), 16, channels=3)
  np.testing.assert_allclose(gray.score_array(images[..., :1], labels),
                             3 * (images[..., 0] / 127.5 - 1).sum(axis=(1, 2)), rtol=1e-5,
                             atol=1e-4)
  with pytest.raises(ValueError, match="valid choices"):
    anomaly.Scorer(label_fn, 16, labels="random")


def _template_score_fn():
  """A toy 'discriminator': closeness to the mean training digit (in-dist scores high)."""
  train, _ = digits.load_digits("train", 16)
  template = jnp.asarray(train.mean(0) / 127.5 - 1, jnp.float32)
  return jax.jit(lambda x, y: -jnp.mean((x - template) ** 2, axis=(1, 2, 3)))


def _fake_cifar10c(path, per=20):
  """Two corruptions of the in-distribution test images, 5 increasing severities."""
  test, labels = digits.load_digits("test", 16)
  base = test[:per].astype(np.float32)
  noise = np.random.RandomState(2).normal(size=base.shape)
  corrupt = {"gaussian_noise": lambda s: base + 25 * s * noise,
             "brightness": lambda s: base + 30 * s}
  os.makedirs(path)
  for name, fn in corrupt.items():
    np.save(os.path.join(path, f"{name}.npy"),
            np.concatenate([np.clip(fn(s), 0, 255).astype(np.uint8) for s in range(1, 6)]))
  np.save(os.path.join(path, "labels.npy"), np.tile(labels[:per], 5))
  return tuple(corrupt)


DIGITS = ml_collections.ConfigDict({"name": "digits", "image_size": 16, "train_split": "train",
                                    "eval_split": "test"})


def _anomaly_config(**overrides) -> ml_collections.ConfigDict:
  cfg = evaluators.default_config("anomaly")
  cfg.update(overrides)
  return cfg


def test_anomaly_evaluator_table(tmp_path):
  c10c = str(tmp_path / "CIFAR-10-C")
  corruptions = _fake_cifar10c(c10c)
  cfg = _anomaly_config(
      batch_size=64, max_examples=200, cifar10c_dir=c10c, corruptions=corruptions,
      ndas=("jigsaw",), synthetic=("uniform_noise", "photo_patches"),
      ood_data=({"name": "digits", "image_size": 16, "split": "train", "label": "digits_train"},))
  (evaluator,) = evaluators.build(ml_collections.ConfigDict({"anomaly": cfg}), DIGITS,
                                  workdir=str(tmp_path)).values()
  assert evaluator.requires == ("score_fn",)
  results = dict(evaluator.run(score_fn=_template_score_fn()))

  assert results["anomaly/synthetic/uniform_noise"] > 0.95
  assert 0.35 < results["anomaly/digits_train"] < 0.65   # same distribution
  assert 0.0 <= results["anomaly/nda/jigsaw"] <= 1.0
  assert 0.0 <= results["anomaly/synthetic/photo_patches"] <= 1.0
  for name in corruptions:
    by_severity = [results[f"anomaly/cifar10c/{name}/s{s}"] for s in range(1, 6)]
    assert np.all(np.diff(by_severity) >= -0.05), (name, by_severity)
    assert by_severity[-1] > by_severity[0]
    assert min(by_severity) - 1e-9 <= results[f"anomaly/cifar10c/{name}"] <= max(by_severity) + 1e-9
  np.testing.assert_allclose(
      results["anomaly/cifar10c_mean"],
      np.mean([results[f"anomaly/cifar10c/{n}"] for n in corruptions]))

  table = json.load(open(tmp_path / "anomaly" / "anomaly.json"))
  assert table["in_distribution"] == {**table["in_distribution"], "split": "test", "n": 200}
  assert "[0, 1]" in table["normalisation"]
  assert len(table["rows"]) == 4 + 6 * len(corruptions)
  assert {r["n_ood"] for r in table["rows"] if r["set"] == "cifar10c/brightness"} == {20, 100}
  markdown = open(tmp_path / "anomaly" / "anomaly.md").read()
  assert "| gaussian_noise |" in markdown and "**mean**" in markdown
  assert "| synthetic/uniform_noise | 200 |" in markdown


def test_anomaly_auroc_of_a_synthetic_set_against_numpy(tmp_path):
  """One set end to end: the evaluator's AUROC is that of the scores of the same images."""
  score_fn = _template_score_fn()
  cfg = _anomaly_config(batch_size=16, max_examples=40, synthetic=("uniform_noise",), seed=3,
                        split="train", out_dir=str(tmp_path / "tables"))
  results = dict(anomaly.AnomalyEvaluator(cfg, DIGITS).run(score_fn=score_fn))
  train, _ = digits.load_digits("train", 16)
  noise = anomaly.uniform_noise(40, train.shape[1:], 3)
  score = lambda x: np.asarray(score_fn(jnp.asarray(x / 127.5 - 1, jnp.float32), None))
  expected = _pairwise_auroc(score(train[:40]), score(noise))
  np.testing.assert_allclose(results["anomaly/synthetic/uniform_noise"], expected, rtol=1e-6)
  assert json.load(open(tmp_path / "tables" / "anomaly.json"))["in_distribution"]["n"] == 40


def test_anomaly_evaluator_rejects_bad_settings(tmp_path):
  with pytest.raises(FileNotFoundError, match="zenodo"):
    anomaly.AnomalyEvaluator(_anomaly_config(cifar10c_dir=str(tmp_path), corruptions=("fog",)),
                             DIGITS)
  with pytest.raises(ValueError, match="photo_patches"):
    anomaly.AnomalyEvaluator(_anomaly_config(synthetic=("gaussian_blobs",)), DIGITS)
  with pytest.raises(ValueError, match="valid choices"):
    anomaly.AnomalyEvaluator(_anomaly_config(labels="random"), DIGITS)
  with pytest.raises(ValueError, match="jigsaw"):     # the NDA error names the valid NDAs
    anomaly.AnomalyEvaluator(_anomaly_config(ndas=("jigsw",)), DIGITS)


def test_default_sets_only_when_none_configured():
  nda = ml_collections.ConfigDict({"name": "cutout", "probs": None, "params": {}})
  cfg = _anomaly_config()
  assert anomaly.with_default_sets(cfg, nda)
  assert cfg.ndas == (nda.to_dict(),)
  assert cfg.synthetic == ("photo_patches", "uniform_noise")
  no_nda = _anomaly_config()
  assert anomaly.with_default_sets(no_nda, None) and no_nda.ndas == ()
  configured = _anomaly_config(synthetic=("uniform_noise",))
  assert not anomaly.with_default_sets(configured, nda)
  assert configured.ndas == () and configured.synthetic == ("uniform_noise",)


def _load_config(name: str, arg=None) -> ml_collections.ConfigDict:
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_cifar_configs_declare_the_papers_anomaly_sets(tmp_path):
  """The CIFAR-10 config's evaluator on a CIFAR-10 test batch and CIFAR-10-C files written here.

  Official layouts: cifar-10-batches-py/test_batch (a pickle of uint8 [N, 3072]
  planes) and CIFAR-10-C's <corruption>.npy (uint8 [5 N, 32, 32, 3], severity
  1 first) + labels.npy, for the 19 corruptions of the official code.
  """
  import pickle  # pylint: disable=g-import-not-at-top
  for name in ("cifar10_nda_gan", "cifar100_nda_gan"):
    entry = _load_config(name).evals.anomaly
    assert entry.type == "anomaly" and entry.cifar10c_dir is None
    assert tuple(entry.ndas) == ("jigsaw", "stitch", "mixup", "cutout", "cutmix", "mosaic")
  assert tuple(_load_config("demo").evals.anomaly.ndas) == tuple(entry.ndas)

  n, rng = 24, np.random.RandomState(0)
  test = rng.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8)
  labels = rng.randint(0, 10, n)
  folder = tmp_path / "cifar-10-batches-py"
  folder.mkdir()
  with open(folder / "test_batch", "wb") as f:
    pickle.dump({b"data": test.transpose(0, 3, 1, 2).reshape(n, 3072),
                 b"labels": [int(l) for l in labels]}, f, protocol=2)
  c10c = tmp_path / "CIFAR-10-C"
  c10c.mkdir()
  corrupted = {}
  for i, corruption in enumerate(anomaly.CIFAR10C_CORRUPTIONS):
    shift = np.random.RandomState(i).normal(size=(5, n, 1, 1, 1)) * 20 + 8 * np.arange(
        1, 6)[:, None, None, None, None]
    corrupted[corruption] = np.clip(test[None] + shift, 0, 255).astype(np.uint8).reshape(
        5 * n, 32, 32, 3)
    np.save(c10c / f"{corruption}.npy", corrupted[corruption])
  np.save(c10c / "labels.npy", np.tile(labels, 5))

  config = _load_config("cifar10_nda_gan")
  config.data.data_dir = str(tmp_path)
  entry = config.evals.anomaly
  entry.cifar10c_dir, entry.batch_size = str(c10c), 16
  (evaluator,) = evaluators.build(config.evals, config.data, workdir=str(tmp_path),
                                  only=["anomaly"]).values()
  # A 'discriminator' that scores dark images high; its NumPy twin gives the reference.
  results = dict(evaluator.run(score_fn=jax.jit(lambda x, y: -jnp.mean(x, axis=(1, 2, 3)))))
  score = lambda images: -np.mean(images / 127.5 - 1.0, axis=(1, 2, 3))
  assert {f"anomaly/nda/{name}" for name in entry.ndas} <= set(results)
  for corruption, images in corrupted.items():
    np.testing.assert_allclose(results[f"anomaly/cifar10c/{corruption}"],
                               _pairwise_auroc(score(test), score(images)), atol=1e-9)
    np.testing.assert_allclose(results[f"anomaly/cifar10c/{corruption}/s5"],
                               _pairwise_auroc(score(test), score(images[4 * n:])), atol=1e-9)
  assert len([k for k in results if k.startswith("anomaly/cifar10c/") and k.count("/") == 2]) == 19
