"""The pretrained run a probe starts from: `config.pretrained_workdir` at `pretrained_checkpoint`.

Both probes (linear_probe on a MoCo run, video_classifier on a DPC run) take
their encoder from the run the same way: its architecture from the run's
config.json, its weights from the checkpoint (through the trainer registry).
A key of the architecture that the probe's own config sets too (the images'
channels; the video classifier's `model`, which its clips and its untrained
baseline need) must have the run's value.
"""
from typing import Any, Sequence

import ml_collections

from nda_jax import config_lib
from nda_jax import trainers

FLAG = "config.pretrained_workdir"


def run_config(config: ml_collections.ConfigDict, trainer: str, what: str, reads: str, *,
               untrained: bool = False) -> ml_collections.ConfigDict | None:
  """The config.json of `config.pretrained_workdir`, which must be a `trainer` run
  (`what`: the workdir it may be; `reads`: the trainers it may come from); with
  `untrained`, '' is the untrained baseline (None)."""
  workdir = config.pretrained_workdir
  baseline = ", or --config.pretrained_workdir='' for the untrained baseline" if untrained else ""
  if workdir is None or (not workdir and not untrained):
    raise ValueError(f"{FLAG} is not set: pass --{FLAG}=DIR, the workdir of {what}{baseline}")
  if not workdir:
    return None
  return config_lib.load_run_config(workdir, FLAG, trainer, reads)


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  for part in key.split("."):
    config = config[part]
  return config


def check_agrees(config: ml_collections.ConfigDict, run: ml_collections.ConfigDict,
                 keys: Sequence[str]) -> None:
  """ValueError naming each dotted key of `keys` whose value in `config` differs from the run's."""
  differ = [f"{key}={_get(config, key)!r} (the run has {_get(run, key)!r})" for key in keys
            if _get(config, key) != _get(run, key)]
  if differ:
    raise ValueError(f"{FLAG}={config.pretrained_workdir} is a different architecture: "
                     f"{', '.join(differ)}; set them to the run's")


def check_checkpoint(config: ml_collections.ConfigDict, run: ml_collections.ConfigDict) -> None:
  """ValueError naming config.pretrained_checkpoint unless the run has that checkpoint."""
  try:
    trainers.read_checkpoint(run, config.pretrained_workdir, config.pretrained_checkpoint,
                             lambda ckpt, step: step)
  except (ValueError, FileNotFoundError) as e:
    raise ValueError(f"config.pretrained_checkpoint={config.pretrained_checkpoint!r}: {e}") from None


def load_state(config: ml_collections.ConfigDict) -> Any:
  """The run's TrainState at config.pretrained_checkpoint (read from disk, one device)."""
  _, _, state = trainers.load_run(config.pretrained_workdir, config.pretrained_checkpoint)
  return state
