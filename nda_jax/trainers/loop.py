"""The one training loop: runs any method of the trainer registry.

It owns what no method should repeat: devices (`parallel.DataParallel`), the
input pipeline, Orbax checkpoints with the pipeline position, resume (falling
back past damaged steps), SIGTERM/SIGINT, the on-device NaN guard, the
log / artifact / evaluation / checkpoint cadence and closing everything.
A method (see `method.py`) supplies its state, step and eval callables.

After each step the loop runs its periodic actions in order, each with its own
cadence (as jaxline's PeriodicAction): log, artifacts, evaluate, save. An
evaluation also saves (a checkpoint keeps its metrics for keep-best), and every
save step is logged (a resume continues the device-hours of that record).
"""
import contextlib
import dataclasses
import functools
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from nda_jax import checkpoint as ckpt_lib
from nda_jax import config_lib
from nda_jax import evaluators as evaluators_lib
from nda_jax import logs
from nda_jax import parallel
from nda_jax import trainers
from nda_jax import workdir_lock
from nda_jax.data import pipeline
from nda_jax.trainers import method as method_lib

PyTree = Any
# A logging window that waited on the input longer than this is reported as input-bound.
INPUT_BOUND = 0.5
INPUT_BOUND_WARNING = (
    "step %d: input-bound, %.0f%% of the time since the last log waited for the next host "
    "batch: raise config.data.worker_count (processes) or read_threads, or decode less")
# The guard's `bad_metric` when every metric was finite and the new state was not.
_PARAMETERS = -1


class NonFiniteError(FloatingPointError):
  """A step produced NaN/Inf; it was not applied and nothing after it was saved."""


# ------------------------------------------------------------------ NaN guard
def _all_finite(tree: PyTree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def guarded(step_fn: method_lib.StepFn) -> method_lib.StepFn:
  """Wraps a per-device step so that a non-finite step is not applied.

  The carry is (state, guard): guard = (first bad step or -1, `bad_metric`: the
  index of its first non-finite metric in sorted order, or _PARAMETERS when its
  metrics were finite and the new state was not). The check is a few reductions
  per step, on device; the host reads the guard only when it logs or saves.
  """
  def step(carry, batch):
    state, (bad_step, bad_metric) = carry
    new_state, metrics = step_fn(state, batch)
    this_bad = _first_non_finite(metrics)
    ok = (this_bad == _PARAMETERS) & _all_finite(new_state)
    state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
    first = (bad_step < 0) & ~ok
    bad_step = jnp.where(first, state.step, bad_step)
    bad_metric = jnp.where(first, this_bad, bad_metric)
    return (state, (bad_step, bad_metric)), metrics
  return step


def _first_non_finite(metrics: dict[str, jax.Array]) -> jax.Array:
  """The index of the first non-finite metric in sorted order; _PARAMETERS if none is."""
  finite = [jnp.all(jnp.isfinite(metrics[k])) for k in sorted(metrics)]
  if not finite:
    return jnp.array(_PARAMETERS, jnp.int32)
  finite = jnp.stack(finite)
  return jnp.where(jnp.all(finite), _PARAMETERS, jnp.argmin(finite)).astype(jnp.int32)


def _new_guard() -> tuple[jax.Array, jax.Array]:
  return jnp.array(-1, jnp.int32), jnp.array(-1, jnp.int32)


def check_guard(guard, metric_names: list[str], workdir: str,
                last_saved: int | None = None) -> None:
  """NonFiniteError if a step went non-finite; `last_saved`: the newest checkpoint's step."""
  bad_step, bad_metric = (int(x) for x in jax.device_get(guard))
  if bad_step < 0:
    return
  what = "parameters" if bad_metric == _PARAMETERS else metric_names[bad_metric]
  kept = (f"The last good checkpoint, step {last_saved}, in {workdir}/checkpoints is kept"
          if last_saved is not None else
          f"No checkpoint was saved before it ({workdir}/checkpoints has none)")
  raise NonFiniteError(
      f"step {bad_step + 1} produced a non-finite {what!r}; that step was not applied and "
      f"the run stopped. {kept}: lower the learning rate (config.optim.*), check the data, "
      f"or try config.dtype='float32'.")


# ------------------------------------------------------------------ evaluation
def make_evaluators(config: ml_collections.ConfigDict, workdir: str, mesh) -> dict[str, Any]:
  """The run's evaluators; `evaluators.build` checks config.evals (ValueError naming a key)."""
  if not config.get("evals"):
    return {}
  return evaluators_lib.build(config.evals, config.data, workdir=workdir, mesh=mesh)


def run_evaluators(evaluators: dict[str, Any], eval_fns: dict[str, Any], state: PyTree,
                   names=None) -> dict[str, float]:
  """Runs the evaluators (all, or `names`) with the eval callables bound to `state`."""
  bound = {k: functools.partial(fn, state) for k, fn in eval_fns.items()}
  results = {}
  for name, evaluator in evaluators.items():
    if names is not None and name not in names:
      continue
    missing = [k for k in evaluator.requires if k not in bound]
    if missing:
      raise ValueError(f"evaluator {name!r} needs {missing}, which trainer "
                       f"{type(evaluator).__name__} cannot provide")
    for metric, value in evaluator.run(**{k: bound[k] for k in evaluator.requires}):
      results[metric] = float(value)
  return results


def _due(every: int, step: int, last: bool) -> bool:
  return bool(every) and step % every == 0 or last


# ------------------------------------------------------------------ checks and setup
_INTEGERS_AT_LEAST = (("max_devices", 0), ("checkpoint.every", 1), ("checkpoint.keep", 1),
                      ("train.log_every", 1), ("train.total_steps", 0))


def devices_and_method(config: ml_collections.ConfigDict
                       ) -> tuple[parallel.DataParallel, method_lib.Method]:
  """The devices and the method (the one instance the run uses) of a config that
  passes every check of the loop and the method that needs no data (ValueError
  otherwise), before the workdir is touched. `config.evals` is checked where
  it is read, by `make_evaluators`."""
  for key, low in _INTEGERS_AT_LEAST:
    method_lib.check_range(config, key, low=low, integer=True)
  if config.max_devices > len(jax.devices()):
    raise ValueError(f"config.max_devices={config.max_devices} but only "
                     f"{len(jax.devices())} devices are present")
  dp = parallel.DataParallel(config.parallel, config.max_devices)
  method = trainers.get_method(config)
  method.validate(dp.num_devices)
  return dp, method


def _lock(workdir: str):
  """Process 0 takes the workdir's lock; every process learns whether it did."""
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = workdir_lock.acquire(workdir)
    except (workdir_lock.WorkdirInUseError, ValueError) as e:
      error = e
  if jax.process_count() > 1:
    votes = multihost_utils.process_allgather(np.int32(error is None))
    if error is None and not votes.min():
      raise workdir_lock.WorkdirInUseError(
          f"process 0 could not lock --workdir={workdir} (its log says why)")
  if error is not None:
    raise error
  return lock


def _open_data(config: ml_collections.ConfigDict, method: method_lib.Method):
  """The training iterator; sizes the method's epochs by its split (closed on an error)."""
  data_iter = pipeline.make_train_iterator(
      config.data, global_batch_size=method.examples_per_step, seed=config.seed)
  try:
    if "num_classes" in config.data and data_iter.num_classes != config.data.num_classes:
      raise ValueError(f"config.data.num_classes={config.data.num_classes} but "
                       f"{data_iter.source!r} has {data_iter.num_classes} classes")
    method.num_train_examples = len(data_iter.source)
    if method.total_steps <= 0:
      raise ValueError(f"the run has {method.total_steps} steps: set config.train.total_steps "
                       f"or config.train.num_epochs to a positive number")
  except ValueError:
    data_iter.close()
    raise
  return data_iter


def _restore_or_init(config, workdir: str, dp: parallel.DataParallel,
                     method: method_lib.Method, checkpointer, data_iter) -> PyTree:
  """The latest readable checkpoint's state (and pipeline position), else a new state.
  Restored first: a resumed run needs no init (a probe's init reads its pretrained run)."""
  restored = checkpointer.restore_latest(
      trainers.abstract_state(method, dp.replicated_sharding()), data_iter)
  if restored is None:
    return method.init_state(jax.random.PRNGKey(config.seed))
  start, state, data = restored
  logging.info("resumed from step %d in %s", start, workdir)
  if data == "start":
    logging.info("checkpoint %d has no input-pipeline position (imported weights): the "
                 "pipeline starts from the beginning", start)
  elif data == "other_process_count":
    logging.warning("checkpoint %d was saved by a different number of processes: the "
                    "input pipeline cannot continue where it was and starts anew", start)
  return state


# ------------------------------------------------------------------ the run and its actions
@dataclasses.dataclass
class _Run:
  """What the step and the periodic actions work on; `carry` (state, guard) and
  `step` are replaced by every step, so actions read them here, never capture them."""
  workdir: str
  dp: parallel.DataParallel
  method: method_lib.Method
  data_iter: Any
  checkpointer: ckpt_lib.Checkpointer
  writer: logs.MetricWriter
  progress: logs.Progress
  carry: PyTree
  step: int
  metrics: dict[str, float] = dataclasses.field(default_factory=dict)   # Last logged + evals.
  metric_names: list[str] = dataclasses.field(default_factory=list)     # The guard's index.

  def state(self) -> PyTree:
    return self.dp.get_state(self.carry)[0]

  def check_guard(self) -> None:
    check_guard(self.dp.get_state(self.carry)[1], self.metric_names, self.workdir,
                self.checkpointer.latest_step())


class _Step:
  """One training step: the next host batch onto the devices, the guarded step."""

  def __init__(self, dp: parallel.DataParallel, method: method_lib.Method):
    self._dp, self._method = dp, method
    self._fn = dp.step(guarded(method.make_step()), batch_axis=method.batch_axis)
    self._block = parallel.must_block_each_step()
    self._compiled = False

  def __call__(self, run: _Run) -> dict[str, jax.Array]:
    host_batch = self._method.step_batch(run.progress.next_batch(run.data_iter))
    batch = self._dp.shard_batch(host_batch, batch_axis=self._method.batch_axis)
    if not self._compiled:
      parallel.compile_together(self._fn, run.carry, batch)
      self._compiled = True
    run.carry, device_metrics = self._fn(run.carry, batch)
    run.step += 1
    if self._block:
      jax.block_until_ready(device_metrics)
    return device_metrics


class _Log:
  """The step's metrics, throughput and input waits: metrics.jsonl, TensorBoard, the log."""

  def __init__(self, every: int, total: int):
    self.every, self.total = every, total

  def due(self, step: int, last: bool) -> bool:
    return _due(self.every, step, last)

  def __call__(self, run: _Run, device_metrics: dict[str, jax.Array]) -> None:
    run.metric_names = sorted(device_metrics)
    run.check_guard()
    run.metrics = run.dp.unreplicate_metrics(device_metrics)
    run.metrics.update(run.progress.update(run.step))
    run.writer.write(run.step, run.metrics)
    logging.info("%s", logs.Progress.line(run.step, self.total, run.metrics))
    if run.metrics["input_wait_fraction"] > INPUT_BOUND:
      logging.warning(INPUT_BOUND_WARNING, run.step, 100 * run.metrics["input_wait_fraction"])


class _Artifacts:
  """The method's periodic outputs (the GAN's sample sheets); never when `every` is 0."""

  def __init__(self, every: int):
    self.every = every

  def due(self, step: int, last: bool) -> bool:
    return bool(self.every) and _due(self.every, step, last)

  def __call__(self, run: _Run) -> None:
    run.method.artifacts(run.state(), run.workdir, run.step)


class _Evaluate:
  """Each evaluator at its own `every` and at the last step (not at a stop by signal)."""

  def __init__(self, evaluators: dict[str, Any], eval_fns: dict[str, Any],
               every: dict[str, int], total: int):
    self.evaluators, self.eval_fns, self.every, self.total = evaluators, eval_fns, every, total

  def due(self, step: int) -> list[str]:
    return [name for name in self.evaluators
            if _due(self.every[name], step, step == self.total)]

  def __call__(self, run: _Run, names: list[str]) -> dict[str, float]:
    results = run_evaluators(self.evaluators, self.eval_fns, run.state(), names)
    run.writer.write(run.step, results)
    run.metrics.update(results)
    logging.info("step %d eval: %s", run.step, results)
    return results


class _Save:
  """A checkpoint (state + pipeline position + evaluation metrics); never of a bad state."""

  def __init__(self, every: int):
    self.every = every

  def due(self, step: int, last: bool) -> bool:
    return _due(self.every, step, last)

  def __call__(self, run: _Run, eval_metrics: dict[str, float] | None) -> None:
    run.check_guard()
    run.checkpointer.save(run.step, run.state(), run.data_iter.get_state(),
                          metrics=eval_metrics)


@dataclasses.dataclass
class _Actions:
  """The periodic actions in the order they run after a step."""
  log: _Log
  artifacts: _Artifacts
  evaluate: _Evaluate
  save: _Save

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, method: method_lib.Method,
                  evaluators: dict[str, Any], eval_fns: dict[str, Any]) -> "_Actions":
    total = method.total_steps
    every = {name: config.evals[name].every for name in evaluators}
    return cls(log=_Log(config.train.log_every, total),
               artifacts=_Artifacts(method.artifact_every),
               evaluate=_Evaluate(evaluators, eval_fns, every, total),
               save=_Save(config.checkpoint.every))

  def after_step(self, run: _Run, device_metrics: dict[str, jax.Array], last: bool) -> None:
    evaluations = self.evaluate.due(run.step)
    save = self.save.due(run.step, last) or bool(evaluations)
    if self.log.due(run.step, last) or save:
      self.log(run, device_metrics)
    with run.progress.paused():
      if self.artifacts.due(run.step, last):
        self.artifacts(run)
      eval_metrics = self.evaluate(run, evaluations) if evaluations else None
      if save:
        self.save(run, eval_metrics)


def _train(run: _Run, step: _Step, actions: _Actions, signals: ckpt_lib.StopSignals) -> None:
  """Steps to the end, or to the step every process agreed to stop after a signal."""
  stopper = parallel.StopAgreement()
  total = run.method.total_steps
  while run.step < total:
    device_metrics = step(run)
    stopper.throttle(device_metrics)
    stop = stopper.should_stop(run.step, signals.requested)
    actions.after_step(run, device_metrics, last=run.step == total or stop)
    if stop:
      logging.warning("stopping at step %d after a signal; checkpoint saved", run.step)
      return


# ------------------------------------------------------------------ the entry point
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_config_change: bool = False) -> dict[str, float]:
  """Trains `config.trainer`'s method, resuming from `workdir`; returns the last metrics.

  Holds the workdir's lock throughout (`workdir_lock`): a second run on the
  same workdir is refused (WorkdirInUseError) and changes nothing. A resume
  whose config trains differently from the run's is refused (ValueError)
  unless `allow_config_change`; then the old config goes to config_history/.
  """
  lock = _lock(workdir)
  try:
    return _train_and_evaluate(config, workdir, allow_config_change)
  finally:
    if lock is not None:
      lock.release()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        allow_config_change: bool) -> dict[str, float]:
  """The config is read once, in order: checks, evaluators, data, checkpoints, state.

  `workdir/config.json` is written only once every check passed and the
  checkpoint (if any) was read: a mistake leaves the workdir as it was.
  SIGTERM: saves and returns. SIGINT: saves and raises KeyboardInterrupt
  (`main` exits 130); a second SIGINT aborts at once.
  """
  dp, method = devices_and_method(config)
  evaluators = make_evaluators(config, workdir, dp.mesh)   # Config errors before any work.
  with contextlib.ExitStack() as stack:
    data_iter = stack.enter_context(contextlib.closing(_open_data(config, method)))
    checkpointer = stack.enter_context(contextlib.closing(trainers.checkpointer(config, workdir)))
    resumed_from = checkpointer.latest_step()
    previous_config = None
    if resumed_from:   # Step 0 holds imported weights: no step was trained yet.
      previous_config = config_lib.check_resume_config(config, workdir, resumed_from,
                                                       allow_config_change)
    signals = ckpt_lib.StopSignals()
    try:
      state = _restore_or_init(config, workdir, dp, method, checkpointer, data_iter)
      if jax.process_index() == 0:   # Every check passed and the checkpoint fits: now write.
        if previous_config is not None:
          config_lib.write_history(previous_config, workdir, resumed_from)
        config_lib.write_config(config, workdir)
      run = _start(workdir, dp, method, data_iter, checkpointer, state)
      stack.callback(run.writer.close)
      eval_fns = method.make_eval_fns(dp) if evaluators else {}
      _train(run, _Step(dp, method), _Actions.from_config(config, method, evaluators, eval_fns),
             signals)
    finally:
      stack.close()   # Input, checkpoints (a pending save) and writer, with the handlers still set.
      signals.restore_handlers()
  if signals.exit_code == 130:
    raise KeyboardInterrupt(f"interrupted at step {run.step}; checkpoint saved in {workdir}")
  return run.metrics


def _start(workdir: str, dp: parallel.DataParallel, method: method_lib.Method, data_iter,
           checkpointer: ckpt_lib.Checkpointer, state: PyTree) -> _Run:
  """The run at the state's step; the writer and the device-hours continue its records."""
  step = int(jax.device_get(state.step))
  writer = logs.MetricWriter(workdir, start_step=step)
  progress = logs.Progress(method.total_steps, method.examples_per_step, step, dp.num_devices,
                             writer.last_value("device_hours") or 0.0)
  return _Run(workdir=workdir, dp=dp, method=method, data_iter=data_iter,
              checkpointer=checkpointer, writer=writer, progress=progress,
              carry=dp.put_state((state, _new_guard())), step=step)
