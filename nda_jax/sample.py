r"""Generate images from any GAN checkpoint.

  python -m nda_jax.sample --workdir=DIR --num=64 --out=samples.png
  python -m nda_jax.sample --workdir=DIR --latents=z.npy --labels=y.npy --out=samples.npz

Uses the run's resolved config (DIR/config.json); G_ema by default (--noema for G).
.npz output holds `images` (uint8, NHWC, the official 255*(x+1)/2 conversion),
`latents` and `labels`; .png output is a grid.
"""
from absl import app
from absl import flags
import jax
import numpy as np

from nda_jax import trainers
from nda_jax import visualize
from nda_jax.trainers import gan

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a run (holds config.json).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' or a step number.")
_NUM = flags.DEFINE_integer("num", 64, "Number of samples (ignored with --latents).")
_LATENTS = flags.DEFINE_string("latents", None, ".npy of latents [N, dim_z].")
_LABELS = flags.DEFINE_string("labels", None, ".npy of int labels [N] (conditional models).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of latents and labels when not given.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Samples per G call (BN batch statistics).")
_EMA = flags.DEFINE_boolean("ema", True, "Sample from the EMA generator.")
_OUT = flags.DEFINE_string("out", None, "Output .npz or .png.")


def latents_and_labels(config, num: int, seed: int, latents_path=None, labels_path=None):
  n_classes = gan.num_classes(config)
  if latents_path:
    z = np.load(latents_path).astype(np.float32)
    if z.ndim != 2 or z.shape[1] != config.model.dim_z:
      raise ValueError(f"{latents_path}: latents of shape {z.shape}; expected [N, "
                       f"{config.model.dim_z}]")
  else:
    z = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (num, config.model.dim_z)))
  if labels_path:
    y = np.load(labels_path).astype(np.int32)
    if y.shape != (len(z),) or y.min() < 0 or y.max() >= n_classes:
      raise ValueError(f"{labels_path}: labels must be [N={len(z)}] ints in [0, {n_classes})")
  else:
    y = np.asarray(jax.random.randint(jax.random.PRNGKey(seed + 1), (len(z),), 0, n_classes))
  return z, y.astype(np.int32)


def main(argv):
  del argv
  out = _OUT.value
  try:
    if not out.endswith((".npz", ".png")):
      raise ValueError(f"--out={out}: use a .npz or .png file name")
    if _NUM.value <= 0 or _BATCH.value <= 0:
      raise ValueError(f"--num={_NUM.value} and --batch_size={_BATCH.value} must be positive")
    config, method, state = trainers.load_run(_WORKDIR.value, _CHECKPOINT.value)
    if not isinstance(method, gan.GAN):
      raise ValueError(f"{_WORKDIR.value} is a {config.trainer!r} run; sampling needs a GAN")
    z, y = latents_and_labels(config, _NUM.value, _SEED.value, _LATENTS.value, _LABELS.value)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"nda_jax.sample: error: {e}") from None
  images = gan.sample_in_batches(gan.make_sampler(config, ema=_EMA.value), state, z, y,
                                 _BATCH.value)
  if out.endswith(".npz"):
    np.savez(out, images=visualize.to_uint8(images), latents=z, labels=y)
  else:
    visualize.save_grid(out, images, ncol=int(np.ceil(np.sqrt(len(images)))), scale=2)
  print(f"wrote {len(images)} samples to {out}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)
