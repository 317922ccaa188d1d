"""`python tests/toy_main.py --workdir=DIR [--config=tests/toy_method.py[:knn]] [--config.x=...]`:
nda_jax.main with the toy method.

The real entry point (flags, signals, exit codes) with `config.trainer='toy'`
registered, for tests that need a process to signal or to kill.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from nda_jax import main as nda_main
from nda_jax import trainers

trainers.REGISTRY["toy"] = "toy_method:Toy"

if __name__ == "__main__":
  given = [arg for arg in sys.argv if arg.startswith("--config=")]   # e.g. toy_method.py:knn
  for arg in given:
    sys.argv.remove(arg)
  sys.argv.insert(1, given[-1] if given else
                  f"--config={os.path.join(os.path.dirname(__file__), 'toy_method.py')}")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(nda_main.main)
