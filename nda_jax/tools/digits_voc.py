r"""A PASCAL-VOC-format detection set from the embedded digits, for the detection demo.

Each canvas (black, `size`x`size`, RGB) holds 1..`max_digits` sklearn digits,
each upsampled (PIL bilinear) to a random side in [`min_digit`, `max_digit`] and
pasted at a random position without overlapping the others; its box is the tight
box of its ink (VOC's 1-based inclusive pixel coordinates), its class the digit.
Canvases of 'trainval' use the digits of `data.digits`' train split, those of
'test' its 300 test digits, so no test digit is seen in training (nor by the
MoCo demo, which pretrains on the train split). Written as VOC's tree:

  OUT/Annotations/<id>.xml  OUT/JPEGImages/<id>.jpg  OUT/ImageSets/Main/{trainval,test}.txt

which torchvision's and Detectron2's VOC loaders and `detection.voc` read.
Deterministic given `--seed` (the same files byte for byte):

  python -m nda_jax.tools.digits_voc --out=runs/digits_voc [--seed=0]
"""
import dataclasses
import os
from xml.etree import ElementTree as ET

import numpy as np
from PIL import Image

from nda_jax.data import digits

CLASSES = tuple(str(d) for d in range(10))
SPLITS = {"trainval": "train", "test": "test"}   # VOC image set -> digits split
_JPEG_QUALITY = 95


@dataclasses.dataclass(frozen=True)
class Canvas:
  """One image: uint8 [size, size] gray, boxes [n, 4] VOC (1-based, inclusive), labels [n]."""
  image: np.ndarray
  boxes: np.ndarray
  labels: np.ndarray


def _overlaps(box, others) -> bool:
  return any(box[0] <= o[2] and o[0] <= box[2] and box[1] <= o[3] and o[1] <= box[3]
             for o in others)


def make_canvas(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, size: int,
                max_digits: int, min_digit: int, max_digit: int) -> Canvas:
  """Digits of `images` (uint8 [N, 8, 8]) pasted on one canvas; a digit that finds no
  free place in 50 tries is left out (at least one always fits an empty canvas)."""
  canvas = np.zeros((size, size), np.uint8)
  boxes, classes = [], []
  for _ in range(rng.integers(1, max_digits + 1)):
    i = rng.integers(len(images))
    side = int(rng.integers(min_digit, max_digit + 1))
    patch = np.asarray(Image.fromarray(images[i]).resize((side, side),
                                                         Image.Resampling.BILINEAR))
    rows, cols = np.flatnonzero(patch.any(1)), np.flatnonzero(patch.any(0))
    for _ in range(50):
      y, x = rng.integers(0, size - side + 1, size=2)
      box = (x + cols[0] + 1, y + rows[0] + 1, x + cols[-1] + 1, y + rows[-1] + 1)
      if not _overlaps(box, boxes):
        canvas[y:y + side, x:x + side] = np.maximum(canvas[y:y + side, x:x + side], patch)
        boxes.append(box), classes.append(int(labels[i]))
        break
  return Canvas(canvas, np.asarray(boxes, np.int64).reshape(-1, 4),
                np.asarray(classes, np.int64))


def make_split(split: str, count: int, seed: int, size: int = 64, max_digits: int = 4,
               min_digit: int = 12, max_digit: int = 24) -> list[Canvas]:
  """`count` canvases of VOC image set `split` ('trainval' | 'test')."""
  if not 8 <= min_digit <= max_digit <= size:
    raise ValueError(f"need 8 <= min_digit <= max_digit <= size, got {min_digit}, "
                     f"{max_digit}, {size}")
  raw, labels = digits._raw_digits()  # pylint: disable=protected-access
  idx = digits.split_indices(SPLITS[split])
  rng = np.random.default_rng([seed, list(SPLITS).index(split)])
  return [make_canvas(rng, raw[idx], labels[idx], size, max_digits, min_digit, max_digit)
          for _ in range(count)]


def annotation_xml(image_id: str, canvas: Canvas) -> bytes:
  """VOC's annotation of one canvas."""
  root = ET.Element("annotation")
  ET.SubElement(root, "folder").text = "digits_voc"
  ET.SubElement(root, "filename").text = f"{image_id}.jpg"
  size = ET.SubElement(root, "size")
  for tag, v in zip(("width", "height", "depth"), (*canvas.image.shape[::-1], 3)):
    ET.SubElement(size, tag).text = str(v)
  ET.SubElement(root, "segmented").text = "0"
  for box, label in zip(canvas.boxes, canvas.labels):
    obj = ET.SubElement(root, "object")
    ET.SubElement(obj, "name").text = CLASSES[label]
    ET.SubElement(obj, "pose").text = "Unspecified"
    ET.SubElement(obj, "truncated").text = "0"
    ET.SubElement(obj, "difficult").text = "0"
    bndbox = ET.SubElement(obj, "bndbox")
    for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), box):
      ET.SubElement(bndbox, tag).text = str(int(v))
  ET.indent(root)
  return ET.tostring(root, encoding="utf-8")


def write(out: str, seed: int, num_trainval: int, num_test: int, **canvas_kwargs) -> None:
  """The VOC tree under `out` (a new or empty folder)."""
  if os.path.isdir(out) and os.listdir(out):
    raise ValueError(f"--out={out} is not empty; pass a new folder (nothing is overwritten)")
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out={out} is a file; pass a new folder")
  splits = {"trainval": make_split("trainval", num_trainval, seed, **canvas_kwargs),
            "test": make_split("test", num_test, seed, **canvas_kwargs)}
  for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
    os.makedirs(os.path.join(out, sub), exist_ok=True)
  for split, canvases in splits.items():
    ids = [f"{split}_{i:05d}" for i in range(len(canvases))]
    for image_id, canvas in zip(ids, canvases):
      with open(os.path.join(out, "Annotations", f"{image_id}.xml"), "wb") as f:
        f.write(annotation_xml(image_id, canvas))
      Image.fromarray(np.repeat(canvas.image[..., None], 3, -1)).save(
          os.path.join(out, "JPEGImages", f"{image_id}.jpg"), quality=_JPEG_QUALITY)
    with open(os.path.join(out, "ImageSets", "Main", f"{split}.txt"), "w") as f:
      f.write("".join(f"{i}\n" for i in ids))


_PROG = "nda_jax.tools.digits_voc"


def main(argv):
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from nda_jax import cli  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    write(f.out, f.seed, f.num_trainval, f.num_test, size=f.size, max_digits=f.max_digits,
          min_digit=f.min_digit, max_digit=f.max_digit)
  except ValueError as e:
    cli.fail(_PROG, str(e))
  print(f"wrote {f.num_trainval} trainval + {f.num_test} test images to {f.out}")


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  from nda_jax import cli  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("out", None, "The VOC root to write (a new folder).", required=True)
  flags.DEFINE_integer("seed", 0, "Seed of the canvases.")
  flags.DEFINE_integer("num_trainval", 800, "Training canvases.")
  flags.DEFINE_integer("num_test", 200, "Test canvases.")
  flags.DEFINE_integer("size", 64, "Canvas side (pixels).")
  flags.DEFINE_integer("max_digits", 4, "Most digits on a canvas.")
  flags.DEFINE_integer("min_digit", 12, "Smallest digit side (pixels).")
  flags.DEFINE_integer("max_digit", 24, "Largest digit side (pixels).")
  cli.run(main, _PROG)
