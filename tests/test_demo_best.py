"""keep_best on the demo itself: configs/demo.py:tiny trained 10 steps with the demo's own
fd_digits evaluator (fewer samples) at every checkpoint and keep=1, so the step with the
lowest fd_digits survives only if keep-best keeps it; then `--checkpoint=best` in eval,
sample and the notebook loads that step.

One run is shared by every test (tests/toy_eval.py's bucket run covers a toy method).
"""
import importlib.util
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

import notebook_runs
from nda_jax import eval as eval_lib
from nda_jax import logs
from nda_jax import sample as sample_lib
from nda_jax import trainers
from nda_jax import visualize
from nda_jax.trainers import gan
from nda_jax.trainers import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10


def demo_config():
  """demo:tiny with the demo's fd_digits entry (its only evaluator here) at every checkpoint
  (100 samples) and keep=1."""
  spec = importlib.util.spec_from_file_location("demo", os.path.join(REPO, "configs", "demo.py"))
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  config = demo.get_config("tiny")
  config.evals = ml_collections.ConfigDict({"fd_digits": demo.get_config().evals.fd_digits})
  config.evals.fd_digits.update(every=2, num_samples=100, sample_batch_size=16)
  config.train.total_steps = STEPS
  config.checkpoint.update(every=2, keep=1, async_save=False)
  assert (config.checkpoint.keep_best, config.checkpoint.best_metric,
          config.checkpoint.best_mode) == (1, "fd_digits", "min")   # The demo's own.
  return config


@pytest.fixture(scope="module")
def env():
  cache = os.environ.get("NDA_JAX_CACHE") or os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                          "nda_jax_test_cache")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("NDA_JAX_CACHE", cache)      # The fd_digits classifier, trained once a machine.
    yield dict(os.environ)


@pytest.fixture(scope="module")
def best_run(tmp_path_factory, env):
  """(workdir, best step, {step: fd_digits}) read back from metrics.jsonl."""
  del env
  workdir = str(tmp_path_factory.mktemp("demo_best"))
  loop.train_and_evaluate(demo_config(), workdir)
  scores = {r["step"]: r["fd_digits"] for r in logs.read_metrics(workdir) if "fd_digits" in r}
  assert sorted(scores) == list(range(2, STEPS + 1, 2)), scores
  best = min(scores, key=lambda s: (scores[s], -s))        # Ties: the later step.
  # The test's premise: the metric goes up and down, and the best is not the latest.
  diffs = np.diff([scores[s] for s in sorted(scores)])
  assert (diffs > 0).any() and (diffs < 0).any(), scores
  assert best < STEPS, scores
  return workdir, best, scores


def test_keep_best_keeps_the_lowest_fd_digits_step(best_run):
  workdir, best, scores = best_run
  kept = sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())
  assert kept == sorted({best, STEPS}), scores     # keep=1 deleted every other step.
  _, _, state = trainers.load_run(workdir, "best")
  assert int(state.step) == best


def _cli(module, *args, env):
  proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        env=env, cwd=REPO, timeout=600)
  return proc.returncode, proc.stdout + proc.stderr


def test_eval_best_reproduces_the_logged_fd_digits(best_run, env):
  workdir, best, scores = best_run
  rc, out = _cli("nda_jax.eval", f"--workdir={workdir}", "--checkpoint=best",
                 "--only=fd_digits", env=env)
  assert rc == 0, out[-3000:]
  assert f"checkpoint best (step {best})" in out, out[-3000:]
  with open(os.path.join(workdir, "eval.json")) as f:
    result = json.load(f)
  assert (result["step"], result["checkpoint"]) == (best, "best")
  # The same evaluator on the same state as training ran it at that step.
  assert result["metrics"]["fd_digits"] == pytest.approx(scores[best], rel=1e-4)
  records = logs.read_metrics(workdir, eval_lib.METRICS_FILE)
  assert [r["step"] for r in records] == [best]


def test_sample_best_draws_from_the_best_step(best_run, env, tmp_path):
  workdir, best, _ = best_run
  out = tmp_path / "best.npz"
  rc, log = _cli("nda_jax.sample", f"--workdir={workdir}", "--checkpoint=best", "--num=8",
                 f"--out={out}", env=env)
  assert rc == 0, log[-3000:]
  with np.load(out) as f:
    images, z, y = f["images"], f["latents"], f["labels"]
  expected = {}
  for which in ("best", "latest"):
    config, _, state = trainers.load_run(workdir, which)
    want_z, want_y = sample_lib.latents_and_labels(config, 8, 0)
    np.testing.assert_array_equal(z, want_z)
    np.testing.assert_array_equal(y, want_y)
    expected[which] = visualize.to_uint8(gan.sample_in_batches(
        gan.make_sampler(config, ema=True), state, want_z, want_y, 64))
  assert np.abs(images.astype(int) - expected["best"].astype(int)).max() <= 1
  assert np.abs(expected["latest"].astype(int) - expected["best"].astype(int)).max() > 8


def test_notebook_loads_the_best_step(best_run, monkeypatch):
  workdir, best, _ = best_run
  monkeypatch.setenv("NDA_WORKDIR", workdir)
  monkeypatch.setenv("NDA_CHECKPOINT", "best")
  outputs = notebook_runs.run("explore_checkpoint.ipynb")
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs)
  assert f"step {best}:" in text, text
