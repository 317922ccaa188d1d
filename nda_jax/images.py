"""Image values on device: uint8 -> [-1, 1], the encoders' input normalisation, crops.

Every model sees float images in [-1, 1] (`to_float` of the uint8 host
batches); encoders trained or imported with torchvision's ImageNet statistics
see `normalize_input` of those (`model.input_norm`).

`resized_crops` is torchvision's `F.resized_crop` of a PIL image (crop, then
PIL's BILINEAR resize) on device, for photos shipped in a canvas with their
boxes (data/crops.py): a triangle filter whose support grows with the
downscaling factor (antialiasing), sampled at pixel centres and renormalised
over the pixels of the box only, as PIL does on the cropped image. Not
`jax.image.scale_and_translate`: it renormalises over the whole input, so
pixels just outside the box would reach the box's edge rows (PIL's
`resize(box=...)` does the same; torchvision crops first). The weights are
dense [size, C] matrices per axis, so a view costs 2 * 3 * size * C * (C +
size) FLOPs, ~0.5 GFLOP at C=500 and size 224, computed in float32
(precision HIGHEST: bfloat16 weights would be off by up to 0.5 of 255).
"""
import jax
import jax.numpy as jnp
import ml_collections

# torchvision's ImageNet normalisation, which MoCo's encoders (and imported weights) expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# MoCo's CIFAR-10 demo (colab/moco_cifar10_demo.ipynb) normalises with these.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
# CIFAR-100's per-channel mean/std, as CIFAR-100 training scripts commonly normalise.
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
# model.input_norm -> (mean, std) of [0, 1] images; 'none' keeps [-1, 1].
INPUT_NORMS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD),
               "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
               "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
               "none": None}


def to_float(images_u8: jax.Array) -> jax.Array:
  """uint8 host images -> float32 in [-1, 1], the range every model sees."""
  return images_u8.astype(jnp.float32) / 127.5 - 1.0


def normalize_input(config: ml_collections.ConfigDict, images: jax.Array) -> jax.Array:
  """[-1, 1] images -> what the encoder sees (torchvision's Normalize(mean, std) of [0, 1]
  images, INPUT_NORMS; 'none': unchanged)."""
  if config.model.input_norm not in INPUT_NORMS:
    raise ValueError(f"config.model.input_norm={config.model.input_norm!r}; "
                     f"valid choices: {tuple(INPUT_NORMS)}")
  stats = INPUT_NORMS[config.model.input_norm]
  if stats is None:
    return images
  mean = jnp.asarray(stats[0][:images.shape[-1]], jnp.float32)
  std = jnp.asarray(stats[1][:images.shape[-1]], jnp.float32)
  return ((images.astype(jnp.float32) + 1.0) / 2.0 - mean) / std


def center_crop(images: jax.Array, size: int) -> jax.Array:
  """The central size x size of larger host images (torchvision's Resize(256) + CenterCrop(224)
  when the host decodes at 256 and views are 224)."""
  h, w = images.shape[1:3]
  if h < size or w < size:
    raise ValueError(f"images of {h}x{w} are smaller than config.aug.crop_size={size}")
  top, left = (h - size) // 2, (w - size) // 2
  return images[:, top:top + size, left:left + size]


def box_weights(start: jax.Array, length: jax.Array, out_size: int, in_size: int) -> jax.Array:
  """float32 [out_size, in_size]: PIL's BILINEAR weights resizing pixels [start, start + length)
  of an axis of in_size pixels to out_size pixels (rows sum to 1)."""
  scale = length / out_size
  support = jnp.maximum(scale, 1.0)   # the triangle widens when shrinking
  centre = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
  pixel = jnp.arange(in_size, dtype=jnp.float32) + 0.5
  weights = jnp.maximum(0.0, 1.0 - jnp.abs(pixel[None] - centre[:, None]) / support)
  # Pixels overlapping the box (by more than float32's slack on a shrunk photo's boxes).
  inside = (pixel + 0.5 > start + 1e-3) & (pixel - 0.5 < start + length - 1e-3)
  weights = jnp.where(inside[None], weights, 0.0)
  return weights / weights.sum(axis=1, keepdims=True)


def resized_crops(canvas: jax.Array, boxes: jax.Array, size: int) -> jax.Array:
  """[B, H, W, C] images and float32 [B, N, 4] boxes (top, left, height, width) ->
  float32 [B, N, size, size, C]: each box cropped and resized as PIL's BILINEAR, in the
  images' units (uint8 values stay 0..255, not rounded)."""
  _, height, width, _ = canvas.shape
  hi = jax.lax.Precision.HIGHEST

  def one(image, box):
    top, left, h, w = box[0], box[1], box[2], box[3]
    rows = box_weights(top, h, size, height)
    cols = box_weights(left, w, size, width)
    x = jnp.einsum("xw,hwc->hxc", cols, image, precision=hi)   # horizontal pass first, as PIL
    return jnp.einsum("yh,hxc->yxc", rows, x, precision=hi)

  per_image = jax.vmap(one, in_axes=(None, 0))
  return jax.vmap(per_image)(canvas.astype(jnp.float32), boxes.astype(jnp.float32))
