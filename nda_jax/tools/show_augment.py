"""Renders image NDAs on the embedded digits as a labelled PNG grid.

  python -m nda_jax.tools.show_augment --nda=jigsaw --out=nda.png
  python -m nda_jax.tools.show_augment --all --out=docs/nda_grid.png

Row 0 holds the originals, every further row one NDA (default parameters,
same key) applied to that batch: a quick visual check that each NDA does
what its docstring says.
"""
from collections.abc import Sequence

from absl import app
from absl import flags
import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from nda_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from nda_jax.augment import negative  # pylint: disable=g-import-not-at-top,wrong-import-position
from nda_jax.data import digits  # pylint: disable=g-import-not-at-top,wrong-import-position
from nda_jax.tools import figures  # pylint: disable=g-import-not-at-top,wrong-import-position

_PROG = "nda_jax.tools.show_augment"

_NDA = flags.DEFINE_string("nda", "jigsaw", f"One of {sorted(negative.NDAS)}.")
_ALL = flags.DEFINE_bool("all", False, "Show every NDA (overrides --nda).")
_OUT = flags.DEFINE_string("out", "docs/nda_grid.png", "Output PNG path.")
_NUM = flags.DEFINE_integer("num", 8, "Number of digits per row.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for the digits shown and the NDA key.")


def render(names: Sequence[str], num: int, seed: int) -> plt.Figure:
  """Figure with the originals and one row per NDA in `names`."""
  unknown = [n for n in names if n not in negative.NDAS]
  if unknown:
    raise ValueError(f"Unknown NDA(s) {unknown}; choose from {sorted(negative.NDAS)}.")
  images, labels = digits.load_digits("test")
  if not 1 <= num <= len(images):
    raise ValueError(f"--num must be in [1, {len(images)}], got {num}.")
  pick = np.random.RandomState(seed).choice(len(images), num, replace=False)
  x = images[pick].astype(np.float32) / 127.5 - 1.0
  key = jax.random.key(seed)
  rows = [("original", x)] + [(n, np.asarray(jax.jit(negative.NDAS[n])(key, x)))
                              for n in names]
  fig, axes = plt.subplots(len(rows), 1, figsize=(0.75 * num + 1.0, 0.85 * len(rows)),
                           squeeze=False)
  for ax, (name, batch) in zip(axes[:, 0], rows):
    pad = np.ones((batch.shape[1], 2, 3), np.float32)  # white gutter between digits
    strip = np.concatenate([np.concatenate([pad, img], axis=1) for img in batch], axis=1)[:, 2:]
    ax.imshow(np.clip((strip + 1.0) / 2.0, 0.0, 1.0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=10)
  axes[0, 0].set_title("labels: " + " ".join(str(l) for l in labels[pick]), fontsize=9)
  fig.tight_layout()
  return fig


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  names = list(negative.NDAS) if _ALL.value else [_NDA.value]
  try:
    out = figures.check_image_path(_OUT.value)
    fig = render(names, _NUM.value, _SEED.value)
  except ValueError as e:
    cli.fail(_PROG, str(e))
  figures.save_figure(fig, out)
  print(f"Wrote {out} ({', '.join(names)}).")


if __name__ == "__main__":
  cli.run(main, _PROG)
