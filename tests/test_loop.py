"""The generic loop with a method that knows nothing of GANs (tests/toy_method.py).

Checkpoints, exact resume (and that it did resume), SIGTERM / SIGINT at seeded
steps, the on-device NaN guard, damaged checkpoints, evaluator cadence.
"""
import json
import logging
import os
import signal
import time

import jax
import numpy as np
import pytest

import snapshot
import toy_method
import toy_runs
from nda_jax import checkpoint as ckpt_lib
from nda_jax import evaluators
from nda_jax import logs
from nda_jax import trainers
from nda_jax.data import pipeline
from nda_jax.trainers import loop

trainers.REGISTRY["toy"] = "toy_method:Toy"


def config(**overrides):
  c = toy_method.get_config()
  c.update_from_flattened_dict(overrides)
  return c


def leaves(workdir, c):
  state = trainers.load_run(str(workdir), config=c)[2]
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


def assert_same_state(a_dir, b_dir, c):
  a, b = leaves(a_dir, c), leaves(b_dir, c)
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """6 uninterrupted steps: the reference every interrupted run must reproduce."""
  workdir = tmp_path_factory.mktemp("straight")
  loop.train_and_evaluate(config(), str(workdir))
  return workdir


def test_resume_is_exact_and_visible(straight_run, tmp_path):
  loop.train_and_evaluate(config(**{"train.total_steps": 2}), str(tmp_path))
  assert trainers.checkpointer(config(), str(tmp_path)).latest_step() == 2
  loop.train_and_evaluate(config(), str(tmp_path))
  # One record per step: the second run started at step 3, it did not start over.
  assert [r["step"] for r in logs.read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5, 6]
  assert_same_state(straight_run, tmp_path, config())


def test_the_loop_trains(straight_run):
  records = logs.read_metrics(str(straight_run))
  assert records[-1]["loss"] < records[0]["loss"]
  assert all(r["img_per_sec"] > 0 for r in records)


def test_signals_at_seeded_steps_resume_bit_for_bit(tmp_path):
  """Stopped by SIGTERM, then by SIGINT, at seeded steps; resumed each time; the end
  state equals an uninterrupted run's."""
  total = 40
  flags = [f"--config.train.total_steps={total}", "--config.checkpoint.every=1000"]
  straight = tmp_path / "straight"
  rc, out = toy_runs.run(straight, *flags)
  assert rc == 0, out[-3000:]
  first, second = sorted(np.random.RandomState(0).choice(np.arange(3, 30), 2, replace=False))
  run = tmp_path / "run"
  rc, out = toy_runs.run(run, *flags, wait_for=first, send=signal.SIGTERM)
  assert rc == 0, out[-3000:]
  stopped = trainers.checkpointer(config(), str(run)).latest_step()
  assert first <= stopped < total, out[-3000:]
  rc, out = toy_runs.run(run, *flags, wait_for=max(second, stopped + 1), send=signal.SIGINT)
  assert rc == 130, out[-3000:]
  assert f"resumed from step {stopped}" in out
  stopped_again = trainers.checkpointer(config(), str(run)).latest_step()
  assert stopped < stopped_again < total
  rc, out = toy_runs.run(run, *flags)
  assert rc == 0 and f"resumed from step {stopped_again}" in out, out[-3000:]
  assert_same_state(straight, run, config(**{"train.total_steps": total}))


def test_nan_stops_the_run_before_a_bad_checkpoint(tmp_path):
  """The NaN is injected through the learning rate (1e38 overflows float32 by step 2)."""
  c = config(**{"optim.lr": 1e38, "checkpoint.every": 1, "train.log_every": 4})
  with pytest.raises(loop.NonFiniteError, match=r"step 2 produced a non-finite") as error:
    loop.train_and_evaluate(c, str(tmp_path))
  assert f"The last good checkpoint, step 1, in {tmp_path}/checkpoints is kept" in str(error.value)
  ckpt = trainers.checkpointer(c, str(tmp_path))
  assert ckpt.all_steps() == [1]          # Nothing saved from step 2 on.
  for leaf in leaves(tmp_path, c):
    assert np.all(np.isfinite(leaf))


def test_nan_before_any_checkpoint_says_there_is_none(tmp_path):
  """The message claims no kept checkpoint when none was saved (found at a log point)."""
  c = config(**{"optim.lr": 1e38, "checkpoint.every": 1000, "train.log_every": 1})
  with pytest.raises(loop.NonFiniteError, match=r"step 2 produced a non-finite") as error:
    loop.train_and_evaluate(c, str(tmp_path))
  assert "No checkpoint was saved before it" in str(error.value)
  assert "last good checkpoint" not in str(error.value)
  assert trainers.checkpointer(c, str(tmp_path)).all_steps() == []


def _truncate_array_files(step_dir):
  """Cuts every array data file of a step in half (an interrupted copy, a full disk)."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir / "state") for f in fs
           if os.path.basename(d) == "d"]
  assert files
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage", ["truncate", "delete_data_item"])
def test_damaged_latest_checkpoint_falls_back(straight_run, tmp_path, damage):
  loop.train_and_evaluate(config(**{"train.total_steps": 4}), str(tmp_path))
  step_dir = tmp_path / "checkpoints" / "4"
  if damage == "truncate":
    _truncate_array_files(step_dir)
  else:
    import shutil
    shutil.rmtree(step_dir / "data")
  loop.train_and_evaluate(config(), str(tmp_path))
  assert (tmp_path / ckpt_lib.DAMAGED_DIR / "4").exists()
  steps = [r["step"] for r in logs.read_metrics(str(tmp_path))]
  assert steps == [1, 2, 3, 4, 5, 6]    # Resumed from step 2, the last good one: each step once.
  assert_same_state(straight_run, tmp_path, config())


def test_no_good_checkpoint_is_a_clear_error(tmp_path):
  loop.train_and_evaluate(config(**{"train.total_steps": 2}), str(tmp_path))
  _truncate_array_files(tmp_path / "checkpoints" / "2")
  with pytest.raises(ckpt_lib.DamagedCheckpointError, match="no readable checkpoint"):
    loop.train_and_evaluate(config(), str(tmp_path))


def test_evaluators_run_at_their_cadence(tmp_path):
  c = config()
  c.evals.knn = evaluators.default_config("knn")
  c.evals.knn.update(every=3, k=5)
  loop.train_and_evaluate(c, str(tmp_path))
  evaluated = {r["step"]: r["knn_top1"] for r in logs.read_metrics(str(tmp_path))
               if "knn_top1" in r}
  assert sorted(evaluated) == [3, 6]
  assert all(0.1 < v <= 1.0 for v in evaluated.values())
  # An evaluation also saves (steps 3 and 6 besides every 2nd step).
  assert trainers.checkpointer(c, str(tmp_path)).all_steps() == [2, 3, 4, 6]


def test_config_json_not_overwritten_by_a_bad_config(tmp_path):
  rc, out = toy_runs.run(tmp_path, "--config.train.total_steps=2")
  assert rc == 0, out[-3000:]
  before = (tmp_path / "config.json").read_text()
  rc, out = toy_runs.run(tmp_path, "--config.checkpoint.every=0")
  assert rc == 1 and "checkpoint.every" in out and "Traceback" not in out
  assert (tmp_path / "config.json").read_text() == before
  assert json.loads(before)["train"]["total_steps"] == 2


@pytest.mark.parametrize("mode", ["min", "max"])
def test_keep_best_keeps_the_best_step_across_a_resume(tmp_path, mode):
  """keep=1 keeps only the latest step; keep_best=1 must also keep the step whose
  kNN top-1 is best so far, through a resume, and `which='best'` loads it. In
  'min' mode the best is an early step (accuracy rises as the toy trains), so it
  survives only if keep-best really preserves it."""
  c = config(**{"train.total_steps": 8, "checkpoint.every": 1, "checkpoint.keep": 1,
                "checkpoint.keep_best": 1, "checkpoint.best_metric": "knn_top1",
                "checkpoint.best_mode": mode})
  c.evals.knn = evaluators.default_config("knn")
  c.evals.knn.update(every=1, k=5)
  half = config(**{"train.total_steps": 4})
  half.checkpoint, half.evals = c.checkpoint, c.evals
  loop.train_and_evaluate(half, str(tmp_path))
  loop.train_and_evaluate(c, str(tmp_path))
  records = logs.read_metrics(str(tmp_path))
  assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))   # Resumed at 5.
  scores = {r["step"]: r["knn_top1"] for r in records if "knn_top1" in r}
  assert sorted(scores) == list(range(1, 9))
  sign = 1 if mode == "max" else -1
  best = max(scores, key=lambda s: (sign * scores[s], s))     # Ties: the later step.
  if mode == "min":
    assert best < 8, scores   # The test's premise: the best is not the latest.
  checkpointer = trainers.checkpointer(c, str(tmp_path), read_only=True)
  assert checkpointer.all_steps() == sorted({best, 8})
  assert checkpointer.resolve_step("best") == best
  state = trainers.load_run(str(tmp_path), "best", config=c)[2]
  assert int(state.step) == best


def test_a_missing_pipeline_file_is_damage_not_another_process_count(straight_run, tmp_path):
  """Without this process's pipeline file, step 4 cannot resume exactly: the run
  falls back to step 2 (and says it is damage), ending where an exact run ends."""
  loop.train_and_evaluate(config(**{"train.total_steps": 4}), str(tmp_path))
  (tmp_path / "checkpoints" / "4" / "data" / "process_0-of-1.json").unlink()
  loop.train_and_evaluate(config(), str(tmp_path))
  assert (tmp_path / "checkpoints_damaged" / "4").is_dir()
  assert [r["step"] for r in logs.read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5, 6]
  assert_same_state(straight_run, tmp_path, config())


@pytest.mark.parametrize("change", ["--config.train.batch_size=16", "--config.seed=1",
                                    "--config.optim.lr=0.05"])
def test_a_resume_that_trains_differently_is_refused(tmp_path, change):
  rc, out = toy_runs.run(tmp_path, "--config.train.total_steps=2")
  assert rc == 0, out[-3000:]
  before = snapshot.tree(tmp_path)
  rc, out = toy_runs.run(tmp_path, change)
  key, value = change[len("--config."):].split("=")
  assert rc == 1 and "Traceback" not in out, out[-3000:]
  assert f"trained to step 2 with another config: {key}:" in out, out[-3000:]
  assert "--allow_config_change" in out
  assert snapshot.tree(tmp_path) == before    # config.json and every checkpoint unchanged.


def test_allow_config_change_keeps_the_old_config(tmp_path):
  rc, out = toy_runs.run(tmp_path, "--config.train.total_steps=2")
  assert rc == 0, out[-3000:]
  first = json.loads((tmp_path / "config.json").read_text())
  rc, out = toy_runs.run(tmp_path, "--config.train.batch_size=16", "--allow_config_change")
  assert rc == 0, out[-3000:]
  assert json.loads((tmp_path / "config_history" / "step_2.json").read_text()) == first
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["train"]["batch_size"] == 16 and "allow_config_change" not in json.dumps(saved)
  assert trainers.checkpointer(config(), str(tmp_path)).latest_step() == 6   # It resumed on.


def test_running_longer_or_logging_differently_is_not_a_change(tmp_path):
  rc, out = toy_runs.run(tmp_path, "--config.train.total_steps=2")
  assert rc == 0, out[-3000:]
  rc, out = toy_runs.run(tmp_path, "--config.train.total_steps=4", "--config.checkpoint.every=1",
                      "--config.train.log_every=2")
  assert rc == 0, out[-3000:]
  assert not (tmp_path / "config_history").exists()
  assert trainers.checkpointer(config(), str(tmp_path)).latest_step() == 4


class _SlowInput:
  """The real training iterator behind a fixed sleep per batch: a run whose input is
  slower than its steps. Records when each batch was asked for and how long it took."""

  def __init__(self, iterator, sleep_s):
    self._iterator, self._sleep_s = iterator, sleep_s
    self.asked, self.waited = [], []

  def __next__(self):
    start = time.perf_counter()
    time.sleep(self._sleep_s)
    batch = next(self._iterator)
    self.asked.append(start)
    self.waited.append(time.perf_counter() - start)
    return batch

  def __getattr__(self, name):
    return getattr(self._iterator, name)


def _slow_run(monkeypatch, workdir, sleep_s, **overrides):
  real = pipeline.make_train_iterator
  made = []

  def make(*args, **kwargs):
    made.append(_SlowInput(real(*args, **kwargs), sleep_s))
    return made[-1]
  monkeypatch.setattr(pipeline, "make_train_iterator", make)
  start = time.perf_counter()
  loop.train_and_evaluate(config(**overrides), str(workdir))
  return made[0], time.perf_counter() - start


def test_input_waits_throughput_and_device_hours_are_logged(tmp_path, monkeypatch, caplog):
  """With log_every=1 the batch of step k is asked for inside step k's logging window,
  so over steps 2..steps-1 (step 1's window holds the compilation) the logged wait
  share is the test's own measured waits over the time from the first request to the
  last: the same span up to the log-to-request offset at its two ends. Window by
  window the two differ by up to 12 ms, over 8 windows of 0.05 s sleeps by 30 ms
  (5%) at a load of 16 on 2 cores: 10 windows of 0.1 s keep that under 3%."""
  steps, sleep_s, devices = 12, 0.1, jax.device_count()
  with caplog.at_level(logging.WARNING):
    source, wall = _slow_run(monkeypatch, tmp_path, sleep_s, **{
        "train.total_steps": steps, "checkpoint.every": 1000})
  records = {r["step"]: r for r in logs.read_metrics(str(tmp_path))}
  assert sorted(records) == list(range(1, steps + 1))
  span = source.asked[steps - 1] - source.asked[1]         # Requests 2..steps-1.
  share = sum(source.waited[1:steps - 1]) / span
  assert share > 0.5       # The premise: sleeping dominates the toy's step.
  windows = [records[k]["sec_per_step"] for k in range(2, steps)]
  logged = sum(records[k]["input_wait_fraction"] * w
               for k, w in zip(range(2, steps), windows)) / sum(windows)
  assert abs(logged - share) < 0.05, (logged, share)
  # img/s per device = images / time / devices, over the same steps by the test's clock.
  batch = config().train.batch_size
  ours = batch * (steps - 2) / span / devices
  seconds = sum(batch / devices / records[k]["img_per_sec_per_device"] for k in range(2, steps))
  assert batch * (steps - 2) / seconds / devices == pytest.approx(ours, rel=0.05)
  hours = [records[k]["device_hours"] for k in range(1, steps + 1)]
  assert all(b > a for a, b in zip(hours, hours[1:]))
  assert hours[-1] * 3600 / devices <= wall                # The loop ran inside the call.
  assert hours[-2] - hours[0] == pytest.approx(span * devices / 3600, rel=0.05)
  bound = {r.getMessage().split(":")[0] for r in caplog.records if "input-bound" in r.getMessage()}
  assert bound == {f"step {k}" for k in records
                   if records[k]["input_wait_fraction"] > loop.INPUT_BOUND}
  assert f"step {steps - 1}" in bound


def test_device_hours_continue_across_a_resume(tmp_path, monkeypatch):
  """A resumed run starts from the device-hours of the step it resumes from (the
  record every checkpoint step has): the first run's 3 batches sleep 0.3 s each, so
  a run that started from zero would log at step 4 less than the first run's 0.9 s
  plus the second's own 0.02 s wait."""
  devices = jax.device_count()
  _slow_run(monkeypatch, tmp_path, 0.3, **{"train.total_steps": 3, "checkpoint.every": 1000,
                                         "train.log_every": 2})
  first = {r["step"]: r["device_hours"] for r in logs.read_metrics(str(tmp_path))}
  assert sorted(first) == [2, 3]         # Step 3 was logged because it was saved.
  assert first[3] * 3600 / devices >= 0.9
  source, wall = _slow_run(monkeypatch, tmp_path, 0.02, **{"checkpoint.every": 1000})
  records = logs.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [2, 3, 4, 5, 6]
  hours = [r["device_hours"] for r in records]
  assert hours[:2] == [first[2], first[3]]
  assert all(b > a for a, b in zip(hours, hours[1:]))
  assert source.waited[0] <= (hours[2] - first[3]) * 3600 / devices <= wall
  assert (hours[-1] - first[3]) * 3600 / devices <= wall
