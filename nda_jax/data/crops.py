"""Host-side random crops of the original image (torchvision's RandomResizedCrop).

MoCo's aug+ and main_lincls draw RandomResizedCrop from the whole decoded
photo: a box of area in `scale` x the image's area and aspect ratio
log-uniform in `ratio` (10 tries, else the central box of clamped ratio),
resized to the view size with PIL's BILINEAR filter. Drawing it on device
from a fixed-size square would see only that square and measure area and
ratio against it, so image folders can make the views here instead
(`data.crops = 'host'`, pipeline.py): each example becomes `num` views
uint8 [num, size, size, 3], and the device does the rest of the
augmentation (flip, colour, blur).

Decoding: a JPEG is decoded at 1/2, 1/4 or 1/8 of its size (`Image.draft`,
libjpeg's DCT scaling, a box prefilter) when every box of the example is
still at least 2 x `size` on both sides at that scale, so BILINEAR's
antialiasing still shrinks by 2 or more after it (measured on scikit-learn's
sample photos: mean |difference| 0.8-1.6 of 255 from the full-scale view;
with a margin of 1 instead of 2: 1.5-4.6). At full scale a view is exactly
PIL's crop-then-resize, as torchvision's. For ImageNet photos and 224 views
the reduction needs boxes of 896 px and up, so most decode at full scale.

Canvas (`data.crops = 'canvas'`, `decode_canvas`): the host only decodes.
The smallest rectangle of the photo holding all the example's boxes goes at
the top-left of a zero uint8 [C, C, 3] canvas, beside the boxes, float32
[num, 4] (top, left, height, width in canvas pixels), and the train step
resizes each box on the device (images.resized_crops: PIL's BILINEAR
crop-then-resize, within PIL's uint8 rounding of 1/255). The host's BILINEAR
resizes cost more than the decode (README, "Measured"); this mode leaves them
to the accelerator. The boxes are `draw_boxes` on the original shape, with
the same seeds, so they are the host mode's boxes. A rectangle that fits is
copied exactly (never drafted). One larger than C on either side is shrunk
on the host to fit (aspect kept; a JPEG first through `Image.draft` by the
largest DCT reduction that keeps it at least that size, then PIL BILINEAR)
with its boxes scaled alike: its views are resized from fewer pixels
(measured on scikit-learn's 640x427 photos in a 400 canvas, rectangles shrunk
to 0.62-0.95: mean |difference| 0.9-2.5 of 255 from torchvision's view), and
the shrink costs the host more than the decode (1.4x for these photos). The default C=500 is
the longer side of most ImageNet photos (500x375, 500x333, 375x500: Flickr's
500-px size), so those always fit; only larger photos (not counted here:
surveys of the train set find them up to 2592x3888) can need a shrink, when
their boxes span more than 500 px (e.g. for 800x600 photos 93% of MoCo's box
pairs and 46% of the linear probe's single boxes, by draw_boxes). Bytes per
example to the device: C*C*3 + 16*num = 750,032 at C=500 with two views,
against 301,056 for two 224x224 host views (2.5x; 5x for the linear probe's
one view).

Randomness: the boxes of an example come from NumPy's Philox seeded with
(seed, epoch, record index) only, so a restored pipeline position yields the
same views, any worker count gives the same views, and a record's boxes
differ from epoch to epoch.
"""
from collections.abc import Sequence
import dataclasses
import math

import numpy as np
from PIL import Image

ATTEMPTS = 10            # torchvision RandomResizedCrop.get_params
DRAFT_SCALES = (8, 4, 2)  # what libjpeg's DCT scaling (Image.draft) offers
Box = tuple[int, int, int, int]  # top, left, height, width


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """`num` RandomResizedCrop(size, scale, ratio) views of each image."""
  num: int
  size: int
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)

  def __post_init__(self):
    if self.num < 1 or self.size < 1:
      raise ValueError(f"data.views needs num >= 1 and size >= 1, got num={self.num}, "
                       f"size={self.size}.")
    for name, (low, high) in (("scale", self.scale), ("ratio", self.ratio)):
      if not 0 < low <= high:
        raise ValueError(f"data.views.{name}={(low, high)} must satisfy 0 < low <= high.")

  @property
  def shape(self) -> tuple[int, int, int, int]:
    return (self.num, self.size, self.size, 3)


def random_box(rng: np.random.Generator, height: int, width: int,
               scale: Sequence[float], ratio: Sequence[float]) -> Box:
  """torchvision's RandomResizedCrop.get_params on a height x width image."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(ATTEMPTS):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def draw_boxes(rng: np.random.Generator, height: int, width: int,
               spec: ViewSpec) -> list[Box]:
  """The boxes of one example's views, in order."""
  return [random_box(rng, height, width, spec.scale, spec.ratio) for _ in range(spec.num)]


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The generator of one record's boxes in one epoch."""
  return np.random.Generator(np.random.Philox(np.random.SeedSequence(
      [int(seed) % 2**32, int(epoch), int(index)])))


def draft_scale(boxes: Sequence[Box], size: int) -> int:
  """The largest JPEG reduction that keeps every box at least 2 x `size` on both sides."""
  smallest = min(min(h, w) for _, _, h, w in boxes)
  return next((s for s in DRAFT_SCALES if smallest >= 2 * s * size), 1)


def resized_views(image: Image.Image, boxes: Sequence[Box], size: int,
                  original_size: tuple[int, int]) -> np.ndarray:
  """uint8 [len(boxes), size, size, 3]: each box of the original image, BILINEAR to size.

  `image` may be a drafted (reduced) decode of an `original_size` (w, h) image;
  boxes are in original pixels and are mapped to its grid.
  """
  if image.mode != "RGB":
    image = image.convert("RGB")
  sx, sy = original_size[0] / image.size[0], original_size[1] / image.size[1]
  views = np.empty((len(boxes), size, size, 3), np.uint8)
  for k, (top, left, h, w) in enumerate(boxes):
    if sx == sy == 1:  # torchvision's F.resized_crop on a PIL image
      view = image.crop((left, top, left + w, top + h)).resize((size, size),
                                                               Image.Resampling.BILINEAR)
    else:
      view = image.resize((size, size), Image.Resampling.BILINEAR,
                          box=(left / sx, top / sy, (left + w) / sx, (top + h) / sy))
    views[k] = np.asarray(view)
  return views


def decode_views(path: str, spec: ViewSpec, rng: np.random.Generator,
                 reduce: bool = True) -> np.ndarray:
  """Reads one image file -> uint8 [spec.num, size, size, 3] random views.

  `reduce=False` always decodes at full scale (exactly crop-then-resize).
  """
  try:
    with Image.open(path) as image:
      width, height = image.size
      boxes = draw_boxes(rng, height, width, spec)
      factor = draft_scale(boxes, spec.size) if reduce else 1
      if factor > 1:
        image.draft("RGB", (width // factor, height // factor))
      return resized_views(image, boxes, spec.size, (width, height))
  except (OSError, SyntaxError) as e:  # PIL's errors for corrupt/truncated files
    raise ValueError(f"Cannot decode image {path!r} ({e!r}); the file is "
                     "corrupt or not an image.") from e


def fitted_size(width: int, height: int, canvas: int) -> tuple[int, int]:
  """(w, h) of a width x height image shrunk, aspect kept, to fit a canvas x canvas square."""
  if max(width, height) <= canvas:
    return width, height
  scale = canvas / max(width, height)
  return (min(canvas, max(1, round(width * scale))),
          min(canvas, max(1, round(height * scale))))


def decode_canvas(path: str, spec: ViewSpec, rng: np.random.Generator,
                  out: np.ndarray) -> np.ndarray:
  """Reads one image file into the zero canvas `out` (uint8 [C, C, 3]) -> float32
  [spec.num, 4] boxes (top, left, height, width) in canvas pixels.

  The boxes are drawn on the original shape; the canvas holds the smallest
  rectangle of the photo that contains them all, at its top-left: exactly,
  or shrunk to fit when it is larger than C on either side.
  """
  try:
    with Image.open(path) as image:
      width, height = image.size
      boxes = np.asarray(draw_boxes(rng, height, width, spec), np.float64)
      top, left = boxes[:, 0].min(), boxes[:, 1].min()
      bottom, right = (boxes[:, 0] + boxes[:, 2]).max(), (boxes[:, 1] + boxes[:, 3]).max()
      region = (int(left), int(top), int(right), int(bottom))
      size = (region[2] - region[0], region[3] - region[1])
      fit = fitted_size(*size, out.shape[0])
      if fit == size:
        image = image if image.mode == "RGB" else image.convert("RGB")
        pixels = np.asarray(image)[region[1]:region[3], region[0]:region[2]]
      else:
        image.draft("RGB", (math.ceil(width * fit[0] / size[0]),
                            math.ceil(height * fit[1] / size[1])))
        image = image if image.mode == "RGB" else image.convert("RGB")
        sx, sy = image.width / width, image.height / height   # the drafted scale
        pixels = np.asarray(image.resize(fit, Image.Resampling.BILINEAR, box=(
            region[0] * sx, region[1] * sy, region[2] * sx, region[3] * sy)))
  except (OSError, SyntaxError) as e:  # PIL's errors for corrupt/truncated files
    raise ValueError(f"Cannot decode image {path!r} ({e!r}); the file is "
                     "corrupt or not an image.") from e
  out[:fit[1], :fit[0]] = pixels
  boxes -= [top, left, 0, 0]
  boxes *= [fit[1] / size[1], fit[0] / size[0]] * 2
  return boxes.astype(np.float32)
