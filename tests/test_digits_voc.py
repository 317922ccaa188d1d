"""tools.digits_voc: the digits detection set's boxes hold exactly their digit's ink,
the VOC files read back (detection.voc) to the same boxes, and a seed fixes the bytes."""
import os

import numpy as np
import pytest
from PIL import Image

from nda_jax.detection import voc
from nda_jax.tools import digits_voc


def test_boxes_are_tight_disjoint_and_inside_the_canvas():
  for split in ("trainval", "test"):
    for c in digits_voc.make_split(split, 40, seed=3, size=48, max_digits=4):
      assert 1 <= len(c.boxes) <= 4 and set(c.labels) <= set(range(10))
      assert (c.boxes[:, :2] >= 1).all() and (c.boxes[:, 2:] <= 48).all()
      assert (c.boxes[:, :2] <= c.boxes[:, 2:]).all()
      covered = np.zeros(c.image.shape, int)
      for x0, y0, x1, y1 in c.boxes - np.array([1, 1, 0, 0]):   # 0-based, end-exclusive
        covered[y0:y1, x0:x1] += 1
        ink = c.image[y0:y1, x0:x1] > 0
        assert ink[0].any() and ink[-1].any() and ink[:, 0].any() and ink[:, -1].any()
      assert covered.max() == 1                        # no two boxes overlap
      assert (c.image[covered == 0] == 0).all()        # no ink outside the boxes


def test_written_tree_reads_back(tmp_path):
  out = tmp_path / "voc"
  digits_voc.write(str(out), seed=0, num_trainval=12, num_test=5)
  for split, count in (("trainval", 12), ("test", 5)):
    ids = (out / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
    assert ids == [f"{split}_{i:05d}" for i in range(count)]
    for image_id, c in zip(ids, digits_voc.make_split(split, count, seed=0)):
      ann = voc.read_annotation(str(out / "Annotations" / f"{image_id}.xml"))
      assert (ann.width, ann.height) == (64, 64)
      np.testing.assert_array_equal(ann.boxes, c.boxes)
      assert ann.names == tuple(digits_voc.CLASSES[k] for k in c.labels)
      assert not ann.difficult.any()
      image = np.asarray(Image.open(out / "JPEGImages" / f"{image_id}.jpg"))
      assert image.shape == (64, 64, 3)
      # JPEG at quality 95: measured <= 10 grey levels off over the 200 test canvases
      # of seed 0; bound 16.
      assert np.abs(image[..., 0].astype(int) - c.image).max() <= 16


def test_a_seed_fixes_every_byte_and_the_out_folder_must_be_new(tmp_path):
  def files(path):
    return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(path) for f in fs}
  for name, seed in (("a", 1), ("b", 1), ("c", 2)):
    digits_voc.write(str(tmp_path / name), seed=seed, num_trainval=6, num_test=3)
  assert files(tmp_path / "a") == files(tmp_path / "b")
  assert files(tmp_path / "a") != files(tmp_path / "c")
  with pytest.raises(ValueError, match="not empty"):
    digits_voc.write(str(tmp_path / "a"), seed=1, num_trainval=6, num_test=3)

