"""Random-access data sources, selected by name from the `data` config.

Every source has `__len__`, `__getitem__(i) -> {'image': uint8 HWC (video
THWC), 'label': int32, ...}` (some add int32 keys: moving_digits 'digit' and
'direction', ucf101/hmdb51 'video'), `num_classes`, `element_shape` and a `__repr__`
that does not depend on paths or memory addresses: grain checks it when an
iterator state is restored, so a run can resume from a moved copy of the data.
Nothing is downloaded; missing or malformed data raises an error naming the
path and how to prepare it.

Config keys read by `make_source(cfg, split)` (others are ignored):
  name          one of SOURCES.
  data_dir      cifar10/cifar100/image_folder/ucf101/hmdb51: required (ucf101,
                hmdb51: the frame folder); tfds: optional.
  image_size    digits/moving_digits (default 32), image_folder/ucf101/hmdb51
                (required), tfds (optional: resize + center crop when the
                stored size differs).
  resize_size   image_folder/tfds/ucf101/hmdb51: shorter side before the crop
                (default image_size).
  label_key     cifar100: 'fine_labels' (default) or 'coarse_labels';
                tfds: feature name of the label (default 'label');
                moving_digits: 'digit' (default) or 'direction' (digits.DIRECTIONS).
  image_key     tfds: feature name of the image (default 'image').
  tfds_name     tfds: dataset name, optionally 'name:version' or 'name/config'.
  num_classes   tfds: used only when the label is not a ClassLabel feature.
  class_list    image_folder: optional file of class folder names (ImageNet-100).
  num_frames    moving_digits (default 8); ucf101/hmdb51: frames per clip (required).
  digit_size    moving_digits (default 16).
  frame_stride, split_number, splits_dir, clips_per_video, clip_seed, val_fraction
                ucf101/hmdb51 (defaults 1, 1, 'splits' next to data_dir, 1, 0, 0):
                see video_frames.py, which also defines their split names
                ('train', 'val', 'test', 'train:dense', 'test:random').
"""
from collections.abc import Callable
import os
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from nda_jax.data import cifar
from nda_jax.data import crops
from nda_jax.data import digits
from nda_jax.data import image_folder
from nda_jax.data import video_frames

Example = dict[str, Any]


class ArraySource:
  """In-memory uint8 images [N, ...] with int32 labels [N]."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int,
               desc: str, extra: dict[str, np.ndarray] | None = None):
    """`extra`: further int32 [N] per-example values, added to each example."""
    extra = extra or {}
    lengths = {"label": len(labels), **{k: len(v) for k, v in extra.items()}}
    if images.dtype != np.uint8 or set(lengths.values()) != {len(images)}:
      raise ValueError(f"{desc}: need uint8 images and one label per image, got "
                       f"{images.dtype} {images.shape} and lengths {lengths}.")
    self._images = images
    self._labels = labels.astype(np.int32, copy=False)
    self._extra = {k: v.astype(np.int32, copy=False) for k, v in extra.items()}
    self.num_classes = num_classes
    self.element_shape = images.shape[1:]
    self._desc = desc

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> Example:
    return {"image": self._images[index], "label": self._labels[index],
            **{k: v[index] for k, v in self._extra.items()}}

  def __repr__(self) -> str:
    return f"ArraySource({self._desc}, n={len(self)})"


class ImageFolderSource:
  """Decodes `root/<split>/<class>/*` images on access (see image_folder.py)."""

  def __init__(self, root: str, split: str, image_size: int,
               resize_size: int | None = None, class_list: str | None = None):
    self._paths, self._labels, classes = image_folder.list_images(
        root, split, class_list)
    self.num_classes = len(classes)
    self.element_shape = (image_size, image_size, 3)
    self._size = (image_size, resize_size)
    self._desc = (f"split={split}, image_size={image_size}, "
                  f"resize_size={resize_size}, classes={self.num_classes}")

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> Example:
    return {"image": image_folder.decode(self._paths[index], *self._size),
            "label": self._labels[index]}

  def views(self, index: int, spec: crops.ViewSpec, rng: np.random.Generator) -> Example:
    """Example `index` as `spec.num` random crops of the original image (crops.py)."""
    return {"image": crops.decode_views(self._paths[index], spec, rng),
            "label": self._labels[index]}

  def canvas(self, index: int, spec: crops.ViewSpec, rng: np.random.Generator,
             out: np.ndarray) -> tuple[np.ndarray, np.int32]:
    """Example `index`'s photo written into the zero canvas `out` [C, C, 3]; its
    `spec.num` boxes in canvas pixels and its label (crops.py)."""
    return crops.decode_canvas(self._paths[index], spec, rng, out), self._labels[index]

  def __repr__(self) -> str:
    return f"ImageFolderSource({self._desc}, n={len(self)})"


def _tfds_howto(name: str, data_dir: str | None) -> str:
  return (f"Prepare it in array_record format (TFRecord cannot be read by index), "
          f"e.g. `tfds build {name} --file_format=array_record "
          f"--data_dir={data_dir or 'DIR'}` on a machine with TensorFlow and "
          f"network, then pass --config.data.data_dir=DIR.")


class TfdsSource:
  """A prepared tfds dataset read by index (array_record/parquet, no TensorFlow)."""

  def __init__(self, name: str, split: str, data_dir: str | None,
               image_key: str = "image", label_key: str = "label",
               image_size: int | None = None, resize_size: int | None = None,
               num_classes: int | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # 0.6 s
    base = name.split(":")[0].split("/")[0]
    if data_dir is not None and not os.path.isdir(os.path.join(data_dir, base)):
      raise FileNotFoundError(f"tfds dataset {name!r} not found: no folder "
                              f"{os.path.join(data_dir, base)!r}. "
                              + _tfds_howto(name, data_dir))
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir,
                                      download=False)
    except (AssertionError, NotImplementedError, FileNotFoundError,
            tfds.core.registered.DatasetNotFoundError) as e:
      raise FileNotFoundError(f"Cannot open tfds dataset {name!r} split {split!r} "
                              f"in {data_dir!r}: {e}\n" + _tfds_howto(name, data_dir)) from e
    features = self._source.dataset_info.features
    for key in (image_key, label_key):
      if key not in features:
        raise ValueError(f"tfds dataset {name!r} has no feature {key!r}; its "
                         f"features are {sorted(features.keys())}. Set "
                         "--config.data.image_key / label_key.")
    num_classes = getattr(features[label_key], "num_classes", None) or num_classes
    if not num_classes:
      raise ValueError(f"tfds feature {label_key!r} of {name!r} is not a "
                       "ClassLabel; set --config.data.num_classes.")
    self.num_classes = int(num_classes)
    self._keys = (image_key, label_key)
    self._size = (image_size, resize_size)
    stored = tuple(features[image_key].shape)
    self.element_shape = ((image_size, image_size, 3) if image_size
                          else stored)
    if any(d is None for d in self.element_shape):
      raise ValueError(f"tfds images of {name!r} have variable shape {stored}; "
                       "set --config.data.image_size.")
    self._desc = f"{name}, split={split}, image_size={image_size}"

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Example:
    example = self._source[index]
    image = np.asarray(example[self._keys[0]], np.uint8)
    if image.ndim == 2:
      image = image[..., None]
    image_size, resize_size = self._size
    if image_size and (image.shape != self.element_shape or resize_size):
      pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
      image = image_folder.center_crop_resize(pil, image_size, resize_size)
    return {"image": image, "label": np.int32(example[self._keys[1]])}

  def __repr__(self) -> str:
    return f"TfdsSource({self._desc}, n={len(self)})"


def _required(cfg: ml_collections.ConfigDict, key: str):
  value = cfg.get(key)
  if value is None:
    raise ValueError(f"data source {cfg.name!r} needs --config.data.{key}.")
  return value


def _digits(cfg, split):
  size = cfg.get("image_size", 32)
  images, labels = digits.load_digits(split, size)
  return ArraySource(images, labels, digits.NUM_CLASSES,
                     f"digits, split={split}, size={size}")


def _moving_digits(cfg, split):
  """Labelled by digit or by motion direction; both go along as 'digit' and 'direction'."""
  args = dict(num_frames=cfg.get("num_frames", 8), size=cfg.get("image_size", 32),
              digit_size=cfg.get("digit_size", 16))
  label_key = cfg.get("label_key") or "digit"
  num_classes = {"digit": digits.NUM_CLASSES, "direction": len(digits.DIRECTIONS)}
  if label_key not in num_classes:
    raise ValueError(f"moving_digits label_key must be one of {sorted(num_classes)}, "
                     f"got {label_key!r}.")
  clips, labels = digits.load_moving_digits(split, **args)
  extra = {"digit": labels}
  if args["num_frames"] > 1 or label_key == "direction":  # a single frame has no motion
    extra["direction"] = digits.load_moving_digit_directions(split, **args)
  desc = ", ".join(f"{k}={v}" for k, v in args.items())
  return ArraySource(clips, extra[label_key], num_classes[label_key],
                     f"moving_digits, split={split}, {desc}, label={label_key}", extra)


def _cifar(name):
  def factory(cfg, split):
    image_size = cfg.get("image_size")
    if image_size not in (None, 32):
      raise ValueError(f"{name} images are 32x32; got image_size={image_size}.")
    label_key = cfg.get("label_key") if name == "cifar100" else None
    images, labels, num_classes = cifar.load(
        name, _required(cfg, "data_dir"), split, label_key)
    return ArraySource(images, labels, num_classes,
                       f"{name}, split={split}, labels={label_key or 'labels'}")
  return factory


def _tfds(cfg, split):
  return TfdsSource(
      _required(cfg, "tfds_name"), split, cfg.get("data_dir"),
      image_key=cfg.get("image_key", "image"),
      label_key=cfg.get("label_key", "label"),
      image_size=cfg.get("image_size"), resize_size=cfg.get("resize_size"),
      num_classes=cfg.get("num_classes"))


def _image_folder(cfg, split):
  return ImageFolderSource(
      _required(cfg, "data_dir"), split, _required(cfg, "image_size"),
      resize_size=cfg.get("resize_size"), class_list=cfg.get("class_list"))


def _video_frames(name):
  def factory(cfg, split):
    return video_frames.VideoFramesSource(
        name, _required(cfg, "data_dir"), split,
        num_frames=_required(cfg, "num_frames"), image_size=_required(cfg, "image_size"),
        frame_stride=cfg.get("frame_stride", 1), split_number=cfg.get("split_number", 1),
        splits_dir=cfg.get("splits_dir"), resize_size=cfg.get("resize_size"),
        clips_per_video=cfg.get("clips_per_video", 1), clip_seed=cfg.get("clip_seed", 0),
        val_fraction=cfg.get("val_fraction", 0.0), frame_width=cfg.get("frame_width"))
  return factory


Source = ArraySource | ImageFolderSource | TfdsSource | video_frames.VideoFramesSource
SOURCES: dict[str, Callable[[ml_collections.ConfigDict, str], Source]] = {
    "digits": _digits,
    "moving_digits": _moving_digits,
    "cifar10": _cifar("cifar10"),
    "cifar100": _cifar("cifar100"),
    "tfds": _tfds,
    "image_folder": _image_folder,
    "ucf101": _video_frames("ucf101"),
    "hmdb51": _video_frames("hmdb51"),
}


def make_source(cfg: ml_collections.ConfigDict, split: str) -> Source:
  """The source named by `cfg.name`, for `split` (e.g. 'train', 'test', 'val')."""
  name = cfg.get("name")
  if name not in SOURCES:
    raise ValueError(f"Unknown data source {name!r}; choose one of {sorted(SOURCES)}.")
  return SOURCES[name](cfg, split)
