"""Orbax checkpoints of the whole TrainState plus the input-pipeline position.

A checkpoint is everything a run needs to continue bit-for-bit: the TrainState
pytree (params, optimizer states, SN/BN statistics, EMA, RNG key, step) saved by
Orbax, and each process's data-iterator state as a small JSON file beside it.
Latest-N checkpoints are kept, plus the best-N by an evaluation metric (FID by
default) when the run evaluates. Restores always use an abstract target that
carries shardings, so a run can resume on a different device count.
"""
import json
import os
import signal
import threading
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp

PyTree = Any

_STATE = "state"
_CHECKPOINT_DIR = "checkpoints"
_DATA_DIR = "data_state"


class Checkpointer:
  """Saves and restores (TrainState, data state) pairs in `workdir/checkpoints`."""

  def __init__(self, workdir: str, *, keep: int = 3, keep_best: int = 0,
               best_metric: str = "fid", best_mode: str = "min", async_save: bool = True):
    if best_mode not in ("min", "max"):
      raise ValueError(f"checkpoint.best_mode={best_mode!r}; valid choices: ('min', 'max')")
    self.workdir = workdir
    self.best_metric = best_metric
    self.best_mode = best_mode
    policies = [ocp.checkpoint_managers.LatestN(n=keep)]
    if keep_best:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda m: m[best_metric], reverse=(best_mode == "min"), n=keep_best,
          keep_checkpoints_without_metrics=False))
    self._manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, _CHECKPOINT_DIR)),
        options=ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies)))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def best_step(self) -> int | None:
    """The kept step with the best recorded metric (None when none has one)."""
    scored = []
    for step in self._manager.all_steps():
      metrics = self._manager.metrics(step)
      if metrics and self.best_metric in metrics:
        scored.append((metrics[self.best_metric], step))
    if not scored:
      return None
    return (min if self.best_mode == "min" else max)(scored)[1]

  def resolve_step(self, which: str | int) -> int:
    """'latest', 'best' or a step number -> an existing step, with a clear error."""
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {os.path.join(self.workdir, _CHECKPOINT_DIR)}")
    if which == "latest":
      return self.latest_step()
    if which == "best":
      step = self.best_step()
      if step is None:
        raise ValueError(f"no checkpoint in {self.workdir} has a {self.best_metric!r} metric; "
                         f"use 'latest' or one of the steps {steps}")
      return step
    step = int(which)
    if step not in steps:
      raise ValueError(f"checkpoint step {step} not in {self.workdir}; kept steps: {steps}")
    return step

  def save(self, step: int, state: PyTree, data_state: Any = None,
           metrics: dict[str, float] | None = None, force: bool = False) -> None:
    if data_state is not None:
      path = self._data_state_path(step, jax.process_index())
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path + ".tmp", "w") as f:
        json.dump(data_state, f)
      os.replace(path + ".tmp", path)
    self._manager.save(step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state)}),
                       metrics=metrics, force=force)

  def restore(self, step: int, abstract_state: PyTree) -> tuple[PyTree, Any]:
    """Restores into `abstract_state` (ShapeDtypeStructs with shardings)."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract_state)}))
    data_state = None
    path = self._data_state_path(step, jax.process_index())
    if os.path.exists(path):
      with open(path) as f:
        data_state = json.load(f)
    return restored[_STATE], data_state

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def _data_state_path(self, step: int, process: int) -> str:
    return os.path.join(self.workdir, _DATA_DIR, f"{step}.process{process}.json")


def abstract_like(tree: PyTree, sharding: jax.sharding.Sharding) -> PyTree:
  """ShapeDtypeStructs of `tree` placed on `sharding` (the target for a restore)."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


class PreemptionGuard:
  """Turns SIGTERM (preemption, `kill`) into a flag the training loop polls.

  The loop finishes the iteration in flight, saves a checkpoint and exits 0, so
  nothing is lost; a second SIGTERM is left to the default handler.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._event = threading.Event()
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("signal %d received: checkpointing after this iteration", signum)
    self._event.set()
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def restore_handlers(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
