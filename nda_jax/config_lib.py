"""Config I/O: the resolved config a run writes to, and reads back from, its workdir."""
import json

import ml_collections

from nda_jax import workdir as workdir_lib

CONFIG_FILE = "config.json"


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The resolved config, beside the run's checkpoints."""
  path = workdir_lib.path(workdir) / CONFIG_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run wrote to its workdir (for eval, sampling, importers).

  A config written by an older version is brought up to date: evaluator
  sections take their current shape, and missing declared keys their defaults.
  """
  path = workdir_lib.path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: {workdir} is not the workdir of a run")
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  _upgrade_gan_optim(config)
  from nda_jax import evaluators  # pylint: disable=g-import-not-at-top  (heavy)
  evaluators.upgrade_legacy(config)
  return config


def _upgrade_gan_optim(config: ml_collections.ConfigDict) -> None:
  """GAN configs before per-part optimizer sections had optim.{g_lr, d_lr, b1, b2, eps}."""
  optim_cfg = config.get("optim")
  if optim_cfg is None or "g_lr" not in optim_cfg:
    return
  from nda_jax import optim  # pylint: disable=g-import-not-at-top
  upgraded = ml_collections.ConfigDict()
  for part in ("g", "d"):
    upgraded[part] = optim.default_config("adam")
    upgraded[part].lr = optim_cfg[f"{part}_lr"]
    upgraded[part].b1, upgraded[part].b2 = optim_cfg.b1, optim_cfg.b2
    upgraded[part].eps = optim_cfg.eps
  config.optim = upgraded
