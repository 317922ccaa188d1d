"""The NDA-GAN method: device-count invariance, shard_map == pmap, exact resume through the loop."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from nda_jax import checkpoint as ckpt_lib
from nda_jax import logs
from nda_jax import parallel
from nda_jax import trainers
from nda_jax.trainers import gan
from nda_jax.trainers import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  import importlib.util
  spec = importlib.util.spec_from_file_location("demo", os.path.join(REPO, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.checkpoint.async_save = False
  config.update_from_flattened_dict(overrides)
  return config


def run_iterations(config, num: int, kind="shard_map", max_devices=0):
  """`num` iterations on a fixed host batch stream; returns the canonical state."""
  dp = parallel.DataParallel(kind, max_devices)
  method = gan.GAN(config)
  state = dp.put_state(method.init_state(jax.random.PRNGKey(0)))
  step = dp.step(method.make_step(), batch_axis=1)
  rng = np.random.RandomState(0)
  b, nd, s = config.train.batch_size, config.train.num_d_steps, config.data.image_size
  for _ in range(num):
    batch = {"image": rng.randint(0, 256, (nd, b, s, s, 3)).astype(np.uint8),
             "label": rng.randint(0, 10, (nd, b)).astype(np.int32)}
    state, metrics = step(state, dp.shard_batch(batch, batch_axis=1))
    jax.block_until_ready(metrics)
  return jax.device_get(dp.get_state(state)), dp.unreplicate_metrics(metrics)


def assert_states_close(a, b, steps=1, lr=2e-4, rtol=2e-4, atol=2e-5, max_loose=0.01):
  """Two runs that sum in a different order give the same TrainState.

  Adam with b1=0 moves every parameter by about ±lr per step whatever the
  gradient's size, so a parameter whose gradient is at round-off level (G's
  biases before a BatchNorm have an exactly zero one) may step the other way,
  and later gradients (Adam's moments) move with it. So: every parameter and
  statistic agrees to 2.5·lr per step, every moment to 10% of its leaf's
  scale, and all but 1% of all elements to float tolerance (for moments, i.e.
  gradients, relative to the leaf's scale: sums over the batch cancel, and
  per-device partial sums round differently). Adam being scale-invariant,
  the gradient norms in the metrics (compared separately) catch a wrongly
  scaled gradient.
  """
  flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for (path, x), y in zip(flat_a, flat_b):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    name = jax.tree_util.keystr(path)
    scale = np.max(np.abs(y)) if y.size else 0.0
    bound = 0.1 * scale if "_opt" in name else 2.5 * lr * steps
    np.testing.assert_allclose(x, y, rtol=0, atol=bound + atol, err_msg=name)
  loose = loose_fraction(a, b, rtol, atol)
  assert loose <= max_loose, f"{loose:.4f} of the elements differ beyond float tolerance"


def loose_fraction(a, b, rtol=2e-4, atol=2e-5) -> float:
  """The share of all elements of two TrainStates beyond float tolerance (moments
  relative to their leaf's scale), as assert_states_close counts them."""
  loose, total = 0, 0
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = np.max(np.abs(y)) if y.size else 0.0
    tight = max(atol, 1e-3 * scale) if "_opt" in jax.tree_util.keystr(path) else atol
    loose += int(np.sum(~np.isclose(x, y, rtol=rtol, atol=tight)))
    total += x.size
  return loose / total


def assert_metrics_close(a: dict, b: dict, rtol=1e-3):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=1e-5, err_msg=k)


@pytest.fixture(scope="module")
def eight_device_run():
  return run_iterations(tiny_config(), 1)


def test_one_device_equals_eight_devices(eight_device_run):
  assert jax.device_count() == 8
  one, one_metrics = run_iterations(tiny_config(), 1, max_devices=1)
  eight, eight_metrics = eight_device_run
  assert_states_close(one, eight)
  assert_metrics_close(one_metrics, eight_metrics)


def test_one_device_equals_eight_devices_in_float64():
  """In float64 the reordered sums agree to FLOAT64_TOL (bench/device_drift.py, demo:tiny:
  every moment and parameter <= 1.5e-14 of its scale, metrics <= 1.5e-15), except the
  moments of G's conv biases before a BatchNorm: their exact gradient is 0, so both runs
  hold round-off (float32: ~2e-6, above Adam's eps, hence assert_states_close's ±lr steps;
  float64: so far below eps that the parameters agree, <= 6.8e-7 lr)."""
  from test_moco import FLOAT64_TOL, rel, step_in_float64
  config = tiny_config()
  method = gan.GAN(config)
  init = jax.device_get(method.init_state(jax.random.PRNGKey(0)))
  rng = np.random.RandomState(0)
  b, nd, s = config.train.batch_size, config.train.num_d_steps, config.data.image_size
  batch = {"image": rng.randint(0, 256, (nd, b, s, s, 3)).astype(np.uint8),
           "label": rng.randint(0, 10, (nd, b)).astype(np.int32)}
  (one, m1), (eight, m8) = (step_in_float64(method, n, init, batch, batch_axis=1)
                            for n in (1, 8))
  g_scale = max(np.abs(x).max() for x in jax.tree.leaves(one.g_opt) if np.ndim(x))
  round_off = 0
  for (path, x1), x8 in zip(jax.tree_util.tree_leaves_with_path(one), jax.tree.leaves(eight)):
    x1, x8, name = np.asarray(x1), np.asarray(x8), jax.tree_util.keystr(path)
    if not np.issubdtype(x1.dtype, np.floating):
      continue
    assert x1.dtype == x8.dtype == np.float64, name
    if name.endswith("['bias']") and "conv" in name and rel(x8, x1) > FLOAT64_TOL:
      if name.startswith(".g_opt"):   # round-off moments
        assert max(np.abs(x1).max(), np.abs(x8).max()) <= 1e-12 * g_scale, name
      else:                           # their steps (G, its EMA): 10x the measured
        assert np.abs(x8 - x1).max() <= 1e-5 * config.optim.g.lr, name
      round_off += 1
    else:
      assert rel(x8, x1) <= FLOAT64_TOL, (name, rel(x8, x1))
  assert round_off <= 24, round_off   # 6 biases x (mu, nu, G, EMA)
  for k in m1:
    assert rel(m8[k], m1[k]) <= FLOAT64_TOL, k


def test_shard_map_equals_pmap(eight_device_run):
  pmapped, pmap_metrics = run_iterations(tiny_config(), 1, kind="pmap")
  eight, eight_metrics = eight_device_run
  assert_states_close(pmapped, eight)
  assert_metrics_close(pmap_metrics, eight_metrics)


def test_unrolled_d_steps_equal_the_loop():
  """config.train.d_steps_lowering changes how lax.scan is lowered, not the result."""
  config = tiny_config()
  looped_config = tiny_config(**{"train.d_steps_lowering": "loop"})
  assert config.train.d_steps_lowering == "auto" and gan.unroll_d_steps(config)   # on CPU
  state = gan.GAN(config).init_state(jax.random.PRNGKey(0))
  nd, b, s = config.train.num_d_steps, config.train.batch_size, config.data.image_size
  batch = {"image": np.zeros((nd, b, s, s, 3), np.uint8), "label": np.zeros((nd, b), np.int32)}
  for c, unroll in ((config, nd), (looped_config, 1)):
    jaxpr = jax.make_jaxpr(gan.GAN(c).make_step(), axis_env=[(parallel.AXIS, 1)])(state, batch)
    d_steps = [e for e in jaxpr.eqns if e.primitive.name == "scan"][0]   # the first one
    assert d_steps.params["length"] == nd and d_steps.params["unroll"] == unroll
  unrolled, unrolled_metrics = run_iterations(config, 2, max_devices=1)
  looped, looped_metrics = run_iterations(looped_config, 2, max_devices=1)
  assert_states_close(unrolled, looped, steps=2)
  assert_metrics_close(unrolled_metrics, looped_metrics)


def test_iteration_updates_and_reports(eight_device_run):
  state, metrics = eight_device_run
  fresh = gan.GAN(tiny_config()).init_state(jax.random.PRNGKey(0))
  assert int(state.step) == 1
  for name in ("g_params", "d_params"):
    moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(getattr(state, name)),
                                                   jax.tree.leaves(getattr(fresh, name)))]
    assert all(moved), name
  for key in ("d_loss", "g_loss", "d_loss_real", "d_loss_fake", "d_loss_nda", "d_real", "d_fake",
              "d_nda", "d_grad_norm", "g_grad_norm"):
    assert np.isfinite(metrics[key]), key
  # Before ema_start the EMA is an exact copy of G (params and statistics).
  for a, b in zip(jax.tree.leaves((state.ema_params, state.ema_stats)),
                  jax.tree.leaves((state.g_params, state.g_stats))):
    np.testing.assert_array_equal(a, b)


def test_ema_after_start_is_the_decayed_average():
  config = tiny_config(**{"train.ema_start": 0, "train.ema_decay": 0.5})
  one, _ = run_iterations(config, 1)
  fresh = gan.GAN(config).init_state(jax.random.PRNGKey(0))
  expected = jax.tree.map(lambda e, g: 0.5 * e + 0.5 * g, fresh.ema_params, one.g_params)
  for a, b in zip(jax.tree.leaves(one.ema_params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_beta_zero_ignores_nda_images():
  """With beta=0 the NDA batch cannot influence training (baseline BigGAN)."""
  jig = run_iterations(tiny_config(**{"loss.alpha": 1.0, "loss.beta": 0.0}), 1)[0]
  cut = run_iterations(tiny_config(**{"loss.alpha": 1.0, "loss.beta": 0.0,
                                      "nda.name": "cutout"}), 1)[0]
  for a, b in zip(jax.tree.leaves(jig.d_params), jax.tree.leaves(cut.d_params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # (tests/test_losses.py shows that beta > 0 does change D's gradients.)


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


def test_resume_is_exact(tmp_path):
  """4 iterations straight == 2 iterations, restart from the checkpoint, 2 more."""
  straight = tiny_config(**{"train.total_steps": 4, "sample.every": 0})
  loop.train_and_evaluate(straight, str(tmp_path / "straight"))
  split_dir = str(tmp_path / "split")
  loop.train_and_evaluate(tiny_config(**{"train.total_steps": 2, "sample.every": 0}), split_dir)
  assert ckpt_lib.Checkpointer(split_dir).latest_step() == 2
  loop.train_and_evaluate(straight, split_dir)
  # The second run started at step 3 (it resumed), logging every step.
  assert [r["step"] for r in logs.read_metrics(split_dir)] == [1, 2, 3, 4]
  a = trainers.load_run(str(tmp_path / "straight"), config=straight)[2]
  b = trainers.load_run(split_dir, config=straight)[2]
  assert int(a.step) == int(b.step) == 4
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_main_writes_checkpoint_metrics_samples_and_config(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run(
      [sys.executable, "-m", "nda_jax.main", f"--config={REPO}/configs/demo.py:tiny",
       f"--workdir={workdir}", "--config.checkpoint.async_save=False"],
      capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  assert all(np.isfinite(r["d_loss"]) and r["img_per_sec"] > 0 for r in records)
  assert sorted(os.listdir(workdir / "samples")) == ["step_0000002.png", "step_0000004.png"]
  assert ckpt_lib.Checkpointer(str(workdir)).latest_step() == 4
  assert json.load(open(workdir / "config.json"))["nda"]["name"] == "jigsaw"
  assert os.listdir(workdir / "tensorboard")
  assert "img/s" in proc.stderr and "ETA" in proc.stderr


@pytest.mark.parametrize("override, message", [
    ("--config.nda.name=jigsawz", "jigsaw"),
    ("--config.nda_typo=1", "nda_typo"),
    ("--config.parallel=tpu", "shard_map"),
    ("--config.train.d_steps_lowering=unrolled", "'unroll', 'loop'"),
])
def test_bad_config_gives_a_clear_error(tmp_path, override, message):
  proc = subprocess.run(
      [sys.executable, "-m", "nda_jax.main", f"--config={REPO}/configs/demo.py:tiny",
       f"--workdir={tmp_path}", override], capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode != 0
  assert message in proc.stderr


def test_bad_config_variant_names_the_choices():
  from configs import common as configs_common
  with pytest.raises(ValueError, match="baseline"):
    configs_common.parse_variants("cond,bogus", ("cond", "baseline"))
