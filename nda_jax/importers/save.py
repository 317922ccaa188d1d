"""Writes imported weights as a complete run workdir: config.json + a step-0 checkpoint.

`main` on the same workdir fine-tunes from it (the input pipeline starts from
the beginning, as the log says), and `sample` / `eval` / probes read it like any
run. An existing checkpoint is never overwritten.
"""
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nda_jax import config_lib
from nda_jax import trainers

PyTree = Any


def check_like(new: PyTree, reference: PyTree, what: str) -> PyTree:
  """`new` as jnp arrays, after checking it has `reference`'s structure and shapes."""
  if jax.tree.structure(new) != jax.tree.structure(reference):
    raise ValueError(f"imported {what} does not match the configured model's structure")
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(reference)):
    if np.shape(a) != np.shape(b):
      raise ValueError(f"imported {what} has a leaf of shape {np.shape(a)}; the configured "
                       f"model expects {np.shape(b)} (check the config's model section)")
  return jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), new, reference)


def check_new_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """ValueError if `workdir` already holds checkpoints (an import never overwrites a run)."""
  checkpointer = trainers.checkpointer(config, workdir, async_save=False)
  try:
    steps = checkpointer.all_steps()
  finally:
    checkpointer.close()
  if steps:
    raise ValueError(f"{workdir} already holds checkpoints {steps}; import into a new workdir")


def save_imported(workdir: str, config: ml_collections.ConfigDict, state: PyTree) -> None:
  """Writes `state` (the method's TrainState, step 0) and `config` to `workdir`."""
  check_new_workdir(workdir, config)
  checkpointer = trainers.checkpointer(config, workdir, async_save=False)
  try:
    config_lib.write_config(config, workdir)
    checkpointer.save(0, state, force=True)
  finally:
    checkpointer.close()
