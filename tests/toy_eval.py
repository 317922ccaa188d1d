"""`python tests/toy_eval.py --workdir=DIR [--checkpoint=...]`: nda_jax.eval for a toy run.

The real entry point (flags, messages, exit codes) with `config.trainer='toy'`
registered, for tests that evaluate in a process of its own.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from nda_jax import eval as eval_lib  # pylint: disable=g-import-not-at-top
from nda_jax import trainers

trainers.REGISTRY["toy"] = "toy_method:Toy"

if __name__ == "__main__":
  eval_lib._cli()  # pylint: disable=protected-access
