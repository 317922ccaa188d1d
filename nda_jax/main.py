r"""Entry point: `python -m nda_jax.main --config=configs/<name>.py[:variant] --workdir=DIR`.

Deliberately tiny (as flax/examples): it parses, writes the resolved config and
hands over to the trainer named by `config.trainer`.
"""
import importlib
import logging as std_logging
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from nda_jax import config_lib
from nda_jax import parallel

# Trainers by name; each module has train_and_evaluate(config, workdir).
TRAINERS = {"gan": "nda_jax.trainers.gan"}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, samples).")


def get_trainer(name: str):
  if name not in TRAINERS:
    raise ValueError(f"config.trainer={name!r}; valid choices: {sorted(TRAINERS)}")
  return importlib.import_module(TRAINERS[name])


class _QuietLibraries(std_logging.Filter):
  """Keeps the progress log readable: Orbax logs every save at INFO."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  parallel.maybe_initialize_distributed()
  config = _CONFIG.value
  trainer = get_trainer(config.trainer)
  import jax
  if jax.process_index() == 0:
    config_lib.write_config(config, _WORKDIR.value)
  logging.info("config:\n%s", config)
  trainer.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
