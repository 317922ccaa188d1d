"""kNN monitor: the weighted vote vs a NumPy kNN, the evaluator end to end on the digits."""
import jax
import ml_collections
import numpy as np
import pytest

from nda_jax import parallel
from nda_jax.data import digits
from nda_jax.evaluators import knn


def _numpy_knn(train, labels, query, k, temperature, num_classes):
  """Sort all similarities, sum exp(sim / t) of the k best per class, take the best class."""
  sims = np.asarray(query, np.float64) @ np.asarray(train, np.float64).T
  out = []
  for row in sims:
    nearest = np.argsort(-row, kind="stable")[:k]
    votes = np.bincount(labels[nearest], weights=np.exp(row[nearest] / temperature),
                        minlength=num_classes)
    out.append(np.argmax(votes))
  return np.array(out)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _clusters(seed=0, n=300, queries=40, dim=16, classes=5):
  """Noisy class clusters: neighbourhoods are mixed, so k and the weights change the vote."""
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((classes, dim))
  labels = rng.integers(0, classes, n)
  query_labels = rng.integers(0, classes, queries)
  train = _unit(centres[labels] + 1.5 * rng.standard_normal((n, dim))).astype(np.float32)
  query = _unit(centres[query_labels] + 1.5 * rng.standard_normal((queries, dim)))
  return train, labels.astype(np.int32), query.astype(np.float32)


@pytest.mark.parametrize("k,temperature", [(1, 0.1), (20, 0.02), (50, 0.1), (300, 0.05)])
def test_weighted_knn_matches_numpy(k, temperature):
  train, labels, query = _clusters()
  got = knn.weighted_knn_predict(train, labels, query, k=k, temperature=temperature,
                                 num_classes=5)
  assert got.dtype == np.int32 and got.shape == (40,)
  np.testing.assert_array_equal(got, _numpy_knn(train, labels, query, k, temperature, 5))


def test_weights_and_k_matter_on_the_test_data():
  """Guards the test above: its cases must not all give the same predictions."""
  train, labels, query = _clusters()
  nearest = _numpy_knn(train, labels, query, 1, 0.1, 5)
  for k, temperature in ((20, 0.02), (50, 0.1), (300, 0.05)):
    weighted = _numpy_knn(train, labels, query, k, temperature, 5)
    flat = _numpy_knn(train, labels, query, k, 1e3, 5)     # ~ a plain majority vote
    assert np.any(nearest != weighted) and np.any(weighted != flat)


def test_k_larger_than_the_bank_raises():
  train, labels, query = _clusters()
  with pytest.raises(ValueError, match=r"k=301 must be in \[1, 300\]"):
    knn.weighted_knn_predict(train, labels, query, k=301, temperature=0.1, num_classes=5)


def _data_cfg():
  return ml_collections.ConfigDict({"name": "digits", "image_size": 16, "train_split": "train",
                                    "eval_split": "test"})


class _PixelEmbed:
  """embed_fn: raw pixels as features; records what it was given."""

  def __init__(self, mesh_size):
    self.mesh_size = mesh_size
    self.batches = []

  def __call__(self, images):
    assert images.dtype == np.uint8 and len(images) % self.mesh_size == 0
    self.batches.append(np.array(images))
    return 3.0 * images.reshape(len(images), -1).astype(np.float32)   # scale: must be normalised


def test_default_config_and_validation():
  cfg = knn.KnnEvaluator.default_config()
  assert dict(cfg) == {"type": "knn", "every": 0, "k": 200, "temperature": 0.1,
                       "train_split": "", "eval_split": "", "max_train": 0, "max_eval": 0,
                       "batch_size": 256, "seed": 0}
  mesh = parallel.default_mesh()
  data_cfg = _data_cfg()
  data_cfg.eval_split = "all"
  cfg.batch_size = 20
  ev = knn.KnnEvaluator(cfg, data_cfg, workdir=None, mesh=mesh)
  assert (ev.train_split, ev.eval_split, ev.batch_size) == ("train", "all", 24)
  cfg.eval_split = "test"
  assert knn.KnnEvaluator(cfg, data_cfg, workdir=None, mesh=mesh).eval_split == "test"
  cfg.temperature = 0.0
  with pytest.raises(ValueError, match="temperature > 0"):
    knn.KnnEvaluator(cfg, data_cfg, workdir=None, mesh=mesh)


def _on_mesh(embed):
  """The same embed_fn as a trainer's: a jitted shard_map returning a sharded global array."""
  dp = parallel.DataParallel()
  fn = dp.map_fn(lambda x: 3.0 * x.reshape(len(x), -1).astype(jax.numpy.float32),
                 in_specs=jax.P(parallel.AXIS), out_specs=jax.P(parallel.AXIS))

  def embed_fn(images):
    embed(images)
    return fn(dp.shard_batch(images))
  return embed_fn


@pytest.mark.parametrize("on_mesh", [False, True])
def test_evaluator_on_digits_matches_numpy(on_mesh):
  mesh = parallel.default_mesh()
  cfg = knn.KnnEvaluator.default_config()
  cfg.batch_size = 60                     # -> 64: the 1,497 / 300 examples leave padded batches
  embed = _PixelEmbed(mesh.devices.size)
  embed_fn = _on_mesh(embed) if on_mesh else embed
  (name, acc), = knn.KnnEvaluator(cfg, _data_cfg(), workdir=None, mesh=mesh).run(
      embed_fn=embed_fn)
  assert name == "knn_top1"
  train, train_labels = digits.load_digits("train", 16)
  test, test_labels = digits.load_digits("test", 16)
  flat = lambda x: _unit(x.reshape(len(x), -1).astype(np.float64))
  want = np.mean(_numpy_knn(flat(train), train_labels, flat(test), 200, 0.1, 10) == test_labels)
  assert acc == pytest.approx(want, abs=1e-12)
  assert 0.8 < acc < 1.0
  assert all(len(b) == 64 for b in embed.batches)
  assert len(embed.batches) == -(-1497 // 64) + -(-300 // 64)


def test_evaluator_subsets_are_seeded_and_only_they_are_embedded():
  mesh = parallel.default_mesh()
  train, train_labels = digits.load_digits("train", 16)
  test, test_labels = digits.load_digits("test", 16)
  where = {img.tobytes(): ("train", i) for i, img in enumerate(train)}
  where.update({img.tobytes(): ("test", i) for i, img in enumerate(test)})

  def run(seed):
    cfg = knn.KnnEvaluator.default_config()
    cfg.update(k=50, max_train=400, max_eval=100, batch_size=64, seed=seed)
    embed = _PixelEmbed(mesh.devices.size)
    (_, acc), = knn.KnnEvaluator(cfg, _data_cfg(), workdir=None, mesh=mesh).run(embed_fn=embed)
    images = np.concatenate(embed.batches)
    real = images.reshape(len(images), -1).any(axis=1)            # padding rows are all zero
    seen = [where[img.tobytes()] for img in images[real]]
    assert len(embed.batches) == -(-400 // 64) + -(-100 // 64)
    return acc, [i for s, i in seen if s == "train"], [i for s, i in seen if s == "test"]

  acc, train_idx, test_idx = run(3)
  assert len(set(train_idx)) == len(train_idx) == 400
  assert len(set(test_idx)) == len(test_idx) == 100
  flat = lambda x: _unit(x.reshape(len(x), -1).astype(np.float64))
  want = np.mean(_numpy_knn(flat(train[train_idx]), train_labels[train_idx], flat(test[test_idx]),
                            50, 0.1, 10) == test_labels[test_idx])
  assert acc == pytest.approx(want, abs=1e-12)
  again, train_again, test_again = run(3)
  assert (again, train_again, test_again) == (acc, train_idx, test_idx)
  _, train_other, test_other = run(4)
  assert set(train_other) != set(train_idx) and set(test_other) != set(test_idx)


def test_subset_batches_split_over_processes(monkeypatch):
  """3 simulated processes: each kept example once, the same number of batches everywhere."""
  test, _ = digits.load_digits("test", 16)
  keep = knn._subset(len(test), 50, seed=0)
  assert keep.sum() == 50 and np.array_equal(keep, knn._subset(len(test), 50, seed=0))
  seen, counts = [], []
  for index in range(3):
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    data = knn.pipeline.make_eval_iterator(_data_cfg(), "test", 24)
    batches = list(knn._select(data, keep))
    counts.append(len(batches))
    for batch in batches:
      assert batch["image"].shape == (8, 16, 16, 3) and batch["label"].shape == (8,)
      assert not batch["image"][~batch["mask"]].any()
      seen += [img.tobytes() for img in batch["image"][batch["mask"]]]
  assert counts == [max(counts)] * 3 and max(counts) > 1
  assert sorted(seen) == sorted(img.tobytes() for img in test[keep])
