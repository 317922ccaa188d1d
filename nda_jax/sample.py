r"""Generate images from any GAN checkpoint.

  python -m nda_jax.sample --workdir=DIR --num=64 --out=samples.png
  python -m nda_jax.sample --workdir=DIR --latents=z.npy --labels=y.npy --out=samples.npz
  python -m nda_jax.sample --workdir=DIR --num=64 --truncation=0.5 --out=samples.png

Uses the run's resolved config (DIR/config.json); G_ema by default (--noema for G).
.npz output holds `images` (uint8, NHWC, truncated as the official np.uint8(255*(x+1)/2)),
`latents` and `labels`; .png output is a grid.
"""
import io

from absl import flags
from etils import epath
import jax
import numpy as np

from nda_jax import cli
from nda_jax import trainers
from nda_jax import visualize
from nda_jax.trainers import gan

_PROG = "nda_jax.sample"


def _load_npy(path: str, what: str) -> np.ndarray:
  """A .npy file (local or gs://) as an array; ValueError naming the file if unreadable."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{what} file {path} does not exist")
  try:
    return np.load(io.BytesIO(path.read_bytes()))
  except (OSError, ValueError, EOFError) as e:
    raise ValueError(f"{what} file {path} is not a readable .npy array "
                     f"({type(e).__name__}); save it with numpy.save") from None


def latents_and_labels(config, num: int, seed: int, latents_path=None, labels_path=None,
                       truncation: float = 0.0):
  n_classes = gan.num_classes(config)
  if latents_path:
    z = _load_npy(latents_path, "--latents").astype(np.float32)
    if z.ndim != 2 or z.shape[1] != config.model.dim_z:
      raise ValueError(f"{latents_path}: latents of shape {z.shape}; expected [N, "
                       f"{config.model.dim_z}]")
  else:
    z = np.asarray(gan.latents(jax.random.PRNGKey(seed), num, config.model.dim_z, truncation))
  if labels_path:
    y = _load_npy(labels_path, "--labels")
    if y.shape != (len(z),) or not np.issubdtype(y.dtype, np.integer) or (
        len(y) and (y.min() < 0 or y.max() >= n_classes)):
      raise ValueError(f"{labels_path}: labels must be [N={len(z)}] ints in [0, {n_classes})")
  else:
    y = np.asarray(jax.random.randint(jax.random.PRNGKey(seed + 1), (len(z),), 0, n_classes))
  return z, y.astype(np.int32)


def define_flags() -> None:
  """The CLI's flags, defined only when run as a script (see nda_jax.eval.define_flags)."""
  flags.DEFINE_string("workdir", None, "Workdir of a run (holds config.json).")
  flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' or a step number.")
  flags.DEFINE_integer("num", 64, "Number of samples (ignored with --latents).")
  flags.DEFINE_string("latents", None, ".npy of latents [N, dim_z].")
  flags.DEFINE_string("labels", None, ".npy of int labels [N] (conditional models).")
  flags.DEFINE_float(
      "truncation", 0.0, "BigGAN truncation threshold t: latents from N(0, 1) truncated to "
      "[-t, t] (redrawn beyond, not clipped); 0: none. Ignored with --latents.")
  flags.DEFINE_integer("seed", 0, "Seed of latents and labels when not given.")
  flags.DEFINE_integer("batch_size", 64, "Samples per G call (BN batch statistics).")
  flags.DEFINE_boolean("ema", True, "Sample from the EMA generator.")
  flags.DEFINE_string("out", None, "Output .npz or .png.")


def main(argv):
  del argv   # cli.run rejects stray arguments.
  f = flags.FLAGS
  out = epath.Path(f.out)
  try:
    if out.suffix not in (".npz", ".png"):
      raise ValueError(f"--out={f.out}: use a .npz or .png file name")
    for name in ("num", "batch_size"):
      if f[name].value <= 0:
        raise ValueError(f"--{name}={f[name].value}: must be a positive number")
    config, method, state = trainers.load_run(f.workdir, f.checkpoint)
    if not isinstance(method, gan.GAN):
      raise ValueError(f"{f.workdir} is a {config.trainer!r} run; sampling needs a GAN")
    z, y = latents_and_labels(config, f.num, f.seed, f.latents, f.labels, f.truncation)
  except (FileNotFoundError, ValueError) as e:
    cli.fail(_PROG, str(e))
  images = gan.sample_in_batches(gan.make_sampler(config, ema=f.ema), state, z, y,
                                 f.batch_size)
  if out.suffix == ".npz":
    buffer = io.BytesIO()
    np.savez(buffer, images=visualize.to_uint8(images), latents=z, labels=y)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buffer.getvalue())
  else:
    visualize.save_grid(out, images, ncol=int(np.ceil(np.sqrt(len(images)))), scale=2)
  print(f"wrote {len(images)} samples to {out}")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir", "out"])
  cli.run(main, _PROG)
