"""A gs:// workdir: every file a run writes besides its checkpoints goes through epath.

GCS cannot be reached here. `epath.testing.mock_epath()` sends every epath call to a
local folder that stands in for the bucket and records the path it was given. Code
that turned the workdir string into a local path would bypass epath and create a
folder named 'gs:' in the working directory (checked), or hand epath a mangled path
such as '/cwd/gs:/bucket/run' (checked). As on GCS, the mock refuses to append to a file.
Orbax checkpoints take the same epath path, but tensorstore talks to GCS itself, so
they are not part of this test.
"""
import io
import logging
import os

from etils import epath
from etils.epath import testing as epath_testing
import jax
import numpy as np
from PIL import Image
import pytest

from nda_jax import config_lib
from nda_jax import eval as eval_lib
from nda_jax import logs
from nda_jax import workdir as workdir_lib
from nda_jax.evaluators import anomaly
from nda_jax.evaluators import metrics as metrics_lib
from nda_jax.tools import plot as plot_tool
from nda_jax.trainers import gan
from test_gan_trainer import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKDIR = "gs://bucket/run"


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """(the local folder standing for gs://bucket/run, the paths epath was asked for)."""
  root = tmp_path / "gcs"
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  seen = []

  def local(path):
    path = os.fspath(path)
    seen.append(path)
    return str(root / path[len("gs://"):]) if path.startswith("gs://") else path

  def one_path(fn, path, *args, **kwargs):
    return fn(local(path), *args, **kwargs)

  def two_paths(fn, path, dst, *args, **kwargs):
    return fn(local(path), local(dst), *args, **kwargs)

  def open_(fn, path, mode):
    if "a" in mode and os.fspath(path).startswith("gs://"):
      raise NotImplementedError("GCS objects cannot be appended to")
    return fn(local(path), mode)

  with epath_testing.mock_epath(
      open=open_, exists=one_path, isdir=one_path, listdir=one_path, glob=one_path,
      makedirs=one_path, mkdir=one_path, remove=one_path, rmtree=one_path, stat=one_path,
      walk=one_path, rename=two_paths, replace=two_paths, copy=two_paths):
    yield root / "bucket" / "run", seen
  assert not [p for p in os.listdir(cwd) if p.startswith("gs:")]
  assert not os.path.exists(os.path.join(REPO, "gs:"))
  mangled = [p for p in seen if "gs:" in p and not p.startswith("gs://")]
  assert not mangled, f"a bucket path was made local: {mangled}"


def test_workdir_path_stays_a_bucket_path():
  assert str(workdir_lib.path(WORKDIR)) == WORKDIR
  assert not workdir_lib.is_local(WORKDIR)
  assert workdir_lib.is_local("runs/demo") and workdir_lib.path("runs/demo").is_absolute()


def test_run_files_go_through_epath(bucket, caplog, monkeypatch):
  local, _ = bucket
  # Without the gcs extra, tensorboardX cannot write gs:// (with it, it goes to GCS itself,
  # past this mock: tests/test_gcs_runs.py runs that on a real GCS server).
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(record_writer, "GCS_ENABLED", False)
  config = tiny_config()
  config_lib.write_config(config, WORKDIR)
  assert (local / "config.json").exists()
  assert config_lib.load_config(WORKDIR).to_dict() == config_lib.load_config(
      str(local)).to_dict()
  assert config_lib.load_config(WORKDIR).train.batch_size == config.train.batch_size

  with caplog.at_level(logging.WARNING):
    writer = logs.MetricWriter(WORKDIR)
  assert "no TensorBoard events for gs://bucket/run/tensorboard" in caplog.text
  writer.write(1, {"d_loss": 1.5})
  writer.write(2, {"d_loss": 1.25})
  writer.close()
  resumed = logs.MetricWriter(WORKDIR)     # A resumed run keeps the earlier records.
  resumed.write(3, {"d_loss": 1.0, "g_loss": 2.0})
  resumed.close()
  records = logs.read_metrics(WORKDIR)
  assert [(r["step"], r["d_loss"]) for r in records] == [(1, 1.5), (2, 1.25), (3, 1.0)]
  assert not (local / "tensorboard").exists()

  method = gan.GAN(config)
  state = method.init_state(jax.random.PRNGKey(0))
  method.artifacts(state, WORKDIR, 7)
  sheet = Image.open(local / "samples" / "step_0000007.png")
  rows = gan.num_classes(config)
  cell = config.data.image_size + 1
  assert sheet.size == ((config.sample.per_row * cell + 1) * config.sample.scale,
                        (rows * cell + 1) * config.sample.scale)

  result = {"step": 3, "checkpoint": "latest", "evals": {}, "metrics": {"fd_digits": 4.5}}
  eval_lib.write_result(WORKDIR, result)
  assert '"fd_digits": 4.5' in (local / "eval.json").read_text()
  assert logs.read_metrics(WORKDIR, eval_lib.METRICS_FILE) == [{"step": 3,
                                                                   "eval/fd_digits": 4.5}]
  assert logs.read_metrics(WORKDIR)[-1]["step"] == 3 and "d_loss" in logs.read_metrics(
      WORKDIR)[-1]

  tables = {"in_distribution": {"split": "test", "n": 10, "mean_score": 0.0},
            "normalisation": "[-1, 1]",
            "rows": [{"set": "uniform_noise", "n_ood": 10, "auroc": 0.75, "severity": "all"}]}
  evaluator = anomaly.AnomalyEvaluator(anomaly.AnomalyEvaluator.default_config(), config.data,
                                       workdir=WORKDIR)
  assert evaluator.out_dir == WORKDIR + "/anomaly"
  anomaly.write_tables(tables, evaluator.out_dir)
  assert "| uniform_noise | 10 | 0.7500 |" in (local / "anomaly" / "anomaly.md").read_text()

  mu, sigma = np.arange(3.0), np.eye(3)
  stats = WORKDIR + "/eval_cache/ref_stats.npz"
  metrics_lib.save_stats(stats, mu, sigma)
  loaded = metrics_lib.load_stats(stats)
  np.testing.assert_array_equal(loaded[0], mu)
  np.testing.assert_array_equal(loaded[1], sigma)

  assert plot_tool.plot(logs.read_metrics(WORKDIR), workdir_lib.path(WORKDIR) / "plots.png")
  assert Image.open(io.BytesIO((local / "plots.png").read_bytes())).format == "PNG"


def test_the_mock_catches_a_local_path(bucket):
  """The check itself: writing with `open` on the workdir string makes a 'gs:' folder."""
  _, seen = bucket
  target = epath.Path(WORKDIR) / "ok.txt"
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_text("ok")
  assert seen and all(p.startswith(WORKDIR) for p in seen)
  os.makedirs(os.path.dirname(WORKDIR + "/x"), exist_ok=True)   # What a bug would do.
  assert os.path.isdir("gs:")
  os.rmdir(os.path.join("gs:", "bucket", "run"))
  os.rmdir(os.path.join("gs:", "bucket"))
  os.rmdir("gs:")
