r"""Entry point: `python -m nda_jax.main --config=configs/<name>.py[:variant] --workdir=DIR`.

Deliberately tiny (as flax/examples): it parses the flags and hands over to
the generic loop, which checks the config, writes it to the workdir and runs
the method named by `config.trainer`. A user error (unknown config key, bad
value, missing data, a workdir another run holds) ends in one paragraph, not a
traceback, and leaves the workdir as it was.
"""
import logging as std_logging
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

from nda_jax import checkpoint as ckpt_lib
from nda_jax import cli
from nda_jax import parallel
from nda_jax import workdir_lock

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py).",
                                          lock_config=True)
_PROG = "nda_jax"
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, samples).")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume a run with a config that trains differently (batch size, NDA, seed, ...); the "
    "old config is kept as config_history/step_<N>.json. Not saved in the config.")


class _QuietLibraries(std_logging.Filter):
  """Keeps the progress log readable: Orbax logs every save at INFO."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if "orbax" not in record.pathname:
      return True
    # A failed save is re-raised to `main`, which says what to do: its line is enough.
    record.exc_info = record.exc_text = None
    return record.levelno >= std_logging.WARNING


def main(argv):
  del argv   # cli.run rejects stray arguments.
  logging.get_absl_handler().addFilter(_QuietLibraries())
  parallel.maybe_initialize_distributed()
  from nda_jax.trainers import loop  # pylint: disable=g-import-not-at-top  (after distributed init)
  config = _CONFIG.value
  try:
    logging.info("config:\n%s", config)
    loop.train_and_evaluate(config, _WORKDIR.value, _ALLOW_CONFIG_CHANGE.value)
  except (ValueError, FileNotFoundError, ckpt_lib.DamagedCheckpointError,
          loop.NonFiniteError, workdir_lock.WorkdirInUseError) as e:
    cli.fail(_PROG, cli.describe_storage_error(e) or str(e))
  except KeyboardInterrupt as e:
    print(f"nda_jax: {e}", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main, _PROG, _CONFIG)
