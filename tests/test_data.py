"""Data sources and grain pipelines, read back from files in the official formats."""
import collections
import os
import pickle
import tarfile

import ml_collections
import numpy as np
from PIL import Image
import pytest

from nda_jax.data import digits
from nda_jax.data import pipeline
from nda_jax.data import sources

RNG = np.random.default_rng(0)


def _cfg(**kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(kw)


def _expected_hwc(row: np.ndarray) -> np.ndarray:
  """Official CIFAR row layout, element by element: [R plane | G plane | B plane]."""
  out = np.empty((32, 32, 3), np.uint8)
  for ch in range(3):
    for r in range(32):
      out[r, :, ch] = row[ch * 1024 + r * 32: ch * 1024 + r * 32 + 32]
  return out


def _write_pickle(path, batch):
  with open(path, "wb") as f:
    pickle.dump(batch, f, protocol=2)


def _tar_dir(folder, archive):
  with tarfile.open(archive, "w:gz") as tar:
    tar.add(folder, arcname=os.path.basename(folder))


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory):
  """Official layout: 5 train batches of 8 and a test batch of 12 (unique images)."""
  root = tmp_path_factory.mktemp("c10")
  folder = root / "cifar-10-batches-py"
  folder.mkdir()
  rows = {}
  for name, n in [*((f"data_batch_{i}", 8) for i in range(1, 6)), ("test_batch", 12)]:
    data = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(x) for x in RNG.integers(0, 10, n)]
    _write_pickle(folder / name, {b"batch_label": name.encode(), b"data": data,
                                  b"labels": labels, b"filenames": [b"x.png"] * n})
    rows[name] = (data, labels)
  archive_root = tmp_path_factory.mktemp("c10tar")
  _tar_dir(str(folder), str(archive_root / "cifar-10-python.tar.gz"))
  return root, archive_root, rows


@pytest.fixture(scope="module")
def cifar100_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("c100")
  folder = root / "cifar-100-python"
  folder.mkdir()
  rows = {}
  for name, n in (("train", 10), ("test", 6)):
    data = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
    fine = [int(x) for x in RNG.integers(0, 100, n)]
    coarse = [int(x) for x in RNG.integers(0, 20, n)]
    _write_pickle(folder / name, {b"data": data, b"fine_labels": fine,
                                  b"coarse_labels": coarse})
    rows[name] = (data, fine, coarse)
  archive = root / "cifar-100-python.tar.gz"
  _tar_dir(str(folder), str(archive))
  return root, archive, rows


def _read_all(source):
  examples = [source[i] for i in range(len(source))]
  return (np.stack([e["image"] for e in examples]),
          np.array([e["label"] for e in examples]))


# ---------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("where", ["root", "folder", "archive_dir", "archive"])
def test_cifar10_round_trip(cifar10_dir, where):
  root, archive_root, rows = cifar10_dir
  data_dir = {"root": root, "folder": root / "cifar-10-batches-py",
              "archive_dir": archive_root,
              "archive": archive_root / "cifar-10-python.tar.gz"}[where]
  cfg = _cfg(name="cifar10", data_dir=str(data_dir))
  for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]),
                       ("test", ["test_batch"])):
    source = sources.make_source(cfg, split)
    images, labels = _read_all(source)
    want_rows = np.concatenate([rows[n][0] for n in names])
    want_labels = sum((rows[n][1] for n in names), [])
    assert images.dtype == np.uint8 and images.shape == (len(want_rows), 32, 32, 3)
    np.testing.assert_array_equal(images, np.stack([_expected_hwc(r) for r in want_rows]))
    np.testing.assert_array_equal(labels, want_labels)
    assert source.num_classes == 10 and source[0]["label"].dtype == np.int32


@pytest.mark.parametrize("label_key,num_classes,col", [(None, 100, 1),
                                                       ("coarse_labels", 20, 2)])
@pytest.mark.parametrize("use_archive", [False, True])
def test_cifar100_round_trip(cifar100_dir, label_key, num_classes, col, use_archive):
  root, archive, rows = cifar100_dir
  cfg = _cfg(name="cifar100", data_dir=str(archive if use_archive else root),
             label_key=label_key)
  for split in ("train", "test"):
    source = sources.make_source(cfg, split)
    images, labels = _read_all(source)
    np.testing.assert_array_equal(images, np.stack([_expected_hwc(r) for r in rows[split][0]]))
    np.testing.assert_array_equal(labels, rows[split][col])
    assert source.num_classes == num_classes


class _CreatesAFile:
  """Unpickles into a call of `open(path, 'w')`: what a crafted data file would do."""

  def __init__(self, path, how):
    self.path, self.how = path, how

  def __reduce__(self):
    if self.how == "os.system":
      return os.system, (f"touch {self.path}",)
    return open, (self.path, "w")


@pytest.mark.parametrize("how", ["os.system", "open"])
@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_cifar_crafted_pickle_runs_nothing(tmp_path, how, protocol):
  """A data file whose unpickling would call a function is refused before the call."""
  folder = tmp_path / "cifar-10-batches-py"
  folder.mkdir()
  created = tmp_path / "created"
  batch = {b"payload": _CreatesAFile(str(created), how),
           b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
  with open(folder / "test_batch", "wb") as f:
    pickle.dump(batch, f, protocol=protocol)
  with pytest.raises(ValueError, match=r"test_batch is not an official CIFAR file: it calls "
                                       r"(posix\.system|builtins\.open|_?io\.open)"):
    sources.make_source(_cfg(name="cifar10", data_dir=str(tmp_path)), "test")
  assert not created.exists()


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4])
def test_cifar_pickle_of_any_protocol_without_out_of_band_data_loads(tmp_path, protocol):
  """What the official files hold (an ndarray, lists, bytes) passes the restricted unpickler."""
  folder = tmp_path / "cifar-10-batches-py"
  folder.mkdir()
  data = RNG.integers(0, 256, (3, 3072), dtype=np.uint8)
  with open(folder / "test_batch", "wb") as f:
    pickle.dump({b"batch_label": b"testing batch 1 of 1", b"data": data, b"labels": [3, 1, 4],
                 b"filenames": [b"a.png", b"b.png", b"c.png"]}, f, protocol=protocol)
  source = sources.make_source(_cfg(name="cifar10", data_dir=str(tmp_path)), "test")
  assert len(source) == 3
  np.testing.assert_array_equal(source[2]["image"], _expected_hwc(data[2]))


def test_cifar_errors_name_the_path(tmp_path, cifar10_dir):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError, match="nowhere.*cifar.html"):
    sources.make_source(_cfg(name="cifar10", data_dir=str(missing)), "train")
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*cifar-10-python.tar.gz"):
    sources.make_source(_cfg(name="cifar10", data_dir=str(tmp_path)), "train")
  # Corrupt pickle and a pickle with the wrong content.
  folder = tmp_path / "cifar-10-batches-py"
  folder.mkdir()
  (folder / "test_batch").write_bytes(b"\x80\x02not a pickle at all")
  with pytest.raises(ValueError, match="test_batch.*corrupt"):
    sources.make_source(_cfg(name="cifar10", data_dir=str(tmp_path)), "test")
  _write_pickle(folder / "test_batch", {b"data": np.zeros((2, 3072), np.uint8)})
  with pytest.raises(ValueError, match="test_batch.*lacks"):
    sources.make_source(_cfg(name="cifar10", data_dir=str(tmp_path)), "test")
  with pytest.raises(FileNotFoundError, match="data_batch_1"):
    sources.make_source(_cfg(name="cifar10", data_dir=str(tmp_path)), "train")
  # Truncated archive.
  good = cifar10_dir[1] / "cifar-10-python.tar.gz"
  bad = tmp_path / "cifar-10-python.tar.gz"
  bad.write_bytes(good.read_bytes()[:200])
  with pytest.raises(ValueError, match=str(bad)):
    sources.make_source(_cfg(name="cifar10", data_dir=str(bad)), "test")
  with pytest.raises(ValueError, match="image_size"):
    sources.make_source(_cfg(name="cifar10", data_dir=str(tmp_path), image_size=64), "test")
  with pytest.raises(ValueError, match="coarse_labels"):
    sources.make_source(_cfg(name="cifar100", data_dir=str(tmp_path), label_key="x"), "test")
  with pytest.raises(ValueError, match="image_folder"):
    sources.make_source(_cfg(name="cifar1000"), "train")


# ---------------------------------------------------------------- image folder


def test_image_folder_round_trip_with_class_subset(tmp_path):
  want = collections.defaultdict(list)
  for wnid in ("n03", "n01", "n02"):
    for k in range(3):
      (tmp_path / "train" / wnid).mkdir(parents=True, exist_ok=True)
      image = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
      Image.fromarray(image).save(tmp_path / "train" / wnid / f"{k}.png")
      want[wnid].append(image)
  (tmp_path / "train" / "n01" / "notes.txt").write_text("not an image")
  subset = tmp_path / "imagenet100.txt"
  subset.write_text("# subset\nn03\n\nn01  # first\n")
  cfg = _cfg(name="image_folder", data_dir=str(tmp_path), image_size=16,
             class_list=str(subset))
  source = sources.make_source(cfg, "train")
  images, labels = _read_all(source)
  assert source.num_classes == 2 and len(source) == 6
  np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1])  # sorted: n01, n03
  np.testing.assert_array_equal(images, np.stack(want["n01"] + want["n03"]))
  full = sources.make_source(_cfg(name="image_folder", data_dir=str(tmp_path),
                                  image_size=16), "train")
  assert full.num_classes == 3 and len(full) == 9


def test_image_folder_resize_and_center_crop(tmp_path):
  (tmp_path / "val" / "a").mkdir(parents=True)
  # 16 high, 32 wide: red | green (center half) | red. No resize at size 16.
  wide = np.zeros((16, 32, 3), np.uint8)
  wide[..., 0] = 255
  wide[:, 8:24] = (0, 255, 0)
  Image.fromarray(wide).save(tmp_path / "val" / "a" / "0.png")
  Image.new("RGB", (96, 64), (10, 20, 30)).save(tmp_path / "val" / "a" / "1.JPEG", quality=100)
  Image.new("L", (40, 40), 77).save(tmp_path / "val" / "a" / "2.jpg")
  source = sources.make_source(_cfg(name="image_folder", data_dir=str(tmp_path),
                                    image_size=16), "val")
  np.testing.assert_array_equal(source[0]["image"], wide[:, 8:24])
  for i, color in ((1, (10, 20, 30)), (2, (77, 77, 77))):
    image = source[i]["image"]
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    np.testing.assert_allclose(image.reshape(-1, 3), np.broadcast_to(color, (256, 3)), atol=2)


def test_image_folder_errors(tmp_path):
  cfg = _cfg(name="image_folder", data_dir=str(tmp_path), image_size=8)
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}/train.*ROOT/<split>"):
    sources.make_source(cfg, "train")
  (tmp_path / "train" / "n01").mkdir(parents=True)
  with pytest.raises(ValueError, match=f"Class folder '{tmp_path}/train/n01' holds no"):
    sources.make_source(cfg, "train")
  (tmp_path / "train" / "n01" / "bad.png").write_bytes(b"garbage")
  source = sources.make_source(cfg, "train")
  # An empty class folder beside full ones is named and refused, not counted as a class.
  (tmp_path / "train" / "n02").mkdir()
  with pytest.raises(ValueError, match=f"Class folder '{tmp_path}/train/n02' holds no"):
    sources.make_source(cfg, "train")
  (tmp_path / "train" / "n02").rmdir()
  with pytest.raises(ValueError, match="bad.png.*corrupt"):
    source[0]  # pylint: disable=pointless-statement
  subset = tmp_path / "subset.txt"
  subset.write_text("n01\nn09\n")
  cfg.class_list = str(subset)
  with pytest.raises(ValueError, match="n09"):
    sources.make_source(cfg, "train")
  with pytest.raises(ValueError, match="image_size"):
    sources.make_source(_cfg(name="image_folder", data_dir=str(tmp_path)), "train")


# ---------------------------------------------------------------- tfds


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  tfds = pytest.importorskip("tensorflow_datasets")
  images = RNG.integers(0, 256, (14, 8, 8, 3), dtype=np.uint8)
  labels = RNG.integers(0, 5, 14)

  class NdaTestTinyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "img": tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8),
          "label": tfds.features.ClassLabel(num_classes=5)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(range(10)),
              "test": self._generate_examples(range(10, 14))}

    def _generate_examples(self, indices):
      for i in indices:
        yield i, {"img": images[i], "label": labels[i]}

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  NdaTestTinyImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir, images, labels


def test_tfds_round_trip(tfds_dir):
  data_dir, images, labels = tfds_dir
  cfg = _cfg(name="tfds", tfds_name="nda_test_tiny_images", data_dir=data_dir,
             image_key="img", num_classes=10)  # the ClassLabel's 5 wins
  got = {}
  for split in ("train", "test"):
    source = sources.make_source(cfg, split)
    assert source.num_classes == 5 and source.element_shape == (8, 8, 3)
    got[split] = _read_all(source)
  # array_record keeps no fixed order by key: compare as sets of (image, label).
  want = sorted((images[i].tobytes(), int(labels[i])) for i in range(14))
  have = sorted((im.tobytes(), int(lb)) for split in got for im, lb in zip(*got[split]))
  assert have == want and len(got["test"][0]) == 4


def test_tfds_resize_and_errors(tfds_dir, tmp_path):
  data_dir, images, _ = tfds_dir
  cfg = _cfg(name="tfds", tfds_name="nda_test_tiny_images", data_dir=data_dir,
             image_key="img", image_size=4)
  source = sources.make_source(cfg, "test")
  assert source[0]["image"].shape == (4, 4, 3) and source.element_shape == (4, 4, 3)
  cfg.image_key = "image"
  with pytest.raises(ValueError, match="'img'"):
    sources.make_source(cfg, "test")
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*array_record"):
    sources.make_source(_cfg(name="tfds", tfds_name="nda_test_tiny_images",
                             data_dir=str(tmp_path)), "test")
  with pytest.raises(ValueError, match="tfds_name"):
    sources.make_source(_cfg(name="tfds"), "test")


def test_tfds_registered_builder_with_image_feature():
  """A stock builder (mnist: Image feature, 28x28x1) through tfds's mock data."""
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    raw = tfds.data_source("mnist", split="train")
    plain = sources.make_source(_cfg(name="tfds", tfds_name="mnist"), "train")
    rgb = sources.make_source(_cfg(name="tfds", tfds_name="mnist", image_size=32), "train")
    assert len(plain) == 4 and plain.num_classes == 10 and plain.element_shape == (28, 28, 1)
    for i in range(4):
      np.testing.assert_array_equal(plain[i]["image"], raw[i]["image"])
      assert plain[i]["label"] == raw[i]["label"]
      image = rgb[i]["image"]
      assert image.shape == (32, 32, 3) and image.dtype == np.uint8
      np.testing.assert_array_equal(image[..., 0], image[..., 1])


# ---------------------------------------------------------------- digits


def test_digits_splits_and_pixels():
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  raw = datasets.load_digits()
  sizes = {"train": 1497, "test": 300, "all": 1797}
  idx = {s: digits.split_indices(s) for s in sizes}
  for split, n in sizes.items():
    images, labels = digits.load_digits(split)
    assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int32
    np.testing.assert_array_equal(labels, raw.target[idx[split]])
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    assert images[:, :2].max() == 0 and images[:, :, -2:].max() == 0  # border kept
  assert not set(idx["train"]) & set(idx["test"])
  np.testing.assert_array_equal(np.sort(np.concatenate([idx["train"], idx["test"]])),
                                np.arange(1797))
  np.testing.assert_array_equal(np.bincount(digits.load_digits("test")[1]), [30] * 10)
  # The 32x32 image, area-downsampled back to the 8x8 grid, matches the source.
  small = digits.load_digits("all", size=40)[0][..., 0].astype(float)
  pooled = small[:, 4:36, 4:36].reshape(-1, 8, 4, 8, 4).mean((2, 4))
  corr = np.corrcoef(pooled.ravel(), raw.images.ravel())[0, 1]
  assert corr > 0.95, corr
  # Deterministic: recomputed from scratch, the same pixels and split.
  before = digits.load_digits("train")[0].copy()
  for fn in (digits.split_indices, digits._gray_digits, digits._rgb_digits):  # pylint: disable=protected-access
    fn.cache_clear()
  np.testing.assert_array_equal(digits.load_digits("train")[0], before)
  with pytest.raises(ValueError, match="'train', 'test', 'all'"):
    digits.load_digits("val")


def test_bounce_matches_step_simulation():
  for start, velocity, limit in [((0, 5), (3, -2), 16), ((16, 7), (1, 3), 16), ((2, 0), (-3, 1), 4)]:
    pos, vel, want = np.array(start), np.array(velocity), []
    for _ in range(20):
      want.append(pos.copy())
      pos = pos + vel
      for a in range(2):
        if pos[a] < 0:
          pos[a], vel[a] = -pos[a], -vel[a]
        elif pos[a] > limit:
          pos[a], vel[a] = 2 * limit - pos[a], -vel[a]
    np.testing.assert_array_equal(
        digits.bounce(np.array(start), np.array(velocity), 20, limit), want)


def test_moving_digits():
  clips, labels = digits.load_moving_digits("test", num_frames=6, size=32, digit_size=16)
  assert clips.shape == (300, 6, 32, 32, 3) and clips.dtype == np.uint8
  np.testing.assert_array_equal(labels, digits.load_digits("test")[1])
  still = digits.load_digits("test", size=16)[0][..., 0].astype(np.int64)
  gray = clips[..., 0].astype(np.int64)
  # The whole digit stays on the canvas: every frame holds all of its ink.
  np.testing.assert_array_equal(gray.sum((2, 3)), np.repeat(still.sum((1, 2))[:, None], 6, 1))
  assert (np.abs(np.diff(gray, axis=1)).sum((2, 3)) > 0).all()  # it moves each frame
  # Frame 0 is the digit pasted somewhere: find it by matching the ink sum.
  i = 7
  ys, xs = np.nonzero(gray[i, 0])
  box = gray[i, 0, ys.min():ys.min() + 16, xs.min():xs.min() + 16]
  d_ys, d_xs = np.nonzero(still[i])
  np.testing.assert_array_equal(box[:16 - d_ys.min(), :16 - d_xs.min()],
                                still[i, d_ys.min():, d_xs.min():])
  digits._moving_digits.cache_clear()  # pylint: disable=protected-access
  again, _ = digits.load_moving_digits("test", num_frames=6)
  np.testing.assert_array_equal(again, clips)
  with pytest.raises(ValueError, match="digit_size"):
    digits.load_moving_digits("test", size=16, digit_size=16)


# ---------------------------------------------------------------- pipeline


def _keys(batch):
  return [im.tobytes() for im in batch["image"]]


def _train_cfg(cifar10_dir, **kw):
  return _cfg(name="cifar10", data_dir=str(cifar10_dir[0]), **kw)


def test_train_epoch_covers_each_example_once(cifar10_dir):
  cfg = _train_cfg(cifar10_dir)
  all_keys = sorted(_keys({"image": _read_all(sources.make_source(cfg, "train"))[0]}))
  orders = {}
  for seed in (0, 1):
    it = pipeline.make_train_iterator(cfg, 8, seed, process_index=0,
                                      process_count=1, num_epochs=1)
    batches = list(it)
    assert len(batches) == 5
    for b in batches:
      assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.uint8
      assert b["label"].shape == (8,) and b["label"].dtype == np.int32
    orders[seed] = sum((_keys(b) for b in batches), [])
    assert sorted(orders[seed]) == all_keys
  assert orders[0] != orders[1] and orders[0] != all_keys
  # Endless stream: the second epoch covers everything again, reshuffled.
  it = pipeline.make_train_iterator(cfg, 8, 0, process_index=0, process_count=1)
  stream = sum((_keys(next(it)) for _ in range(10)), [])
  assert stream[:40] == orders[0]
  assert sorted(stream[40:]) == all_keys and stream[40:] != stream[:40]


def test_train_process_shards_are_disjoint(cifar10_dir):
  cfg = _train_cfg(cifar10_dir)
  shards = []
  for p in range(2):
    it = pipeline.make_train_iterator(cfg, 8, 3, process_index=p,
                                      process_count=2, num_epochs=1)
    batches = list(it)
    assert len(batches) == 5 and all(b["image"].shape[0] == 4 for b in batches)
    shards.append(set(sum((_keys(b) for b in batches), [])))
  assert len(shards[0]) == len(shards[1]) == 20 and not shards[0] & shards[1]
  with pytest.raises(ValueError, match="multiple of the process count"):
    pipeline.make_train_iterator(cfg, 7, 0, process_index=0, process_count=2)


def test_train_state_resumes_exactly(cifar10_dir):
  cfg = _train_cfg(cifar10_dir)
  it = pipeline.make_train_iterator(cfg, 8, 5, process_index=0, process_count=1)
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(4)]  # crosses the epoch boundary (5 batches)
  fresh = pipeline.make_train_iterator(cfg, 8, 5, process_index=0, process_count=1)
  fresh.set_state(state)
  for w in want:
    got = next(fresh)
    np.testing.assert_array_equal(got["image"], w["image"])
    np.testing.assert_array_equal(got["label"], w["label"])
  assert isinstance(state, bytes)


def test_worker_processes_keep_the_order_and_resume_exactly(cifar10_dir):
  cfg = _train_cfg(cifar10_dir)
  threads = pipeline.make_train_iterator(cfg, 8, 5, process_index=0, process_count=1)
  cfg.worker_count = 2
  workers = pipeline.make_train_iterator(cfg, 8, 5, process_index=0, process_count=1)
  try:
    for _ in range(7):   # over an epoch boundary (5 batches)
      a, b = next(threads), next(workers)
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["label"], b["label"])
    state = workers.get_state()
    want = [next(threads) for _ in range(3)]
  finally:
    workers.close()
  resumed = pipeline.make_train_iterator(cfg, 8, 5, process_index=0, process_count=1)
  try:
    resumed.set_state(state)
    for w in want:
      np.testing.assert_array_equal(next(resumed)["image"], w["image"])
  finally:
    resumed.close()
    threads.close()


def test_video_batches_from_moving_digits():
  cfg = _cfg(name="moving_digits", train_split="test", num_frames=4, image_size=24,
             digit_size=12)
  it = pipeline.make_train_iterator(cfg, 6, 0, process_index=0, process_count=1)
  batch = next(it)
  assert batch["image"].shape == (6, 4, 24, 24, 3) and batch["image"].dtype == np.uint8
  assert it.num_classes == 10 and it.element_shape == (4, 24, 24, 3)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_sees_each_example_once(cifar10_dir, process_count):
  cfg = _train_cfg(cifar10_dir)
  want_images, want_labels = _read_all(sources.make_source(cfg, "test"))  # 12
  images, labels, lengths = [], [], set()
  for p in range(process_count):
    data = pipeline.make_eval_iterator(cfg, "test", 10, process_index=p,
                                       process_count=process_count)
    batches = list(data)
    lengths.add(len(batches))
    assert len(batches) == len(data)
    for b in batches:
      assert b["mask"].dtype == np.bool_ and b["image"].shape == (10 // process_count, 32, 32, 3)
      images.append(b["image"][b["mask"]])
      labels.append(b["label"][b["mask"]])
      assert not b["image"][~b["mask"]].any()
  assert len(lengths) == 1  # every process yields the same number of batches
  np.testing.assert_array_equal(np.concatenate(images), want_images)  # in order
  np.testing.assert_array_equal(np.concatenate(labels), want_labels)
  assert data.num_examples == 12
