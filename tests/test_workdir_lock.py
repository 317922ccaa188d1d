"""One writer per workdir, with real processes (tests/toy_main.py is nda_jax.main).

A second `main` on a workdir in use is refused, naming the holder, and changes
nothing; the lock goes with its process however it ends; readers (load_run,
eval's records) never write into a training run and survive keep-N deleting
the step they chose.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest

import snapshot
import toy_method
from nda_jax import eval as eval_lib
from nda_jax import logs
from nda_jax import trainers
from nda_jax import workdir_lock

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
trainers.REGISTRY["toy"] = "toy_method:Toy"
TIMEOUT_S = 240


def _start(workdir, *flags):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  cmd = [sys.executable, os.path.join(TESTS, "toy_main.py"), f"--workdir={workdir}", *flags]
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, cwd=REPO)


def _finish(proc):
  try:
    out, _ = proc.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  return proc.returncode, out


def _wait_for_step(proc, step):
  """Reads the progress log until `step` was trained (the lines read are returned)."""
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if f"step {step}/" in line:
      return "".join(lines)
  raise AssertionError(f"the run ended before step {step}:\n" + "".join(lines)[-3000:])


def _steps_logged(workdir):
  return [r["step"] for r in logs.read_metrics(str(workdir))]


def test_second_main_is_refused_naming_the_holder_and_changes_nothing(tmp_path):
  """The first run is frozen (SIGSTOP) mid-training so that its tree holds still while the
  second one tries; thawed, it finishes as if alone."""
  workdir = tmp_path / "run"
  total = 40
  flags = [f"--config.train.total_steps={total}", "--config.checkpoint.every=5"]
  first = _start(workdir, *flags)
  log = _wait_for_step(first, 12)
  first.send_signal(signal.SIGSTOP)
  try:
    time.sleep(1.0)   # An async write in flight when stopped is frozen too (one process).
    before = snapshot.tree(workdir)
    assert workdir_lock.LOCK_FILE in before
    rc, out = _finish(_start(workdir, *flags))
    after = snapshot.tree(workdir)
  finally:
    first.send_signal(signal.SIGCONT)
  assert rc == 1, out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  message = [line for line in out.splitlines() if ": error: " in line]
  assert len(message) == 1, out[-3000:]
  assert "is in use by another run" in message[0]
  assert f"host {socket.gethostname()}, pid {first.pid}, started " in message[0]
  assert after == before
  rc, out = _finish(first)
  assert rc == 0, (log + out)[-3000:]
  assert _steps_logged(workdir) == list(range(1, total + 1))   # Each step once, one writer.
  assert not (workdir / workdir_lock.LOCK_FILE).exists()       # Released on exit.


def test_lock_goes_with_its_process_however_it_ends(tmp_path):
  """SIGKILL (the lock file stays, its flock does not), SIGTERM, a crash, a clean exit:
  each time the next run starts and resumes."""
  workdir = tmp_path / "run"
  total = 60
  flags = [f"--config.train.total_steps={total}", "--config.checkpoint.every=2"]
  lock_file = workdir / workdir_lock.LOCK_FILE

  run = _start(workdir, *flags)
  _wait_for_step(run, 5)
  run.send_signal(signal.SIGKILL)
  assert _finish(run)[0] == -signal.SIGKILL
  stale = json.loads(lock_file.read_text())
  assert stale["pid"] == run.pid                  # The record outlives the process...

  run = _start(workdir, *flags)
  log = _wait_for_step(run, 25)                   # ...the lock does not.
  assert "resumed from step" in log, log[-3000:]
  assert json.loads(lock_file.read_text())["pid"] == run.pid
  run.send_signal(signal.SIGSEGV)                 # A crash in native code.
  assert _finish(run)[0] == -signal.SIGSEGV

  run = _start(workdir, *flags)
  log = _wait_for_step(run, 45)
  assert "resumed from step" in log, log[-3000:]
  run.send_signal(signal.SIGTERM)
  rc, out = _finish(run)
  assert rc == 0, (log + out)[-3000:]
  assert not lock_file.exists()

  rc, out = _finish(_start(workdir, *flags))
  assert rc == 0 and "resumed from step" in out, out[-3000:]
  assert not lock_file.exists()
  assert trainers.checkpointer(toy_method.get_config(), str(workdir)).latest_step() == total


def test_a_refused_config_on_a_new_workdir_leaves_no_folder(tmp_path):
  workdir = tmp_path / "new"
  rc, out = _finish(_start(workdir, "--config.train.batch_size=0"))
  assert rc == 1 and "Traceback" not in out, out[-3000:]
  assert not workdir.exists()


def test_readers_during_training_write_nothing_and_survive_keep_n(tmp_path):
  """load_run (eval, sample, probes, notebooks) and eval's records while a run saves every
  step and keeps one: every load succeeds, nothing lands in the run's metrics.jsonl."""
  workdir = tmp_path / "run"
  total = 400
  run = _start(workdir, f"--config.train.total_steps={total}", "--config.checkpoint.every=1",
               "--config.checkpoint.keep=1")
  try:
    _wait_for_step(run, 3)
    loaded = []
    for _ in range(40):
      if run.poll() is not None:
        break
      _, _, state = trainers.load_run(str(workdir))
      loaded.append(int(jax.device_get(state.step)))
      eval_lib.write_result(str(workdir), {"step": loaded[-1], "checkpoint": "latest",
                                           "evals": {}, "metrics": {"probe": 1.0}})
    assert run.poll() is None, "the run ended before the readers did: make it longer"
  finally:
    run.send_signal(signal.SIGTERM)
  rc, out = _finish(run)
  assert rc == 0, out[-3000:]
  assert len(loaded) == 40 and loaded == sorted(loaded), loaded
  steps = _steps_logged(workdir)
  assert steps == list(range(1, len(steps) + 1))              # Training records alone.
  records = logs.read_metrics(str(workdir), eval_lib.METRICS_FILE)
  assert [r["step"] for r in records] == loaded
  assert not (workdir / "checkpoints_damaged").exists()


def test_a_reader_moves_no_damaged_step(tmp_path):
  """A step that cannot be read is reported to a reader; only the lock holder moves it."""
  workdir = tmp_path / "run"
  rc, out = _finish(_start(workdir, "--config.train.total_steps=4"))
  assert rc == 0, out[-3000:]
  state_dir = workdir / "checkpoints" / "4" / "state"
  for root, _, files in os.walk(state_dir):
    for name in files:
      if name != "_METADATA" and not name.startswith("_CHECKPOINT"):
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(0)
  before = snapshot.tree(workdir)
  with pytest.raises(Exception):
    trainers.load_run(str(workdir))
  assert snapshot.tree(workdir) == before
