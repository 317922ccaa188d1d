"""ImageNet-style image folders: `root/<split>/<class>/<image>.{jpeg,jpg,png}`.

Images are decoded with PIL on access (inside grain, so workers parallelize
it), converted to RGB, resized so the shorter side is `resize_size` and
center-cropped to `image_size` (the usual ImageNet eval crop; on-device
augmentations do the random crops). An optional class list file (one class
folder name, e.g. a WordNet id, per line; '#' starts a comment) restricts the
data to a subset such as ImageNet-100. Labels index the sorted class names.
"""
import os

import numpy as np
from PIL import Image

EXTENSIONS = (".jpeg", ".jpg", ".png")
HOWTO = ("Expected layout ROOT/<split>/<class>/*.JPEG (e.g. ImageNet train/ and "
         "val/ with the validation images moved into one folder per wnid); pass "
         "--config.data.data_dir=ROOT.")


def center_crop_resize(image: Image.Image, image_size: int, resize_size: int | None = None,
                       width: int | None = None) -> np.ndarray:
  """PIL image -> uint8 [image_size, width (default image_size), 3].

  Shorter side resized to `resize_size` (default `image_size`) with PIL's
  antialiased bicubic filter (further if the output's width needs it), then
  the central crop.
  """
  resize_size = resize_size or image_size
  width = width or image_size
  if resize_size < image_size:
    raise ValueError(f"resize_size {resize_size} < image_size {image_size}.")
  image = image.convert("RGB")
  w, h = image.size
  scale = max(resize_size / min(w, h), width / w)
  new_w = max(resize_size, width, round(w * scale))
  new_h = max(resize_size, round(h * scale))
  if (new_w, new_h) != (w, h):
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
  left, top = (new_w - width) // 2, (new_h - image_size) // 2
  image = image.crop((left, top, left + width, top + image_size))
  return np.asarray(image, np.uint8)


def read_class_list(path: str) -> list[str]:
  """Class names from a subset file (one per line, '#' comments)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Class list file {path!r} does not exist; it "
                            "should hold one class folder name per line.")
  with open(path) as f:
    names = [line.split("#")[0].strip() for line in f]
  names = [n for n in names if n]
  if not names or len(set(names)) != len(names):
    raise ValueError(f"Class list file {path!r} is empty or repeats a class.")
  return names


def list_images(root: str, split: str,
                class_list: str | None = None) -> tuple[list[str], np.ndarray, list[str]]:
  """Returns (paths, int32 labels, class names) of one split, sorted."""
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    raise FileNotFoundError(f"Image folder {split_dir!r} does not exist. " + HOWTO)
  present = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
  if class_list:
    classes = sorted(read_class_list(class_list))
    missing = sorted(set(classes) - set(present))
    if missing:
      raise ValueError(f"{len(missing)} classes of {class_list!r} are not folders "
                       f"in {split_dir!r}, e.g. {missing[:5]}. " + HOWTO)
  else:
    classes = present
  if not classes:
    raise ValueError(f"No class folders in {split_dir!r}. " + HOWTO)
  paths, labels = [], []
  for label, name in enumerate(classes):
    class_dir = os.path.join(split_dir, name)
    files = sorted(e.name for e in os.scandir(class_dir)
                   if e.is_file() and e.name.lower().endswith(EXTENSIONS))
    if not files:
      raise ValueError(f"Class folder {class_dir!r} holds no {EXTENSIONS} image: remove it "
                       "(or add its images), so that labels and the number of classes are "
                       "those of the classes present. " + HOWTO)
    paths += [os.path.join(class_dir, f) for f in files]
    labels += [label] * len(files)
  return paths, np.asarray(labels, np.int32), classes


def decode(path: str, image_size: int, resize_size: int | None = None,
           width: int | None = None) -> np.ndarray:
  """Reads one image file -> uint8 [image_size, width (default image_size), 3]."""
  try:
    with Image.open(path) as image:
      image.draft("RGB", (max(resize_size or image_size, width or 0),) * 2)  # fast JPEG downscale
      return center_crop_resize(image, image_size, resize_size, width)
  except (OSError, SyntaxError) as e:  # PIL's errors for corrupt/truncated files
    raise ValueError(f"Cannot decode image {path!r} ({e!r}); the file is "
                     "corrupt or not an image.") from e
