"""The trainer registry: `config.trainer` -> the method class, for every entry point.

`main`, `eval`, `sample`, the tools, importers and notebooks all find a
method here, and load a run's checkpoint with `load_run`.
"""
from collections.abc import Callable
import importlib
import itertools
from typing import Any

from absl import logging
import jax
import ml_collections

from nda_jax import checkpoint as ckpt_lib
from nda_jax import config_lib
from nda_jax import workdir as workdir_lib
from nda_jax.trainers import method as method_lib

_VANISHED_RETRIES = 4   # Each retry follows a save of a live run: a few are plenty.

# config.trainer -> "module:Class"; modules are imported only when used.
REGISTRY = {
    "gan": "nda_jax.trainers.gan:GAN",
    "moco": "nda_jax.trainers.moco:MoCo",
    "linear_probe": "nda_jax.trainers.linear_probe:LinearProbe",
    "dpc": "nda_jax.trainers.dpc:DPC",
    "video_classifier": "nda_jax.trainers.video_classifier:VideoClassifier",
}


def get_method(config: ml_collections.ConfigDict,
               num_train_examples: int | None = None) -> method_lib.Method:
  name = config.get("trainer")
  if name not in REGISTRY:
    raise ValueError(f"config.trainer={name!r}; valid choices: {sorted(REGISTRY)}")
  module, cls = REGISTRY[name].split(":")
  return getattr(importlib.import_module(module), cls)(config, num_train_examples)


def checkpointer(config: ml_collections.ConfigDict, workdir: str,
                 async_save: bool | None = None, read_only: bool = False
                 ) -> ckpt_lib.Checkpointer:
  c = config.checkpoint
  return ckpt_lib.Checkpointer(
      workdir, keep=c.keep, keep_best=c.keep_best, best_metric=c.best_metric,
      best_mode=c.best_mode, async_save=c.async_save if async_save is None else async_save,
      read_only=read_only)


def abstract_state(method: method_lib.Method, sharding: jax.sharding.Sharding) -> Any:
  """The method's TrainState as ShapeDtypeStructs on `sharding` (a restore target)."""
  shapes = jax.eval_shape(method.init_state, jax.random.PRNGKey(0))
  return ckpt_lib.abstract_like(shapes, sharding)


def load_run(workdir: str, which: str | int = "latest",
             config: ml_collections.ConfigDict | None = None
             ) -> tuple[ml_collections.ConfigDict, method_lib.Method, Any]:
  """(config, method, TrainState on one device) of a run's checkpoint.

  `which` is 'latest', 'best' or a step; `config` defaults to the run's
  config.json. Nothing in the workdir is written, moved or deleted: a run may
  be training there. A step its keep-N deletes between choosing and reading
  is chosen again (a few times) for 'latest' and 'best'.
  """
  config = config if config is not None else config_lib.load_config(workdir)
  method = get_method(config)
  target = abstract_state(method, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  state = read_checkpoint(config, workdir, which, lambda ckpt, step: ckpt.restore(step, target)[0])
  return config, method, state


def read_checkpoint(config: ml_collections.ConfigDict, workdir: str, which: str | int,
                    read: Callable[[ckpt_lib.Checkpointer, int], Any]) -> Any:
  """`read(checkpointer, step)` for the step `which` names, read-only, as a reader of a run
  that may be training: when a save or keep-N changed the steps during a failed read, the
  step is chosen again (a few times); an error with the steps unchanged is re-raised."""
  explicit = str(which) not in ("latest", "best")
  for attempt in itertools.count():
    steps = _steps_on_disk(workdir)
    try:
      ckpt = checkpointer(config, workdir, async_save=False, read_only=True)
      try:
        return read(ckpt, ckpt.resolve_step(which))
      finally:
        ckpt.close()
    except Exception:  # pylint: disable=broad-except  (re-raised unless a save moved on)
      now = _steps_on_disk(workdir)
      if now == steps or attempt == _VANISHED_RETRIES or (explicit and not str(which).isdigit()):
        raise   # Nothing changed meanwhile: the error is the checkpoint's or the user's.
      if explicit and int(which) not in now:
        raise FileNotFoundError(
            f"checkpoint step {which} of {workdir} was deleted while it was read (the run "
            f"keeps its latest checkpoint.keep={config.checkpoint.keep} steps); ask for "
            f"'latest' or one of the steps {now}") from None
      logging.info("the steps of %s changed while checkpoint %s was read (a run is saving: "
                   "%s -> %s); reading again", workdir, which, steps, now)


def _steps_on_disk(workdir: str) -> list[int]:
  """The step folders in the run's checkpoints/ (a plain listing: a save or a keep-N
  deletion changes it)."""
  try:
    return sorted(int(p.name) for p in (workdir_lib.path(workdir) / ckpt_lib.CHECKPOINT_DIR
                                        ).iterdir() if p.name.isdigit())
  except FileNotFoundError:
    return []
