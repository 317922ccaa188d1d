"""Runs on a bucket, for real: `nda_jax.main` (tests/toy_main.py, the toy method)
as subprocesses with --workdir=gs://... on the fake-gcs-server of
tests/gcs_server.py. One uninterrupted run is shared as the reference."""
import os
import signal
import subprocess
import sys

from etils import epath
import pytest

from nda_jax import checkpoint as ckpt_lib
from nda_jax.trainers import common

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
FLAGS = ["--config.train.total_steps=12", "--config.checkpoint.every=2"]


def _main(workdir, *flags, wait_for=None, send=None, timeout=240):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  cmd = [sys.executable, os.path.join(TESTS, "toy_main.py"), f"--workdir={workdir}",
         *FLAGS, *flags]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, cwd=REPO)
  lines = []
  try:
    if wait_for is not None:
      for line in proc.stdout:
        lines.append(line)
        if f"step {wait_for}/" in line:
          proc.send_signal(send)
          break
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  return proc.returncode, "".join(lines) + out


def _losses(workdir):
  return {r["step"]: r["loss"] for r in common.read_metrics(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def straight(gcs_bucket):
  workdir = f"{gcs_bucket}/runs/straight"
  rc, out = _main(workdir)
  assert rc == 0, out[-3000:]
  return workdir


def test_trains_on_bucket(straight):
  steps = [r["step"] for r in common.read_metrics(straight) if "loss" in r]
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
