"""Orbax checkpoints: the whole TrainState plus the input-pipeline position, as one unit.

A checkpoint step holds two Orbax items: `state` (the TrainState pytree:
params, optimizer states, BN/SN statistics, EMA, queue, RNG key, step) and
`data` (each process's grain iterator state, one JSON file per process, written
by grain's own Orbax handler), so both are garbage-collected together.
Latest-N checkpoints are kept, plus the best-N by an evaluation metric.
Restores always use an abstract target that carries shardings, so a run can
resume on a different device count. A step that cannot be read (truncated or
deleted files, a missing data item) is moved aside and the previous one is
used; only the run holding the workdir's lock (`workdir_lock`) moves a step.
Readers (eval, sample, probes) open a run `read_only`: they never write,
move or delete anything in it. Paths go through epath, so a workdir may be a
bucket.
"""
import math
import signal
import threading
from typing import Any, Callable

from absl import logging
import grain.checkpoint as grain_ckpt
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from nda_jax import workdir as workdir_lib
from nda_jax import workdir_lock

PyTree = Any

_STATE = "state"
_DATA = "data"
CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints_damaged"


class DamagedCheckpointError(RuntimeError):
  """No readable checkpoint is left in a workdir that has some."""


class OtherModelError(ValueError):
  """A checkpoint holds arrays of other shapes than the config's TrainState (a user's
  mistake, e.g. a changed model width on resume: the checkpoint is not damaged)."""


class _DataSnapshot:
  """The iterator state taken when `save` is called (an async save writes it later)."""

  def __init__(self, state: bytes):
    self._state = state

  def get_state(self) -> bytes:
    return self._state


class Checkpointer:
  """Saves and restores (TrainState, data state) steps in `workdir/checkpoints`.

  `read_only`: for readers of a run another process may be training; Orbax
  then neither saves nor deletes, and a damaged step is reported, not moved.
  """

  def __init__(self, workdir: str, *, keep: int = 3, keep_best: int = 0,
               best_metric: str = "fid", best_mode: str = "min", async_save: bool = True,
               read_only: bool = False):
    if best_mode not in ("min", "max"):
      raise ValueError(f"checkpoint.best_mode={best_mode!r}; valid choices: ('min', 'max')")
    if keep < 1:
      raise ValueError(f"checkpoint.keep={keep}: keep at least 1 checkpoint")
    self.workdir = workdir
    self.directory = workdir_lib.path(workdir) / CHECKPOINT_DIR
    self.best_metric = best_metric
    self.best_mode = best_mode
    self.read_only = read_only
    policies = [ocp.checkpoint_managers.LatestN(n=keep)]
    if keep_best:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=self._score, reverse=(best_mode == "min"), n=keep_best,
          keep_checkpoints_without_metrics=False))
    # Orbax writes a step's metrics only when `best_fn` is set; the preservation
    # policy above, not `best_fn`, decides what is kept.
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save, create=False, read_only=read_only,
            best_fn=self._score, best_mode=best_mode,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies)))

  def _score(self, metrics: dict[str, float] | None) -> float:
    """`best_metric` of a step's metrics; missing or non-finite scores worst, so
    such a step is never the best."""
    value = (metrics or {}).get(self.best_metric)
    if value is None or not math.isfinite(value):
      return math.inf if self.best_mode == "min" else -math.inf
    return float(value)

  # ------------------------------------------------------------------ steps
  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def best_step(self) -> int | None:
    """The kept step with the best recorded metric (None when none has one)."""
    sign = 1.0 if self.best_mode == "max" else -1.0
    scored = []
    for step in self._manager.all_steps():
      score = self._score(self._manager.metrics(step))
      if math.isfinite(score):
        scored.append((sign * score, step))   # Ties: the later step.
    return max(scored)[1] if scored else None

  def resolve_step(self, which: str | int) -> int:
    """'latest', 'best' or a step number -> an existing step, with a clear error."""
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if which == "latest":
      return steps[-1]
    if which == "best":
      step = self.best_step()
      if step is None:
        raise ValueError(f"no checkpoint in {self.workdir} has a {self.best_metric!r} metric; "
                         f"use 'latest' or one of the steps {steps}")
      return step
    try:
      step = int(which)
    except ValueError:
      raise ValueError(f"checkpoint {which!r}: use 'latest', 'best' or a step number") from None
    if step not in steps:
      raise ValueError(f"checkpoint step {step} not in {self.workdir}; kept steps: {steps}")
    return step

  # ------------------------------------------------------------------ save / restore
  def save(self, step: int, state: PyTree, data_state: bytes | None = None,
           metrics: dict[str, float] | None = None, force: bool = False) -> None:
    """Saves `state` and, for training checkpoints, the iterator position `data_state`."""
    if self.read_only:
      raise RuntimeError(f"{self.directory} was opened read-only: a reader never saves")
    items = {_STATE: ocp.args.StandardSave(state)}
    if data_state is not None:
      items[_DATA] = grain_ckpt.CheckpointSave(_DataSnapshot(data_state))
    self.directory.mkdir(parents=True, exist_ok=True)
    self._manager.save(step, args=ocp.args.Composite(**items), metrics=dict(metrics or {}),
                       force=force)

  def restore(self, step: int, abstract_state: PyTree,
              data_iterator: Any = None) -> tuple[PyTree, str]:
    """Restores into `abstract_state` (ShapeDtypeStructs with shardings).

    With `data_iterator` (anything with get_state/set_state/start_prefetch),
    also sets its position. Returns (state, how the data position was set):
    'restored'; 'start' for a step-0 checkpoint without one (imported
    weights: the pipeline starts from the beginning); 'other_process_count'
    when every pipeline file is for a different number of processes (the
    position cannot be carried over). A set for this process count that lacks
    this process's file, or a training checkpoint without its data item, is
    damage (ValueError), never a silently inexact resume.
    """
    self._check_same_model(step, abstract_state)
    items = {_STATE: ocp.args.StandardRestore(abstract_state)}
    data = "restored"
    if data_iterator is not None:
      data_dir = self.directory / str(step) / _DATA
      if not data_dir.exists():
        if step != 0:
          raise ValueError(f"checkpoint {step} has no input-pipeline state")
        data = "start"
      elif not (data_dir / _process_file()).exists():
        if any(data_dir.glob(f"process_*-of-{jax.process_count()}.json")):
          raise ValueError(f"checkpoint {step}'s input-pipeline state lacks {_process_file()}")
        if not any(data_dir.glob("process_*-of-*.json")):
          raise ValueError(f"checkpoint {step}'s input-pipeline state holds no process file")
        data = "other_process_count"
      else:
        items[_DATA] = grain_ckpt.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored[_STATE], data

  def _check_same_model(self, step: int, abstract_state: PyTree) -> None:
    """OtherModelError when the stored arrays' shapes differ from the target's.

    Compares the sorted shapes (metadata only; names may be stored differently):
    any damage to the metadata itself is left to the restore to report.
    """
    try:
      # The handler reads the metadata file only (the manager knows no handler
      # before the first restore in a process).
      stored = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / _STATE)
      stored = sorted(tuple(m.shape) for m in jax.tree.leaves(stored))
    except Exception:  # pylint: disable=broad-except  (unreadable: the restore reports it)
      return
    wanted = sorted(tuple(a.shape) for a in jax.tree.leaves(abstract_state))
    if stored != wanted:
      differ = [(a, b) for a, b in zip(stored, wanted) if a != b]
      example = f"; e.g. stored {differ[0][0]} vs configured {differ[0][1]}" if differ else ""
      raise OtherModelError(
          f"checkpoint {step} in {self.directory} holds another model than the config "
          f"describes ({len(stored)} arrays stored, {len(wanted)} configured{example}). "
          f"Resume with the run's own config ({self.workdir}/config.json: drop the "
          f"--config overrides that change the model) or use a new workdir")

  def restore_latest(self, abstract_state: PyTree,
                     data_iterator: Any = None) -> tuple[int, PyTree, str] | None:
    """The newest readable step: damaged ones are moved aside with a warning.

    Every process tries the same steps in the same order and all agree on
    which step was read (a failure on any process counts as damage).
    """
    while True:
      step = self.latest_step()
      if step is None:
        damaged = workdir_lib.path(self.workdir) / DAMAGED_DIR
        if damaged.exists() and any(damaged.iterdir()):
          raise DamagedCheckpointError(
              f"no readable checkpoint left in {self.directory}: the damaged ones were moved "
              f"to {damaged}. Delete the workdir to start over, or restore a good copy.")
        return None
      error = None
      try:
        state, data = self.restore(step, abstract_state, data_iterator)
      except OtherModelError:
        raise   # Every process reads the same metadata: all raise alike.
      except Exception as e:  # pylint: disable=broad-except  (any read error = damage)
        error = f"{type(e).__name__}: {str(e)[:500]}"
      ok = _all_processes_agree(error is None)
      if ok:
        return step, state, data
      logging.warning("checkpoint %d in %s cannot be read (%s); moving it to %s and using "
                      "the previous one", step, self.directory, error or "on another process",
                      DAMAGED_DIR)
      self._move_aside(step)

  def _move_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      if self.read_only or not workdir_lock.holds(self.workdir):
        raise DamagedCheckpointError(
            f"checkpoint {step} in {self.directory} cannot be read; only the run holding "
            f"the workdir's lock moves it aside")
      target = workdir_lib.path(self.workdir) / DAMAGED_DIR
      destination = target / str(step)
      suffix = 0
      while destination.exists():
        suffix += 1
        destination = target / f"{step}.{suffix}"
      workdir_lib.move_tree(self.directory / str(step), destination)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"nda_jax_move_aside_{step}")
    self._manager.reload()

  # ------------------------------------------------------------------ lifecycle
  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _process_file() -> str:
  """grain's per-process file name inside the data item."""
  return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def _all_processes_agree(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  votes = multihost_utils.process_allgather(jax.numpy.asarray(int(ok)))
  return bool(votes.min())


def abstract_like(tree: PyTree, sharding: jax.sharding.Sharding) -> PyTree:
  """ShapeDtypeStructs of `tree` placed on `sharding` (the target for a restore)."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


class StopSignals:
  """Turns SIGTERM (preemption, `kill`) and SIGINT (Ctrl-C) into a flag the loop polls.

  The loop finishes the step in flight, saves a checkpoint and exits: 0 after
  SIGTERM, 130 after SIGINT (the shell's convention). A second SIGINT aborts at
  once (KeyboardInterrupt), for a user who does not want to wait for the save.
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self._event = threading.Event()
    self.signal: int | None = None
    self._previous: dict[int, Callable] = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self._event.is_set() and signum == signal.SIGINT:
      raise KeyboardInterrupt
    logging.warning("signal %d received: checkpointing after this step (Ctrl-C again to "
                    "abort without saving)", signum)
    self.signal = self.signal or signum
    self._event.set()
    if signum != signal.SIGINT:
      signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  @property
  def exit_code(self) -> int:
    return 130 if self.signal == signal.SIGINT else 0

  def restore_handlers(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
