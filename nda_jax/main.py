r"""Entry point: `python -m nda_jax.main --config=configs/<name>.py[:variant] --workdir=DIR`.

Deliberately tiny (as flax/examples): it parses, checks the config, writes it
to the workdir and hands over to the generic loop, which runs the method
named by `config.trainer`. A user error (bad config value, missing data)
ends in one paragraph, not a traceback, and leaves the workdir as it was.
"""
import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from nda_jax import checkpoint as ckpt_lib
from nda_jax import config_lib
from nda_jax import parallel

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, samples).")


class _QuietLibraries(std_logging.Filter):
  """Keeps the progress log readable: Orbax logs every save at INFO."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def fail(message: str, code: int = 1) -> None:
  """A user error: one paragraph on stderr, no traceback."""
  print(f"nda_jax: error: {message}", file=sys.stderr)
  sys.exit(code)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  parallel.maybe_initialize_distributed()
  from nda_jax.trainers import loop  # pylint: disable=g-import-not-at-top  (after distributed init)
  config = _CONFIG.value
  import jax  # pylint: disable=g-import-not-at-top
  try:
    loop.check_config(config)   # Before anything is written to the workdir.
    if jax.process_index() == 0:
      config_lib.write_config(config, _WORKDIR.value)
    logging.info("config:\n%s", config)
    loop.train_and_evaluate(config, _WORKDIR.value)
  except (ValueError, FileNotFoundError, ckpt_lib.DamagedCheckpointError,
          loop.NonFiniteError) as e:
    fail(str(e))
  except KeyboardInterrupt as e:
    print(f"nda_jax: {e}", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
