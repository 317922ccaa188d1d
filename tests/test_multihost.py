"""Several processes, other device counts: the demo GAN trains and resumes alike.

2 local processes x 2 CPU devices (jax.distributed with a localhost coordinator, as
launch/local_multiprocess.sh) train configs/demo.py:tiny for 4 iterations and end
with the TrainState of 1 process x 4 devices fed the same global batches. Each
process reads its own disjoint shard of the training split (data/pipeline.py), so
the single-process reference reads both shards and lays them out as the 2-process
job's global arrays are. Only process 0 writes metrics, TensorBoard events and
sample sheets; every process saves its pipeline position in the checkpoint.
Resume: 2 processes -> 1 (the run says the pipeline position cannot be carried
over), 8 -> 1 and 1 -> 4 devices (exact positions; the state matches an
uninterrupted run on the first device count). Faults: SIGTERM to one process stops all at the same step
with a checkpoint; a crashed or hung process fails the job by a timeout, and
the other one is killed.
"""
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from nda_jax import checkpoint as ckpt_lib
from nda_jax import logs
from nda_jax import parallel
from nda_jax import trainers
from nda_jax.data import pipeline
from nda_jax.trainers import loop
from test_gan_trainer import assert_states_close
from test_gan_trainer import loose_fraction
from test_gan_trainer import tiny_config
import test_moco

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
TIMEOUT_S = 600      # Both processes compile the step on 2 shared cores.
PEER_GRACE_S = 30    # How long the others may live once one process failed.
_MAKE_TRAIN_ITERATOR = pipeline.make_train_iterator   # The reference patches the module's.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_job(workdir, num_processes: int, devices_per_process: int, *flags, signal_at=None,
            config_arg: str = "configs/demo.py:tiny", entry=("-m", "nda_jax.main"),
            env_extra=None):
  """`num_processes` processes of `nda_jax.main` in one job; returns their outputs.

  Fails (killing the others) when a process exits non-zero, or when the job runs
  past TIMEOUT_S (a hung collective). `signal_at=(step, process, signal)` sends
  `signal` to that process once process 0 has logged `step`.
  """
  port = _free_port()
  procs, proc_logs = [], []
  log_dir = tempfile.mkdtemp()
  for i in range(num_processes):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    for key in ("NDA_COORDINATOR", "NDA_NUM_PROCESSES", "NDA_PROCESS_ID", "NDA_DISTRIBUTED"):
      env.pop(key, None)
    if num_processes > 1:
      env.update(NDA_COORDINATOR=f"127.0.0.1:{port}", NDA_NUM_PROCESSES=str(num_processes),
                 NDA_PROCESS_ID=str(i), NDA_INIT_TIMEOUT="120")
    env.update({k: v.format(process=i) for k, v in (env_extra or {}).items()})
    log = open(os.path.join(log_dir, f"process_{i}.log"), "w+")
    procs.append(subprocess.Popen(
        [sys.executable, *entry, f"--config={config_arg}",
         f"--workdir={workdir}", *flags], env=env, cwd=REPO, stdout=log,
        stderr=subprocess.STDOUT, text=True))
    proc_logs.append(log)
  deadline, failed_at = time.monotonic() + TIMEOUT_S, None
  while any(p.poll() is None for p in procs):
    now = time.monotonic()
    if signal_at is not None:
      with open(os.path.join(log_dir, "process_0.log")) as f:
        if f"step {signal_at[0]}/" in f.read():
          procs[signal_at[1]].send_signal(signal_at[2])
          signal_at = None
    if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
      failed_at = now
    if now > deadline or (failed_at is not None and now > failed_at + PEER_GRACE_S):
      for p in procs:
        if p.poll() is None:
          p.kill()
      break
    time.sleep(0.5)
  outputs = []
  for p, log in zip(procs, proc_logs):
    p.wait()
    log.seek(0)
    outputs.append(log.read())
    log.close()
  shutil.rmtree(log_dir)
  failed = [f"process {i} exited with {p.returncode}:\n{out[-3000:]}"
            for i, (p, out) in enumerate(zip(procs, outputs)) if p.returncode != 0]
  assert not failed, "\n".join(failed)
  return outputs


class _TwoShards:
  """The training batches of a 2-process job as one process sees them: process 0's
  and process 1's local batches side by side in every D step (the GAN's [num_d, b]
  layout), as the job's global arrays hold them."""

  def __init__(self, cfg, global_batch_size, seed, num_d_steps):
    self._shards = [_MAKE_TRAIN_ITERATOR(cfg, global_batch_size, seed, process_index=i,
                                         process_count=2) for i in range(2)]
    self._num_d = num_d_steps
    self.source = self._shards[0].source
    self.num_classes = self._shards[0].num_classes

  def __next__(self):
    local = [next(s) for s in self._shards]

    def side_by_side(key):
      parts = [b[key].reshape((self._num_d, -1) + b[key].shape[1:]) for b in local]
      joined = np.concatenate(parts, axis=1)
      return joined.reshape((-1,) + joined.shape[2:])
    return {"image": side_by_side("image"), "label": side_by_side("label")}

  def get_state(self) -> bytes:
    return json.dumps([s.get_state().decode() for s in self._shards]).encode()

  def close(self):
    for s in self._shards:
      s.close()


def test_sigterm_to_one_process_stops_all_at_one_step(tmp_path):
  """Preemption of one host: every process saves the same step and exits 0."""
  total = 40
  outputs = run_job(tmp_path / "run", 2, 2, "--config.train.num_d_steps=1",
                    f"--config.train.total_steps={total}", "--config.checkpoint.every=1000",
                    "--config.sample.every=0", signal_at=(2, 1, signal.SIGTERM))
  stopped = ckpt_lib.Checkpointer(str(tmp_path / "run")).latest_step()
  assert 2 <= stopped < total
  for out in outputs:
    assert f"stopping at step {stopped} after a signal" in out, out[-3000:]
  assert [r["step"] for r in logs.read_metrics(str(tmp_path / "run"))] == list(
      range(1, stopped + 1))


def test_no_host_sync_per_step_for_stopping(tmp_path):
  """The stop decision costs no collective and no host read per step: 2-process runs
  of 3 and 9 steps (no logs, saves or samples in between) make the same number of
  `multihost_utils` and `jax.device_get` calls (tests/count_main.py counts them).
  An allgather of the stop flag per step would add 6 to process_allgather."""
  counts = {}
  for total in (3, 9):
    out = tmp_path / f"counts_{total}"
    out.mkdir()
    run_job(tmp_path / f"run_{total}", 2, 2, "--config.train.num_d_steps=1",
            f"--config.train.total_steps={total}", "--config.checkpoint.every=1000",
            "--config.train.log_every=1000", "--config.sample.every=0",
            entry=(os.path.join("tests", "count_main.py"),),
            env_extra={"NDA_COUNT_FILE": str(out / "process_{process}.json")})
    counts[total] = [json.load(open(out / f"process_{i}.json")) for i in range(2)]
  assert counts[3] == counts[9], counts


def test_a_crashed_process_fails_the_job_quickly(tmp_path):
  """A peer killed mid-run (SIGKILL: no save) leaves the other in a collective: the
  job fails within the grace period instead of hanging."""
  start = time.monotonic()
  with pytest.raises(AssertionError, match="process 1 exited with -9"):
    run_job(tmp_path / "run", 2, 2, "--config.train.num_d_steps=1",
            "--config.train.total_steps=40", "--config.sample.every=0",
            signal_at=(2, 1, signal.SIGKILL))
  assert time.monotonic() - start < TIMEOUT_S


def config(**overrides):
  """The tiny demo with one D step per iteration (a smaller program to compile) and
  without sample sheets (they do not change the state)."""
  return tiny_config(**{"train.total_steps": STEPS, "train.num_d_steps": 1, "sample.every": 0,
                        **overrides})


def state_of(workdir):
  return trainers.load_run(str(workdir), config=config())[2]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("two_processes") / "run"
  outputs = run_job(workdir, 2, 2, "--config.train.num_d_steps=1")
  return workdir, outputs


def test_two_processes_train_like_one(two_process_run, tmp_path, monkeypatch):
  workdir, outputs = two_process_run
  assert "process 0/2, 2 local / 4 global devices" in outputs[0]
  assert "process 1/2, 2 local / 4 global devices" in outputs[1]

  c = config(max_devices=4)
  monkeypatch.setattr(pipeline, "make_train_iterator", lambda cfg, global_batch_size, seed: (
      _TwoShards(cfg, global_batch_size, seed, c.train.num_d_steps)))
  loop.train_and_evaluate(c, str(tmp_path / "reference"))
  assert_states_close(state_of(workdir), state_of(tmp_path / "reference"), steps=STEPS)

  records = logs.read_metrics(str(workdir))
  reference = logs.read_metrics(str(tmp_path / "reference"))
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))   # Process 0 only.
  for r, ref in zip(records, reference):
    for key in ("d_loss", "g_loss", "d_real", "d_nda"):
      np.testing.assert_allclose(r[key], ref[key], rtol=1e-3, atol=1e-4, err_msg=key)


def test_process_zero_writes_and_every_process_saves(two_process_run):
  workdir, _ = two_process_run
  assert len(os.listdir(workdir / "tensorboard")) == 1      # One writer: process 0's.
  assert sorted(os.listdir(workdir / "samples")) == ["step_0000002.png", "step_0000004.png"]
  assert ckpt_lib.Checkpointer(str(workdir)).all_steps() == [2, 4]
  saved = [f for f in os.listdir(workdir / "checkpoints" / "4" / "data") if f.startswith("process")]
  assert sorted(saved) == ["process_0-of-2.json", "process_1-of-2.json"]


def test_two_processes_resume_on_one(two_process_run, tmp_path, caplog):
  workdir, _ = two_process_run
  shutil.copytree(workdir, tmp_path / "run")
  with caplog.at_level(logging.INFO):
    loop.train_and_evaluate(config(**{"train.total_steps": STEPS + 2, "max_devices": 4}),
                            str(tmp_path / "run"))
  assert "resumed from step 4" in caplog.text
  assert "saved by a different number of processes" in caplog.text
  assert [r["step"] for r in logs.read_metrics(str(tmp_path / "run"))] == list(
      range(1, STEPS + 3))
  state = trainers.load_run(str(tmp_path / "run"))[2]
  assert int(state.step) == STEPS + 2


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
  """devices -> workdir of 4 uninterrupted iterations on that many devices (0: all 8)."""
  runs = {}

  def get(devices):
    if devices not in runs:
      runs[devices] = tmp_path_factory.mktemp(f"straight_{devices}")
      loop.train_and_evaluate(config(max_devices=devices), str(runs[devices]))
    return runs[devices]
  return get


@pytest.mark.parametrize("first, then", [(0, 1), (1, 4)], ids=["8_to_1", "1_to_4"])
def test_resume_on_another_device_count(straight_runs, tmp_path, first, then):
  """2 iterations on `first` devices (0: all 8), 2 more on `then`: the state of 4
  uninterrupted iterations on `first` devices, up to summation order.

  How many elements may differ beyond float tolerance is what changing the device
  count does by itself (4 iterations on `then` vs on `first` devices), not a fixed 1%:
  measured on an AMD EPYC (Zen 5), 11.0% of all elements for 1 vs 8 devices, every one
  in G's Adam first moments (b1=0: its last gradient), at most 3% of their leaf's scale
  (the 10% bound holds); 8 -> 1 resumed vs 8 straight 7.7% (on the Xeon where the 1%
  was set, this test passed under it). A resume that lost state would exceed the device
  count's own drift."""
  split = tmp_path / "split"
  loop.train_and_evaluate(config(max_devices=first, **{"train.total_steps": 2}), str(split))
  loop.train_and_evaluate(config(max_devices=then), str(split))
  assert [r["step"] for r in logs.read_metrics(str(split))] == list(range(1, STEPS + 1))
  reference = state_of(straight_runs(first))
  drift = loose_fraction(state_of(straight_runs(then)), reference)
  assert_states_close(state_of(split), reference, steps=STEPS, max_loose=max(0.01, drift))


def test_moco_two_processes_train_like_one(tmp_path, monkeypatch):
  """MoCo across hosts: BN groups spanning processes, every process's keys in the queue,
  the momentum encoder, and the kNN monitor over features sharded across processes.

  demo_moco:tiny (4 steps, kNN at step 4) on 2 processes x 2 devices == 1 process x
  4 devices fed the same global batches; tolerance as test_moco's 1-vs-8-device test
  (SGD: the states compare directly), the kNN accuracy exactly.
  """
  workdir = tmp_path / "two"
  outputs = run_job(workdir, 2, 2, "--config.checkpoint.async_save=False",
                    f"--config.moco.queue_size={test_moco.K}",
                    config_arg="configs/demo_moco.py:tiny")
  for i, out in enumerate(outputs):
    assert f"process {i}/2, 2 local / 4 global devices" in out
  c = test_moco.tiny_config(max_devices=4)
  monkeypatch.setattr(pipeline, "make_train_iterator", lambda cfg, global_batch_size, seed: (
      _TwoShards(cfg, global_batch_size, seed, num_d_steps=1)))
  meshes = []
  real_data_parallel = parallel.DataParallel
  monkeypatch.setattr(parallel, "DataParallel",
                      lambda *a, **k: meshes.append(real_data_parallel(*a, **k)) or meshes[-1])
  loop.train_and_evaluate(c, str(tmp_path / "reference"))
  assert meshes and meshes[0].num_devices == 4   # The loop's; evaluators may add others.

  two, one = (trainers.load_run(str(w), config=c)[2] for w in (workdir, tmp_path / "reference"))
  assert int(two.step) == int(one.step) == c.train.total_steps
  test_moco.assert_leaves_close(two, one)
  knn = [[r["knn_top1"] for r in logs.read_metrics(str(w)) if "knn_top1" in r]
         for w in (workdir, tmp_path / "reference")]
  assert len(knn[0]) == 1 and knn[0] == knn[1], knn
