"""Image values on device: uint8 -> [-1, 1], the encoders' input normalisation, centre crops.

Every model sees float images in [-1, 1] (`to_float` of the uint8 host
batches); encoders trained or imported with torchvision's ImageNet statistics
see `normalize_input` of those (`model.input_norm`).
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
