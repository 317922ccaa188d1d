r"""Converts pytorch-fid's FID Inception `.pth` to a NumPy `.npz` readable without torch.

  python -m nda_jax.importers.inception \
      --pth=pt_inception-2015-12-05-6726825d.pth --out=inception_fid.npz

The conversion itself (and the name mapping) is `nda_jax.models.inception_weights`;
evaluators read either file through it (`inception_weights: ...` of a
`sample_quality` evaluator).
"""
from absl import app
from absl import flags

from nda_jax import cli
from nda_jax.models import inception_weights

_PROG = "nda_jax.importers.inception"


def main(argv):
  del argv
  pth, out = flags.FLAGS.pth, flags.FLAGS.out
  if not pth or not out:
    raise app.UsageError("Both --pth and --out are required.")
  try:
    if not out.endswith(".npz"):
      raise ValueError(f"--out={out}: use a .npz file name")
    variables = inception_weights.load(pth)
  except (FileNotFoundError, ValueError) as e:
    cli.fail(_PROG, str(e))
  inception_weights.save_npz(variables, out)
  print(f"Wrote {len(inception_weights.flatten(variables))} arrays to {out}")


if __name__ == "__main__":
  # Flags are defined only when run as a command, so importing this module
  # next to other commands' modules cannot clash on flag names.
  flags.DEFINE_string("pth", None, f"pytorch-fid's {inception_weights.WEIGHTS_FILE}.")
  flags.DEFINE_string("out", None, "Output .npz path.")
  cli.run(main, _PROG)
