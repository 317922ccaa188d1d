"""Tools around a checkpoint: the eval CLI, sample sheets, the plot tool, the notebook.

One tiny demo run (2 iterations of configs/demo.py:tiny) is shared by every test.
"""
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import pytest
from PIL import Image

from nda_jax import cli
from nda_jax import config_lib
from nda_jax import eval as eval_lib
from nda_jax import evaluators
from nda_jax import logs
from nda_jax import parallel
from nda_jax import trainers
from nda_jax.tools import plot as plot_tool
from nda_jax.tools import sample_sheets
from nda_jax.trainers import gan
from nda_jax.trainers import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "explore_checkpoint.ipynb")
STEPS = 2


def tiny_config() -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location("demo", os.path.join(REPO, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.checkpoint.async_save = False
  config.train.total_steps = STEPS
  return config


def eval_entries() -> ml_collections.ConfigDict:
  """What the run's config lists for `nda_jax.eval`: fd_digits and anomaly, both small."""
  fd = evaluators.default_config("sample_quality")
  fd.update({"metrics": ("fd_digits",), "num_samples": 100, "sample_batch_size": 16,
             "batch_size": 64})
  ood = evaluators.default_config("anomaly")
  ood.update({"batch_size": 64, "max_examples": 128})
  return ml_collections.ConfigDict({"fd_digits": fd, "anomaly": ood})


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> str:
  """A workdir as `python -m nda_jax.main` leaves it: config.json, checkpoints, metrics.

  Its config.json lists two evaluators; training ran without them (they would
  run at its end), which keeps this fixture fast.
  """
  workdir = str(tmp_path_factory.mktemp("demo_run"))
  config = tiny_config()
  loop.train_and_evaluate(config, workdir)
  config.evals = eval_entries()
  config_lib.write_config(config, workdir)
  return workdir


@pytest.fixture
def classifier_cache(monkeypatch) -> dict[str, str]:
  """The fd_digits classifier is deterministic per its TrainConfig: train it once per machine."""
  cache = os.environ.get("NDA_JAX_CACHE") or os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                          "nda_jax_test_cache")
  monkeypatch.setenv("NDA_JAX_CACHE", cache)
  return dict(os.environ)


def _eval_cli(*args: str, env: dict[str, str], timeout: int = 600):
  return subprocess.run([sys.executable, "-m", "nda_jax.eval", *args], capture_output=True,
                        text=True, env=env, timeout=timeout)


# ------------------------------------------------------------------ eval CLI
def test_eval_cli_writes_metrics(demo_run, classifier_cache):
  num, max_examples = 64, 48
  proc = _eval_cli(f"--workdir={demo_run}", "--only=fd_digits,anomaly",
                   f"--config.evals.fd_digits.num_samples={num}",
                   f"--config.evals.anomaly.max_examples={max_examples}", env=classifier_cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(demo_run, "eval.json")) as f:
    result = json.load(f)
  assert set(result) == {"step", "checkpoint", "evals", "metrics"}
  assert (result["step"], result["checkpoint"]) == (STEPS, "latest")
  assert set(result["evals"]) == {"fd_digits", "anomaly"}
  assert result["evals"]["fd_digits"]["num_samples"] == num          # the override, reported
  assert result["evals"]["fd_digits"]["sample_batch_size"] == 16     # the run's own value
  metrics = result["metrics"]
  # No OOD set configured: the run's NDA (jigsaw) and the synthetic sets.
  aurocs = {"anomaly/nda/jigsaw", "anomaly/synthetic/photo_patches",
            "anomaly/synthetic/uniform_noise"}
  assert set(metrics) == {"fd_digits"} | aurocs
  assert all(math.isfinite(v) for v in metrics.values()), metrics
  assert metrics["fd_digits"] > 0
  assert all(0.0 <= metrics[k] <= 1.0 for k in aurocs), metrics
  with open(os.path.join(demo_run, "anomaly", "anomaly.json")) as f:
    table = json.load(f)
  assert table["in_distribution"]["n"] == max_examples              # the override, used
  assert {r["set"] for r in table["rows"]} == {k.split("/", 1)[1] for k in aurocs}
  assert {r["n_ood"] for r in table["rows"]} == {max_examples}
  # Its own record and TensorBoard folder at the checkpoint's step; the run's log untouched.
  last = logs.read_metrics(demo_run, eval_lib.METRICS_FILE)[-1]
  assert last == {"step": STEPS, **{"eval/" + k: v for k, v in metrics.items()}}
  assert not any("eval/" + k in r for r in logs.read_metrics(demo_run) for k in metrics)
  assert os.listdir(os.path.join(demo_run, "tensorboard", "eval"))
  assert "fd_digits" in proc.stdout and "anomaly/nda/jigsaw" in proc.stdout


@pytest.fixture
def run_without_anomaly(demo_run, tmp_path) -> str:
  """A copy of the demo run whose config declares fd_digits only (as the README's demo run)."""
  workdir = str(tmp_path / "run")
  shutil.copytree(demo_run, workdir, ignore=shutil.ignore_patterns("eval*", "anomaly"))
  config = config_lib.load_config(workdir)
  del config.evals["anomaly"]
  config_lib.write_config(config, workdir)
  return workdir


def test_eval_add_runs_a_registered_evaluator_the_run_lacks(run_without_anomaly,
                                                            classifier_cache):
  workdir = run_without_anomaly
  with open(os.path.join(workdir, "config.json"), "rb") as f:
    config_bytes = f.read()
  proc = _eval_cli(f"--workdir={workdir}", "--add=anomaly",
                   "--config.evals.anomaly.max_examples=48",
                   "--config.evals.anomaly.ndas=('jigsaw', 'cutout')", env=classifier_cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "eval.json")) as f:
    result = json.load(f)
  # Only the added evaluator ran, with the type's declared defaults and the overrides.
  want = evaluators.default_config("anomaly").to_dict()
  want.update(max_examples=48, ndas=["jigsaw", "cutout"])
  assert result["evals"] == {"anomaly": json.loads(json.dumps(want))}
  assert set(result["metrics"]) == {"anomaly/nda/jigsaw", "anomaly/nda/cutout"}
  assert all(0.0 <= v <= 1.0 for v in result["metrics"].values()), result
  with open(os.path.join(workdir, "anomaly", "anomaly.json")) as f:
    rows = {r["set"]: r for r in json.load(f)["rows"]}
  assert {k: rows[k.split("/", 1)[1]]["auroc"] for k in result["metrics"]} == result["metrics"]
  assert logs.read_metrics(workdir, eval_lib.METRICS_FILE)[-1] == {
      "step": STEPS, **{"eval/" + k: v for k, v in result["metrics"].items()}}
  with open(os.path.join(workdir, "config.json"), "rb") as f:
    assert f.read() == config_bytes                  # the run's config is not changed


def test_eval_add_of_a_declared_evaluator_runs_it_as_declared(demo_run, tmp_path,
                                                              classifier_cache):
  workdir = str(tmp_path / "run")
  shutil.copytree(demo_run, workdir, ignore=shutil.ignore_patterns("eval*", "anomaly"))
  proc = _eval_cli(f"--workdir={workdir}", "--add=anomaly",
                   "--config.evals.anomaly.synthetic=('uniform_noise',)", env=classifier_cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert ("nda_jax.eval: --add=anomaly: the run's config declares evals.anomaly; it runs as "
          "declared (as --only=anomaly would)") in proc.stderr
  with open(os.path.join(workdir, "eval.json")) as f:
    result = json.load(f)
  assert set(result["evals"]) == {"anomaly"}                     # not fd_digits
  assert result["evals"]["anomaly"]["max_examples"] == eval_entries().anomaly.max_examples
  assert set(result["metrics"]) == {"anomaly/synthetic/uniform_noise"}


def test_eval_add_of_an_unknown_type_is_one_paragraph(run_without_anomaly, classifier_cache):
  before = sorted(os.listdir(run_without_anomaly))
  proc = _eval_cli(f"--workdir={run_without_anomaly}", "--add=anomly", env=classifier_cache,
                   timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip() == (
      "nda_jax.eval: error: --add=anomly: not a registered evaluator type (did you mean "
      f"'anomaly'?); registered: {sorted(evaluators.REGISTRY)} (evaluators/__init__.py)")
  assert sorted(os.listdir(run_without_anomaly)) == before
  with pytest.raises(ValueError, match="needs \\['embed_fn'\\]; trainer 'gan' provides"):
    eval_lib.prepare(run_without_anomaly, add=["knn"])


def test_eval_cli_rejects_undeclared_keys_in_one_line(demo_run, classifier_cache):
  proc = _eval_cli(f"--workdir={demo_run}", "--config.evals.fd_digits.num_sampels=10",
                   env=classifier_cache, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      "nda_jax.eval: error: --config.evals.fd_digits.num_sampels: config.evals.fd_digits has "
      "no key 'num_sampels' (did you mean --config.evals.fd_digits.num_samples?); its keys: " +
      str(sorted(eval_entries().fd_digits)))
  assert "Traceback" not in proc.stderr
  proc = _eval_cli(f"--workdir={demo_run}", "--set=eval.num_samples=10", env=classifier_cache,
                   timeout=300)
  assert proc.returncode != 0 and "Unknown command line flag 'set'" in proc.stderr


def test_eval_cli_best_without_metrics_is_a_clear_error(demo_run, classifier_cache):
  proc = _eval_cli(f"--workdir={demo_run}", "--checkpoint=best", "--only=fd_digits",
                   env=classifier_cache, timeout=300)
  assert proc.returncode != 0
  assert "nda_jax.eval: error: no checkpoint in" in proc.stderr
  assert "'fd_digits' metric; use 'latest' or one of the steps [2]" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_config_overrides_are_declared_typed_and_used(demo_run, classifier_cache):
  config = eval_lib.parse_config(demo_run, [
      "--config.evals.fd_digits.num_samples=40", "--config.evals.fd_digits.sample_batch_size=16",
      "--config.evals.anomaly.synthetic=('uniform_noise',)", "--config.data.data_dir=/elsewhere"])
  assert config.evals.fd_digits.num_samples == 40
  assert config.evals.anomaly.synthetic == ("uniform_noise",)
  assert config.data.data_dir == "/elsewhere"       # None in config.json, still settable
  assert config.evals.fd_digits.batch_size == eval_entries().fd_digits.batch_size
  evaluation = eval_lib.prepare(demo_run, only=["fd_digits"], config=config)
  calls = []
  sample_fn = evaluation.fns["sample_fn"]

  def counting(rng, n):
    calls.append(n)
    return sample_fn(rng, n)
  evaluation.fns["sample_fn"] = counting
  result = eval_lib.run(evaluation)
  assert calls == [16, 16, 8]                       # num_samples=40 in calls of 16
  assert set(result["metrics"]) == {"fd_digits"} and result["metrics"]["fd_digits"] > 0
  assert result["evals"] == {"fd_digits": json.loads(json.dumps(config.evals.fd_digits.to_dict()))}


@pytest.mark.parametrize("override, match", [
    ("--config.evals.fd_digits.num_sampels=10",
     r"config.evals.fd_digits has no key 'num_sampels' "
     r"\(did you mean --config.evals.fd_digits.num_samples\?\)"),
    ("--config.evals.fd_digit.num_samples=10",
     r"config.evals has no key 'fd_digit' \(did you mean --config.evals.fd_digits.num_samples\?\)"),
    ("--config.evals.fd_digits.num_samples.x=1", "config.evals.fd_digits.num_samples is a int"),
    ("--config.evals.fd_digits.num_samples=many", "invalid literal for int"),
])
def test_config_override_errors(demo_run, override, match):
  with pytest.raises(ValueError, match=match):
    eval_lib.parse_config(demo_run, [override])


def test_workdir_is_read_before_the_flags():
  argv = ["eval", "--checkpoint=best", "--workdir", "/runs/a", "--config.evals.x.k=1"]
  assert cli.flag_value(argv, "workdir") == "/runs/a"
  assert cli.flag_value(["eval", "--workdir=/runs/b"], "workdir") == "/runs/b"
  assert cli.flag_value(["eval", "--only=x"], "workdir") is None
  assert cli.flag_value(["eval", "--add=knn", "--add", "anomaly"], "add") == "anomaly"   # as absl


@pytest.mark.parametrize("kwargs, error, match", [
    ({"workdir": "/nonexistent/run"}, FileNotFoundError, "does not exist"),
    ({"only": ["fd_digits", "anomaly", "fid"]}, ValueError,
     r"no evaluator 'fid' in the run's config.evals; configured: \['anomaly', 'fd_digits'\]"),
    ({"only": []}, ValueError, "nothing to evaluate"),
    ({"checkpoint": "3"}, ValueError, r"step 3 not in .*kept steps: \[2\]"),
    ({"checkpoint": "best"}, ValueError, "has a 'fd_digits' metric"),
])
def test_eval_setup_errors(demo_run, kwargs, error, match):
  kwargs = {"workdir": demo_run, "only": ["fd_digits"], **kwargs}
  with pytest.raises(error, match=match):
    eval_lib.prepare(**kwargs)


def test_sharded_scorer_equals_one_device_scorer(demo_run):
  config, _, state = trainers.load_run(demo_run, "latest")
  dp = parallel.DataParallel()
  assert dp.num_devices == 8
  rng = np.random.RandomState(0)
  size = config.data.image_size
  images = rng.uniform(-1, 1, (16, size, size, 3)).astype(np.float32)
  labels = (np.arange(16) % 10).astype(np.int32)
  expected = np.asarray(gan.make_scorer(config)(state, images, labels))
  split = NamedSharding(dp.mesh, P(parallel.AXIS))
  scores = gan.make_scorer(config, dp)(
      dp.put_state(state), jax.device_put(images, split), jax.device_put(labels, split))
  assert scores.shape == (16,)
  np.testing.assert_allclose(np.asarray(scores), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ interpolation math
def _rotation_reference(z0, z1, t):
  """Great-circle point at angle t*omega built from an orthonormal basis of span(z0, z1)."""
  u0 = z0 / np.linalg.norm(z0)
  v = z1 / np.linalg.norm(z1) - (u0 @ z1 / np.linalg.norm(z1)) * u0
  v /= np.linalg.norm(v)
  omega = np.arccos(np.clip(u0 @ z1 / np.linalg.norm(z1), -1, 1))
  radius = (1 - t) * np.linalg.norm(z0) + t * np.linalg.norm(z1)
  return radius * (np.cos(t * omega) * u0 + np.sin(t * omega) * v)


def test_slerp_endpoints_norms_and_great_circle():
  rng = np.random.RandomState(0)
  z0, z1 = rng.standard_normal(32), 1.7 * rng.standard_normal(32)
  steps = 7
  path = sample_sheets.interpolation_latents(z0, z1, steps, "slerp")
  assert path.shape == (steps, 32) and path.dtype == np.float32
  np.testing.assert_allclose(path[0], z0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(path[-1], z1, rtol=1e-5, atol=1e-6)
  t = np.linspace(0, 1, steps)
  np.testing.assert_allclose(np.linalg.norm(path, axis=1),
                             (1 - t) * np.linalg.norm(z0) + t * np.linalg.norm(z1), rtol=1e-5)
  for ti, point in zip(t, path):
    np.testing.assert_allclose(point, _rotation_reference(z0, z1, ti), rtol=1e-4, atol=1e-5)
  # Constant angular speed between neighbours.
  unit = path / np.linalg.norm(path, axis=1, keepdims=True)
  angles = np.arccos(np.clip(np.sum(unit[1:] * unit[:-1], axis=1), -1, 1))
  np.testing.assert_allclose(angles, angles[0], rtol=1e-3)


def test_slerp_equal_norms_is_shoemake_and_linear_is_linear():
  rng = np.random.RandomState(1)
  z0, z1 = rng.standard_normal(8), rng.standard_normal(8)
  z1 *= np.linalg.norm(z0) / np.linalg.norm(z1)
  omega = np.arccos(z0 @ z1 / (z0 @ z0))
  t = 0.3
  shoemake = (np.sin((1 - t) * omega) * z0 + np.sin(t * omega) * z1) / np.sin(omega)
  path = sample_sheets.interpolation_latents(z0, z1, 11, "slerp")
  np.testing.assert_allclose(path[3], shoemake, rtol=1e-5, atol=1e-6)
  linear = sample_sheets.interpolation_latents(z0, z1, 5, "linear")
  np.testing.assert_allclose(linear[2], (z0 + z1) / 2, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.diff(linear, axis=0), np.tile((z1 - z0) / 4, (4, 1)), atol=1e-6)
  # Parallel latents have no unique great circle: linear.
  np.testing.assert_allclose(sample_sheets.interpolation_latents(z0, 2 * z0, 3, "slerp")[1],
                             1.5 * z0, rtol=1e-6)


def test_interpolation_bad_input():
  z = np.ones(4)
  with pytest.raises(ValueError, match=r"valid choices: \('linear', 'slerp'\)"):
    sample_sheets.interpolation_latents(z, z, 3, "cubic")
  with pytest.raises(ValueError, match="at least its two endpoints"):
    sample_sheets.interpolation_latents(z, z, 1)
  with pytest.raises(ValueError, match="one shape"):
    sample_sheets.interpolation_latents(z, np.ones(5), 3)


def test_interpolation_rows_one_class_per_row():
  z, y = sample_sheets.interpolation_rows(rows=5, steps=4, dim_z=6, n_classes=10, mode="slerp",
                                          seed=3)
  assert z.shape == (20, 6) and y.shape == (20,)
  rows_y = y.reshape(5, 4)
  assert (rows_y == rows_y[:, :1]).all() and rows_y.min() >= 0 and rows_y.max() < 10
  rows_z = z.reshape(5, 4, 6)
  for row in rows_z:  # Each row is an interpolation between its own endpoints.
    np.testing.assert_allclose(
        row, sample_sheets.interpolation_latents(row[0], row[-1], 4, "slerp"), atol=1e-5)
  _, y1 = sample_sheets.interpolation_rows(2, 3, 6, n_classes=1, mode="linear", seed=0)
  assert (y1 == 0).all()


# ------------------------------------------------------------------ sample sheets
def test_sample_sheets(demo_run, tmp_path):
  config, _, state = trainers.load_run(demo_run, "latest")
  per_class, rows, steps, scale = 4, 2, 3, 2
  written = sample_sheets.write_sheets(config, state, str(tmp_path), per_class=per_class,
                                       interp_rows=rows, interp_steps=steps, scale=scale)
  n_classes = gan.num_classes(config)
  assert n_classes == 10
  assert [os.path.basename(p) for p in written["classes"]] == [
      f"class_{c:03d}.png" for c in range(n_classes)]
  assert len(written["grid"]) == len(written["interpolations"]) == 1
  assert sorted(os.listdir(tmp_path)) == sorted(
      os.path.basename(p) for paths in written.values() for p in paths)
  cell = config.data.image_size + 1          # image_grid pads 1 px
  size = lambda ncol, nrow: ((ncol * cell + 1) * scale, (nrow * cell + 1) * scale)
  sheets = [np.asarray(Image.open(p)) for p in written["classes"]]
  assert all(s.shape[1::-1] == size(2, 2) for s in sheets)
  assert Image.open(written["interpolations"][0]).size == size(steps, rows)
  per_row = config.sample.per_row
  assert Image.open(written["grid"][0]).size == size(per_row, n_classes)
  # Same latents on every class sheet; the class changes the images.
  assert not np.array_equal(sheets[0], sheets[1])


def test_sample_npz_holds_the_official_uint8_conversion(demo_run, tmp_path):
  """nda_jax.sample's .npz images are np.uint8(255 * (x + 1) / 2) of G's float32 output,
  BigGAN-PyTorch's sample.py conversion (truncating), for the latents and labels given."""
  config, _, state = trainers.load_run(demo_run, "latest")
  rng = np.random.default_rng(0)
  z = rng.standard_normal((24, config.model.dim_z)).astype(np.float32)
  y = rng.integers(0, gan.num_classes(config), 24).astype(np.int32)
  np.save(tmp_path / "z.npy", z)
  np.save(tmp_path / "y.npy", y)
  out = tmp_path / "s.npz"
  proc = subprocess.run([sys.executable, "-m", "nda_jax.sample", f"--workdir={demo_run}",
                         f"--latents={tmp_path / 'z.npy'}", f"--labels={tmp_path / 'y.npy'}",
                         "--batch_size=8", f"--out={out}"], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  images = gan.sample_in_batches(gan.make_sampler(config), state, z, y, 8)
  assert images.dtype == np.float32 and np.abs(images).max() <= 1.0
  official = np.uint8(255 * (images + 1) / 2)
  with np.load(out) as f:
    np.testing.assert_array_equal(f["latents"], z)
    np.testing.assert_array_equal(f["labels"], y)
    assert f["images"].dtype == np.uint8
    np.testing.assert_array_equal(f["images"], official)
  # Rounding (the conversion before) differs on about half of the pixels.
  rounded = np.round(255 * (images.astype(np.float64) + 1) / 2)
  assert 0.3 < (rounded != official).mean() < 0.7


@pytest.mark.parametrize("t", [0.5, 1.0, 2.0])
def test_truncated_latents_follow_scipy_truncnorm(t):
  """BigGAN's truncation trick: N(0, 1) conditioned on |z| <= t (redrawn, not clipped)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  z = np.asarray(gan.latents(jax.random.PRNGKey(3), 5000, 4, t)).ravel()
  assert np.abs(z).max() <= t
  assert stats.kstest(z, stats.truncnorm(-t, t).cdf).pvalue > 1e-3
  # The test tells the two apart: clipped normals (mass at +-t) fail it.
  clipped = np.clip(np.asarray(gan.latents(jax.random.PRNGKey(3), 5000, 4)).ravel(), -t, t)
  assert stats.kstest(clipped, stats.truncnorm(-t, t).cdf).pvalue < 1e-6
  np.testing.assert_array_equal(gan.latents(jax.random.PRNGKey(3), 8, 4),
                                jax.random.normal(jax.random.PRNGKey(3), (8, 4)))
  with pytest.raises(ValueError, match="truncation=-1"):
    gan.latents(jax.random.PRNGKey(0), 2, 2, -1)


def test_sample_truncation_flag(demo_run, tmp_path):
  from scipy import stats  # pylint: disable=g-import-not-at-top
  out = tmp_path / "t.npz"
  proc = subprocess.run([sys.executable, "-m", "nda_jax.sample", f"--workdir={demo_run}",
                         "--num=256", "--truncation=0.5", f"--out={out}"],
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(out) as f:
    z = f["latents"].ravel()
  assert np.abs(z).max() <= 0.5
  assert stats.kstest(z, stats.truncnorm(-0.5, 0.5).cdf).pvalue > 1e-3


# ------------------------------------------------------------------ plot tool
def test_plot_panels_follow_the_metrics(demo_run, tmp_path):
  records = logs.read_metrics(demo_run)
  present = {k for r in records for k in r}
  expected = [t for t, keys in plot_tool.PANELS.items() if present & set(keys)]
  assert "sample quality" not in expected      # The tiny run does not evaluate.
  out = str(tmp_path / "plots.png")
  assert plot_tool.plot(records, out) == expected
  assert Image.open(out).size == (500 * len(expected), 350)   # 5 x 3.5 in per panel, 100 dpi
  with_fd = records + [{"step": STEPS, "fd_digits": 12.5}]
  assert plot_tool.plot(with_fd, out) == expected + ["sample quality"]
  assert Image.open(out).size == (500 * (len(expected) + 1), 350)
  with pytest.raises(ValueError, match="no known metric"):
    plot_tool.plot([{"step": 1, "eval/fd_digits": 3.0}], out)


# ------------------------------------------------------------------ notebook
def test_committed_notebook_is_clean():
  import nbformat
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == "python3"
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)
  assert 'os.environ.get("NDA_WORKDIR"' in code[0].source


def test_notebook_runs_on_the_demo_checkpoint(demo_run, monkeypatch):
  import nbclient
  import nbformat
  from jupyter_client import kernelspec
  assert "python3" in kernelspec.find_kernel_specs()
  monkeypatch.setenv("NDA_WORKDIR", demo_run)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                          resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 3       # sample grid, D(x) histogram, training curves
  text = "".join(o.get("text", "") for o in outputs)
  assert f"step {STEPS}:" in text
  assert os.path.exists(os.path.join(demo_run, "plots.png"))
