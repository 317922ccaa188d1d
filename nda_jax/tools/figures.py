"""Writing matplotlib figures where a tool is told to: any format matplotlib knows, local or gs://."""
import io

from etils import epath
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position


def check_image_path(out: str | epath.Path) -> epath.Path:
  """`out` as a path, if matplotlib can write its extension (else a ValueError naming them)."""
  out = epath.Path(out)
  formats = plt.figure().canvas.get_supported_filetypes()
  plt.close("all")
  if out.suffix.lstrip(".").lower() not in formats:
    raise ValueError(f"--out={out}: unknown image extension {out.suffix!r}; use one of "
                     f"{', '.join('.' + f for f in sorted(formats))}")
  return out


def save_figure(fig: plt.Figure, out: str | epath.Path) -> None:
  """Writes and closes `fig` in the format of `out`'s extension, through epath (the
  workdir may be a bucket)."""
  out = check_image_path(out)
  buffer = io.BytesIO()
  fig.savefig(buffer, dpi=100, format=out.suffix.lstrip(".").lower())
  plt.close(fig)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_bytes(buffer.getvalue())
