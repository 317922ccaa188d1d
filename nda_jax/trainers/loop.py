"""The one training loop: runs any method of the trainer registry.

It owns what no method should repeat: devices (`parallel.DataParallel`), the
input pipeline, Orbax checkpoints with the pipeline position, resume (falling
back past damaged steps), SIGTERM/SIGINT, the on-device NaN guard, the
log / artifact / evaluation / checkpoint cadence and closing everything.
A method (see `method.py`) supplies its state, step and eval callables.
"""
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
from nda_jax import parallel
from nda_jax import workdir_lock
from nda_jax.data import pipeline
from nda_jax.trainers import common
from nda_jax.trainers import method as method_lib

PyTree = Any
# A logging window that waited on the input longer than this is reported as input-bound.
INPUT_BOUND = 0.5
INPUT_BOUND_WARNING = (
    "step %d: input-bound, %.0f%% of the time since the last log waited for the next host "
    "batch: raise config.data.worker_count (processes) or read_threads, or decode less")
# Recorded in the guard when the parameters (not a metric) went non-finite.
_PARAMS = "parameters"


class NonFiniteError(FloatingPointError):
  """A step produced NaN/Inf; it was not applied and nothing after it was saved."""


# ------------------------------------------------------------------ NaN guard
def _all_finite(tree: PyTree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def guarded(step_fn: method_lib.StepFn) -> method_lib.StepFn:
  """Wraps a per-device step so that a non-finite step is not applied.

  The carry is (state, guard): guard = (first bad step or -1, index of the
  first non-finite metric in sorted order, or len(metrics) for the
  parameters). The check is a few reductions per step, on device; the host
  reads the guard only when it logs or saves.
  """
  def step(carry, batch):
    state, (bad_step, bad_what) = carry
    new_state, metrics = step_fn(state, batch)
    names = sorted(metrics)
    finite = jnp.stack([jnp.all(jnp.isfinite(metrics[k])) for k in names]
                       + [_all_finite(new_state)])
    ok = jnp.all(finite)
    state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
    first = (bad_step < 0) & ~ok
    bad_step = jnp.where(first, state.step, bad_step)
    bad_what = jnp.where(first, jnp.argmin(finite).astype(jnp.int32), bad_what)
    return (state, (bad_step, bad_what)), metrics
  return step


def _new_guard() -> tuple[jax.Array, jax.Array]:
  return jnp.array(-1, jnp.int32), jnp.array(-1, jnp.int32)


def check_guard(guard, metric_names: list[str], workdir: str,
                last_saved: int | None = None) -> None:
  """NonFiniteError if a step went non-finite; `last_saved`: the newest checkpoint's step."""
  bad_step, bad_what = (int(x) for x in jax.device_get(guard))
  if bad_step < 0:
    return
  what = metric_names[bad_what] if bad_what < len(metric_names) else _PARAMS
  kept = (f"The last good checkpoint, step {last_saved}, in {workdir}/checkpoints is kept"
          if last_saved is not None else
          f"No checkpoint was saved before it ({workdir}/checkpoints has none)")
  raise NonFiniteError(
      f"step {bad_step + 1} produced a non-finite {what!r}; that step was not applied and "
      f"the run stopped. {kept}: lower the learning rate (config.optim.*), check the data, "
      f"or try config.dtype='float32'.")


# ------------------------------------------------------------------ evaluation
def make_evaluators(config: ml_collections.ConfigDict, workdir: str, mesh) -> dict[str, Any]:
  if not config.get("evals"):
    return {}
  from nda_jax import evaluators  # pylint: disable=g-import-not-at-top  (above trainers)
  return evaluators.build(config.evals, config.data, workdir=workdir, mesh=mesh)


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


# ------------------------------------------------------------------ the loop
def _positive(config: ml_collections.ConfigDict, key: str, minimum: int = 1) -> None:
  method_lib.check_range(config, key, low=minimum, integer=True)


def check_config(config: ml_collections.ConfigDict) -> parallel.DataParallel:
  """Every check that needs no data: a bad value fails here, before the workdir is touched."""
  from nda_jax import trainers  # pylint: disable=g-import-not-at-top  (the registry imports us)
  _positive(config, "max_devices", minimum=0)
  _positive(config, "checkpoint.every")
  _positive(config, "checkpoint.keep")
  _positive(config, "train.log_every")
  _positive(config, "train.total_steps", minimum=0)
  if config.max_devices > len(jax.devices()):
    raise ValueError(f"config.max_devices={config.max_devices} but only "
                     f"{len(jax.devices())} devices are present")
  dp = parallel.DataParallel(config.parallel, config.max_devices)
  trainers.get_method(config).validate(dp.num_devices)
  if config.get("evals"):
    from nda_jax import evaluators  # pylint: disable=g-import-not-at-top  (above trainers)
    evaluators.validate(config.evals)
  return dp


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
  """Trains `config.trainer`'s method, resuming from `workdir`; returns the last metrics.

  `workdir/config.json` is written only once every check passed and the
  checkpoint (if any) was read: a mistake leaves the workdir as it was.

  SIGTERM: saves and returns. SIGINT: saves and raises KeyboardInterrupt
  (`main` exits 130); a second SIGINT aborts at once.
  """
  from nda_jax import trainers  # pylint: disable=g-import-not-at-top  (the registry imports us)
  dp = check_config(config)
  method = trainers.get_method(config)
  evaluators = make_evaluators(config, workdir, dp.mesh)   # Config errors before any work.
  data_iter = pipeline.make_train_iterator(
      config.data, global_batch_size=method.examples_per_step, seed=config.seed)
  if "num_classes" in config.data and data_iter.num_classes != config.data.num_classes:
    data_iter.close()
    raise ValueError(f"config.data.num_classes={config.data.num_classes} but "
                     f"{data_iter.source!r} has {data_iter.num_classes} classes")
  method.num_train_examples = len(data_iter.source)
  steps_total = method.total_steps
  if steps_total <= 0:
    data_iter.close()
    raise ValueError(f"the run has {steps_total} steps: set config.train.total_steps or "
                     f"config.train.num_epochs to a positive number")

  checkpointer = trainers.checkpointer(config, workdir)
  resumed_from = checkpointer.latest_step()
  previous_config = None
  if resumed_from:   # Step 0 holds imported weights: no step was trained yet.
    try:
      previous_config = config_lib.check_resume_config(config, workdir, resumed_from,
                                                       allow_config_change)
    except ValueError:
      data_iter.close()
      checkpointer.close()
      raise
  signals = ckpt_lib.StopSignals()
  stopper = parallel.StopAgreement()
  writer = None
  try:
    # Restore first: a resumed run needs no init (a probe's init reads its pretrained run).
    restored = checkpointer.restore_latest(
        trainers.abstract_state(method, dp.replicated_sharding()), data_iter)
    if restored is None:
      state = method.init_state(jax.random.PRNGKey(config.seed))
    else:
      start, state, data = restored
      logging.info("resumed from step %d in %s", start, workdir)
      if data == "start":
        logging.info("checkpoint %d has no input-pipeline position (imported weights): the "
                     "pipeline starts from the beginning", start)
      elif data == "other_process_count":
        logging.warning("checkpoint %d was saved by a different number of processes: the "
                        "input pipeline cannot continue where it was and starts anew", start)
    if jax.process_index() == 0:   # Every check passed and the checkpoint fits: now write.
      if previous_config is not None:
        config_lib.write_history(previous_config, workdir, resumed_from)
      config_lib.write_config(config, workdir)
    step = int(jax.device_get(state.step))
    carry = dp.put_state((state, _new_guard()))
    step_fn = dp.step(guarded(method.make_step()), batch_axis=method.batch_axis)
    eval_fns = method.make_eval_fns(dp) if evaluators else {}
    writer = common.MetricWriter(workdir, start_step=step)
    progress = common.Progress(steps_total, method.examples_per_step, step, dp.num_devices,
                               writer.last_value("device_hours") or 0.0)
    block = parallel.must_block_each_step()
    metrics: dict[str, float] = {}
    metric_names: list[str] = []

    def current_state():
      return dp.get_state(carry)[0]

    def save(step, eval_metrics=None):
      check_guard(dp.get_state(carry)[1], metric_names, workdir,   # Never save a bad state.
                  checkpointer.latest_step())
      checkpointer.save(step, current_state(), data_iter.get_state(), metrics=eval_metrics)

    compiled = False
    while step < steps_total:
      batch = dp.shard_batch(method.layout(progress.next_batch(data_iter)),
                             batch_axis=method.batch_axis)
      if not compiled:
        parallel.compile_together(step_fn, carry, batch)
        compiled = True
      carry, device_metrics = step_fn(carry, batch)
      step += 1
      if block:
        jax.block_until_ready(device_metrics)
      stopper.throttle(device_metrics)
      stop = stopper.should_stop(step, signals.requested)
      last = step == steps_total or stop
      due = [name for name in evaluators
             if _due(config.evals[name].every, step, step == steps_total)]
      to_save = _due(config.checkpoint.every, step, last) or bool(due)
      to_log = _due(config.train.log_every, step, last) or to_save
      if to_log or to_save:
        metric_names = sorted(device_metrics)
        check_guard(dp.get_state(carry)[1], metric_names, workdir, checkpointer.latest_step())
      if to_log:
        metrics = dp.unreplicate_metrics(device_metrics)
        metrics.update(progress.update(step))
        writer.write(step, metrics)
        logging.info("%s", common.Progress.line(step, steps_total, metrics))
        if metrics["input_wait_fraction"] > INPUT_BOUND:
          logging.warning(INPUT_BOUND_WARNING, step, 100 * metrics["input_wait_fraction"])
      with progress.paused():
        if method.artifact_every and _due(method.artifact_every, step, last):
          method.artifacts(current_state(), workdir, step)
        eval_metrics = None
        if due:
          eval_metrics = run_evaluators(evaluators, eval_fns, current_state(), due)
          writer.write(step, eval_metrics)
          metrics.update(eval_metrics)
          logging.info("step %d eval: %s", step, eval_metrics)
        if to_save:
          save(step, eval_metrics)
      if stop:
        logging.warning("stopping at step %d after a signal; checkpoint saved", step)
        break
  finally:
    data_iter.close()
    checkpointer.close()
    if writer is not None:
      writer.close()
    signals.restore_handlers()
  if signals.exit_code == 130:
    raise KeyboardInterrupt(f"interrupted at step {step}; checkpoint saved in {workdir}")
  return metrics
