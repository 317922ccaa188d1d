r"""Sample sheets of a GAN checkpoint (PNG): fixed-latent grid, per-class sheets, interpolations.

  python -m nda_jax.tools.sample_sheets --workdir=runs/demo [--checkpoint=best] \
      [--out_dir=runs/demo/sheets] [--interp_mode=slerp|linear] [--noema]

Writes to out_dir:
  grid.png              the training sheets' fixed latents (one row per class),
                        so it continues the run's samples/step_*.png;
  class_<c>.png         conditional models: `per_class` samples of class c, the
                        same latents on every sheet (only the class changes);
  interpolations.png    `interp_rows` rows of `interp_steps` images between two
                        random latents, one random class per row.
Samples come from G_ema unless --noema. With config.model.sample_bn='batch'
(the official protocol) G normalises with each call's batch statistics.
"""
import math

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

from nda_jax import cli
from nda_jax import trainers
from nda_jax import visualize
from nda_jax import workdir as workdir_lib
from nda_jax.trainers import gan

INTERPOLATIONS = ("linear", "slerp")
_PROG = "nda_jax.tools.sample_sheets"


# ------------------------------------------------------------------ latents (pure)
def interpolation_latents(z0: np.ndarray, z1: np.ndarray, steps: int,
                          mode: str = "slerp") -> np.ndarray:
  """`steps` latents from z0 to z1 (both included), [steps, dim_z] float32.

  'linear': (1 - t) z0 + t z1. 'slerp': the direction moves along the great
  circle at constant angular speed while the norm moves linearly from |z0| to
  |z1|, so no point falls into the low-norm interior that a Gaussian prior
  almost never samples (for equal norms this is Shoemake's slerp). Parallel,
  antiparallel or zero latents have no unique great circle: linear there.
  """
  if mode not in INTERPOLATIONS:
    raise ValueError(f"interpolation mode {mode!r}; valid choices: {INTERPOLATIONS}")
  z0, z1 = np.asarray(z0, np.float64), np.asarray(z1, np.float64)
  if z0.ndim != 1 or z0.shape != z1.shape:
    raise ValueError(f"z0 and z1 must be vectors of one shape, got {z0.shape} and {z1.shape}")
  if steps < 2:
    raise ValueError(f"steps={steps}: an interpolation needs at least its two endpoints")
  t = np.linspace(0.0, 1.0, steps)[:, None]
  linear = (1.0 - t) * z0 + t * z1
  n0, n1 = np.linalg.norm(z0), np.linalg.norm(z1)
  if mode == "linear" or min(n0, n1) == 0.0:
    return linear.astype(np.float32)
  u0, u1 = z0 / n0, z1 / n1
  omega = np.arccos(np.clip(u0 @ u1, -1.0, 1.0))
  if np.sin(omega) < 1e-6:
    return linear.astype(np.float32)
  direction = (np.sin((1.0 - t) * omega) * u0 + np.sin(t * omega) * u1) / np.sin(omega)
  return (((1.0 - t) * n0 + t * n1) * direction).astype(np.float32)


def interpolation_rows(rows: int, steps: int, dim_z: int, n_classes: int, mode: str,
                       seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(z [rows*steps, dim_z], y [rows*steps]): each row one interpolation, one class."""
  rng = np.random.RandomState(seed)
  ends = rng.standard_normal((rows, 2, dim_z))
  classes = rng.randint(0, n_classes, rows)
  z = np.concatenate([interpolation_latents(a, b, steps, mode) for a, b in ends])
  return z, np.repeat(classes, steps).astype(np.int32)


def class_latents(num: int, dim_z: int, seed: int) -> np.ndarray:
  """The latents of every class sheet (shared, so sheets differ only by the class)."""
  return np.random.RandomState(seed).standard_normal((num, dim_z)).astype(np.float32)


# ------------------------------------------------------------------ sheets
def write_sheets(config: ml_collections.ConfigDict, state: gan.GANState, out_dir: str, *,
                 ema: bool = True, per_class: int = 64, interp_rows: int = 8,
                 interp_steps: int = 10, interp_mode: str = "slerp", seed: int = 0,
                 batch_size: int | None = None, scale: int | None = None) -> dict[str, list[str]]:
  """Samples and writes every sheet; returns {'grid'|'classes'|'interpolations': [paths]}."""
  sample = gan.make_sampler(config, ema=ema)
  batch_size = batch_size or config.train.batch_size
  scale = scale or config.sample.scale
  n_classes, dim_z = gan.num_classes(config), config.model.dim_z
  written: dict[str, list[str]] = {"grid": [], "classes": [], "interpolations": []}

  def save(kind, name, z, y, ncol, batch):
    images = gan.sample_in_batches(sample, state, np.asarray(z), np.asarray(y, np.int32), batch)
    path = str(workdir_lib.path(out_dir) / name)
    visualize.save_grid(path, images, ncol=ncol, scale=scale)
    written[kind].append(path)

  # As the training sheets: all latents in one G call.
  z, y = gan.fixed_latents(config, config.sample.per_row, seed=config.sample.seed)
  save("grid", "grid.png", z, y, config.sample.per_row, len(z))
  if n_classes > 1:
    z = class_latents(per_class, dim_z, seed)
    ncol = math.ceil(math.sqrt(per_class))
    for c in range(n_classes):
      save("classes", f"class_{c:03d}.png", z, np.full(per_class, c), ncol, batch_size)
  z, y = interpolation_rows(interp_rows, interp_steps, dim_z, n_classes, interp_mode, seed)
  save("interpolations", "interpolations.png", z, y, interp_steps, batch_size)
  return written


def define_flags() -> None:
  """The CLI's flags, defined only when run as a script (see nda_jax.eval.define_flags)."""
  flags.DEFINE_string("workdir", None, "Workdir of a run (holds config.json).", required=True)
  flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' or a step number.")
  flags.DEFINE_string("out_dir", None, "Output folder (default WORKDIR/sheets).")
  flags.DEFINE_boolean("ema", True, "Sample from the EMA generator.")
  flags.DEFINE_integer("per_class", 64, "Samples on each class sheet.")
  flags.DEFINE_integer("interp_rows", 8, "Interpolation rows.")
  flags.DEFINE_integer("interp_steps", 10, "Images per interpolation row (endpoints included).")
  flags.DEFINE_enum("interp_mode", "slerp", INTERPOLATIONS, "Latent interpolation.")
  flags.DEFINE_integer("seed", 0, "Seed of the class-sheet and interpolation latents.")
  flags.DEFINE_integer("batch_size", None, "Samples per G call (default "
                       "config.train.batch_size, the official protocol).")
  flags.DEFINE_integer("scale", None, "PNG upscaling (default config.sample.scale).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    for name, low in (("per_class", 1), ("interp_rows", 1), ("interp_steps", 2),
                      ("batch_size", 1), ("scale", 1)):
      if f[name].value is not None and f[name].value < low:
        raise ValueError(f"--{name}={f[name].value}: must be >= {low}")
    config, _, state = trainers.load_run(f.workdir, f.checkpoint)
  except (FileNotFoundError, ValueError) as e:
    cli.fail(_PROG, str(e))
  out_dir = f.out_dir or str(workdir_lib.path(f.workdir) / "sheets")
  written = write_sheets(config, state, out_dir, ema=f.ema, per_class=f.per_class,
                         interp_rows=f.interp_rows, interp_steps=f.interp_steps,
                         interp_mode=f.interp_mode, seed=f.seed, batch_size=f.batch_size,
                         scale=f.scale)
  for kind, paths in written.items():
    if paths:
      print(f"{kind}: {len(paths)} PNG(s) in {out_dir}")
  print(f"checkpoint {f.checkpoint} (step {int(jax.device_get(state.step))}), "
        f"{'G_ema' if f.ema else 'G'}")


if __name__ == "__main__":
  define_flags()
  cli.run(main, _PROG)
