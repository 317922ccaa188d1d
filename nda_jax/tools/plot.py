r"""PNG plots of a run's metrics: losses, D(real/fake/NDA), evaluation metrics.

  python -m nda_jax.tools.plot --workdir=runs/demo [--out=runs/demo/plots.png]
"""
from absl import flags
from etils import epath
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from nda_jax import cli
from nda_jax import logs
from nda_jax import workdir as workdir_lib
from nda_jax.tools import figures

_PROG = "nda_jax.tools.plot"

# Panels: title -> metric keys drawn in it (keys a run lacks are skipped).
PANELS = {
    "losses": ("d_loss", "g_loss", "d_loss_real", "d_loss_fake", "d_loss_nda"),
    "discriminator outputs": ("d_real", "d_fake", "d_nda"),
    "gradient norms": ("d_grad_norm", "g_grad_norm"),
    "sample quality": ("fid", "fd_digits", "kid", "inception_score"),
}


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  points = [(r["step"], r[key]) for r in records if key in r]
  if not points:
    return np.zeros(0), np.zeros(0)
  steps, values = zip(*points)
  return np.asarray(steps), np.asarray(values, np.float64)


def plot(records: list[dict], out: str | epath.Path) -> list[str]:
  """Draws the panels that have data; returns their titles."""
  out = figures.check_image_path(out)
  panels = {t: [k for k in keys if len(series(records, k)[0])] for t, keys in PANELS.items()}
  panels = {t: keys for t, keys in panels.items() if keys}
  if not panels:
    raise ValueError("no known metric in the run's metrics.jsonl")
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
  for ax, (title, keys) in zip(axes[0], panels.items()):
    for key in keys:
      ax.plot(*series(records, key), label=key, marker="." if title == "sample quality" else None)
    ax.set_title(title)
    ax.set_xlabel("iteration")
    ax.legend(fontsize=8)
  fig.tight_layout()
  figures.save_figure(fig, out)
  return list(panels)


def define_flags() -> None:
  """The CLI's flags, defined only when run as a script (see nda_jax.eval.define_flags)."""
  flags.DEFINE_string("workdir", None, "Workdir of a run.")
  flags.DEFINE_string("out", None, "Output PNG (default WORKDIR/plots.png).")


def main(argv):
  del argv   # cli.run rejects stray arguments.
  f = flags.FLAGS
  out = f.out or workdir_lib.path(f.workdir) / "plots.png"
  try:
    titles = plot(logs.read_metrics(f.workdir), out)
  except (FileNotFoundError, ValueError) as e:
    cli.fail(_PROG, str(e))
  print(f"wrote {out} ({', '.join(titles)})")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir"])
  cli.run(main, _PROG)
