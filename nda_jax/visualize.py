"""Image grids for sample sheets (PNG), shared by trainers and tools."""
from etils import epath
import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 as BigGAN-PyTorch's sample.py saves them: np.uint8(255 * (x + 1) / 2).

  The float32 product is truncated, not rounded, so saved samples hold the
  levels the official FID was computed on (the FID evaluator truncates alike);
  the clip only keeps values outside [-1, 1] from wrapping around.
  """
  images = np.asarray(images, np.float32)
  return np.clip(255 * (images + 1) / 2, 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, ncol: int, pad: int = 1) -> np.ndarray:
  """[N, H, W, C] uint8 -> one [rows*(H+pad)+pad, ncol*(W+pad)+pad, C] image."""
  n, h, w, c = images.shape
  nrow = -(-n // ncol)
  grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, col = divmod(i, ncol)
    top, left = pad + r * (h + pad), pad + col * (w + pad)
    grid[top:top + h, left:left + w] = images[i]
  return grid


def save_grid(path: str | epath.Path, images: np.ndarray, ncol: int, scale: int = 1) -> None:
  """Saves [-1, 1] float or uint8 images as one PNG grid (upscaled by `scale`)."""
  if images.dtype != np.uint8:
    images = to_uint8(images)
  grid = image_grid(images, ncol)
  if grid.shape[-1] == 1:
    grid = grid[..., 0]
  img = Image.fromarray(grid)
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  path = epath.Path(path)   # Local or a bucket (gs://): never os.path on a workdir.
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    img.save(f, format="PNG")
