"""The trainer registry: `config.trainer` -> the method class, for every entry point.

`main`, `eval`, `sample`, the tools, importers and notebooks all find a
method here, and load a run's checkpoint with `load_run`.
"""
import importlib
from typing import Any

import jax
import ml_collections

from nda_jax import checkpoint as ckpt_lib
from nda_jax import config_lib
from nda_jax.trainers import method as method_lib

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
                 async_save: bool | None = None) -> ckpt_lib.Checkpointer:
  c = config.checkpoint
  return ckpt_lib.Checkpointer(
      workdir, keep=c.keep, keep_best=c.keep_best, best_metric=c.best_metric,
      best_mode=c.best_mode, async_save=c.async_save if async_save is None else async_save)


def abstract_state(method: method_lib.Method, sharding: jax.sharding.Sharding) -> Any:
  """The method's TrainState as ShapeDtypeStructs on `sharding` (a restore target)."""
  shapes = jax.eval_shape(method.init_state, jax.random.PRNGKey(0))
  return ckpt_lib.abstract_like(shapes, sharding)


def load_run(workdir: str, which: str | int = "latest",
             config: ml_collections.ConfigDict | None = None
             ) -> tuple[ml_collections.ConfigDict, method_lib.Method, Any]:
  """(config, method, TrainState on one device) of a run's checkpoint.

  `which` is 'latest', 'best' or a step; `config` defaults to the run's
  config.json. Nothing is written to the workdir.
  """
  config = config if config is not None else config_lib.load_config(workdir)
  method = get_method(config)
  ckpt = checkpointer(config, workdir, async_save=False)
  try:
    step = ckpt.resolve_step(which)
    target = abstract_state(method, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    state, _ = ckpt.restore(step, target)
  finally:
    ckpt.close()
  return config, method, state
