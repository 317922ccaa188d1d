"""Linear probe: top-k accuracy, the 'classification' evaluator, the probe on a MoCo workdir
through the loop (frozen backbone, resume), and the MoCo importer CLI -> probe.

The MoCo workdir is written at step 0 with randomised BN running statistics (as an
import writes one), not trained: compiling a MoCo step costs minutes on a shared
CPU, and randomised running averages make the backbone's inference mode visible.
Exact resume is the loop's (tests/test_loop.py); here the probe resumes once and
keeps its backbone.
"""
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from configs import demo_linear
from configs import demo_moco
from nda_jax import images as images_lib
from nda_jax import logs
from nda_jax import parallel
from nda_jax import trainers
from nda_jax.data import digits
from nda_jax.evaluators import classification
from nda_jax.importers import save
from nda_jax.trainers import linear_probe
from nda_jax.trainers import loop
from nda_jax.trainers import moco

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numpy_topk(logits, labels, k):
  """From the definition: fewer than k classes have a larger logit than the label's."""
  label_logit = logits[np.arange(len(labels)), labels][:, None]
  return np.mean(np.sum(logits > label_logit, axis=-1) < k)


def leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


def test_topk_accuracy_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((64, 10)).astype(np.float32)
  labels = rng.integers(0, 10, 64).astype(np.int32)
  assert all(len(np.unique(row)) == 10 for row in logits)   # No ties.
  for k in (1, 2, 5, 10):
    got = float(linear_probe.topk_accuracy(logits, labels, k))
    assert got == pytest.approx(numpy_topk(logits, labels, k), abs=1e-7)
    assert np.mean(classification.topk_correct(logits, labels, k)) == pytest.approx(got)
  assert 0.0 < numpy_topk(logits, labels, 1) < numpy_topk(logits, labels, 5) < 1.0
  # Ties go to the lower class: constant logits are right only for class 0.
  assert float(linear_probe.topk_accuracy(np.zeros((64, 10)), labels, 1)) == pytest.approx(
      np.mean(labels == 0))
  with pytest.raises(ValueError, match="top-11"):
    linear_probe.topk_accuracy(logits, labels, 11)


def _data_config():
  return demo_linear.get_config("tiny").data


def test_classification_evaluator_matches_numpy():
  images, labels = digits.load_digits("test", 16)
  weights = np.random.default_rng(1).standard_normal((16 * 16 * 3, 10)).astype(np.float32)
  features = lambda x: np.asarray(x, np.float32).reshape(len(x), -1) / 255.0
  seen = []

  def classify_fn(batch):
    seen.append(np.asarray(batch))
    return features(batch) @ weights

  cfg = classification.ClassificationEvaluator.default_config()
  cfg.batch_size = 64
  evaluator = classification.ClassificationEvaluator(cfg, _data_config(), workdir=None,
                                                     mesh=parallel.default_mesh())
  results = dict(evaluator.run(classify_fn=classify_fn))
  logits = features(images) @ weights
  assert sorted(results) == ["test_top1", "test_top5"]
  assert results["test_top1"] == pytest.approx(numpy_topk(logits, labels, 1))
  assert results["test_top5"] == pytest.approx(numpy_topk(logits, labels, 5))
  assert 0.0 < results["test_top1"] < results["test_top5"] < 1.0

  # A subset: exactly max_examples real images are classified, scored on those alone.
  cfg.max_examples = 100
  seen.clear()
  subset = classification.ClassificationEvaluator(cfg, _data_config(), workdir=None,
                                                  mesh=parallel.default_mesh())
  results = dict(subset.run(classify_fn=classify_fn))
  shown = np.concatenate(seen)
  shown = shown[shown.reshape(len(shown), -1).any(-1)]   # Padding rows are all zeros.
  index = {image.tobytes(): i for i, image in enumerate(images)}
  rows = np.array([index[image.tobytes()] for image in shown])
  assert len(rows) == len(set(rows)) == 100
  assert results["test_top1"] == pytest.approx(numpy_topk(logits[rows], labels[rows], 1))


# ---------------------------------------------------------------- the probe on a MoCo workdir
def write_moco_workdir(workdir, seed=1):
  """demo_moco:tiny at step 0, BN running averages randomised (not the init's 0 / 1)."""
  config = demo_moco.get_config("tiny")
  state = moco.MoCo(config).init_state(jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)
  stats = jax.tree_util.tree_map_with_path(
      lambda path, x: (rng.uniform(0.5, 2.0, x.shape) if path[-1].key == "var"
                       else rng.normal(0.0, 0.3, x.shape)).astype(np.float32),
      state.batch_stats)
  save.save_imported(str(workdir), config, state.replace(batch_stats=stats))


def probe_config(pretrained_workdir, total_steps):
  c = demo_linear.get_config("tiny")
  c.pretrained_workdir = str(pretrained_workdir)
  c.train.total_steps = total_steps
  c.checkpoint.async_save = False
  return c


@pytest.fixture(scope="module")
def moco_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("moco")
  write_moco_workdir(workdir)
  return workdir


@pytest.fixture(scope="module")
def probe_run(moco_workdir, tmp_path_factory):
  """2 probe steps, then resumed for a third; evaluations at steps 2 and 3."""
  workdir = tmp_path_factory.mktemp("probe")
  loop.train_and_evaluate(probe_config(moco_workdir, 2), str(workdir))
  loop.train_and_evaluate(probe_config(moco_workdir, 3), str(workdir))
  return workdir


def test_backbone_is_frozen_and_the_classifier_trains(moco_workdir, probe_run):
  """After 3 steps and a resume: the backbone is the MoCo query encoder's, bit for bit."""
  c = probe_config(moco_workdir, 3)
  _, method, state = trainers.load_run(str(probe_run))
  _, _, moco_state = trainers.load_run(str(moco_workdir))
  assert int(state.step) == 3
  frozen = {"params": moco_state.params["backbone"],
            "batch_stats": moco_state.batch_stats["backbone"]}
  assert jax.tree.structure(state.backbone) == jax.tree.structure(frozen)
  for got, want in zip(leaves(state.backbone), leaves(frozen)):
    np.testing.assert_array_equal(got, want)

  init = method.init_state(jax.random.PRNGKey(c.seed)).classifier
  assert init["kernel"].shape == (32, 10)   # resnet18 at width 4: 32 features
  assert np.std(init["kernel"]) == pytest.approx(0.01, rel=0.2)
  np.testing.assert_array_equal(init["bias"], 0.0)
  assert not np.allclose(state.classifier["kernel"], init["kernel"])
  assert not np.allclose(state.classifier["bias"], 0.0)


def test_accuracy_is_logged_and_matches_the_classifier(moco_workdir, probe_run):
  records = logs.read_metrics(str(probe_run))
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == [1, 2, 3]   # The second run resumed from step 2.
  lr = probe_config(moco_workdir, 3).optim.classifier.lr
  assert all(r["lr"] == lr and 0 <= r["top1"] <= r["top5"] <= 1 for r in train)
  evals = {r["step"]: r for r in records if "test_top1" in r}
  assert sorted(evals) == [2, 3]

  # classify_fn = MoCo's own inference-mode embedder (center crop, running BN), then the
  # classifier; the evaluator on it reproduces the logged accuracy.
  config, method, state = trainers.load_run(str(probe_run))
  pretrained_config, _, moco_state = trainers.load_run(str(moco_workdir))
  dp = parallel.DataParallel()
  classify_fn = method.make_eval_fns(dp)["classify_fn"]
  images = digits.load_digits("test", 16)[0][:16]
  features = moco.make_embedder(pretrained_config)(moco_state, images)
  want = np.asarray(features) @ np.asarray(state.classifier["kernel"]) + np.asarray(
      state.classifier["bias"])
  state = dp.put_state(state)   # Replicated over the mesh, as the loop and eval hold it.
  np.testing.assert_allclose(np.asarray(classify_fn(state, images)), want, rtol=1e-5, atol=1e-5)
  evaluator = classification.ClassificationEvaluator(config.evals.classification, config.data,
                                                     workdir=None, mesh=dp.mesh)
  results = dict(evaluator.run(classify_fn=lambda x: classify_fn(state, x)))
  assert results["test_top1"] == pytest.approx(evals[3]["test_top1"])
  assert results["test_top5"] == pytest.approx(evals[3]["test_top5"])


def test_config_errors_name_the_flag(moco_workdir, tmp_path):
  c = probe_config(moco_workdir, 3)
  c.pretrained_workdir = None
  with pytest.raises(ValueError, match="--config.pretrained_workdir=DIR"):
    loop.devices_and_method(c)
  c.pretrained_workdir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="config.pretrained_workdir=.*config.json"):
    loop.devices_and_method(c)
  gan_config = ml_collections.ConfigDict({"trainer": "gan"})
  from nda_jax import config_lib  # pylint: disable=g-import-not-at-top
  config_lib.write_config(gan_config, str(tmp_path))
  with pytest.raises(ValueError, match="is a 'gan' run"):
    loop.devices_and_method(c)
  c = probe_config(moco_workdir, 3)
  c.data.channels = 1
  with pytest.raises(ValueError, match=r"different architecture: data.channels=1 \(the run has 3\)"):
    loop.devices_and_method(c)
  c = probe_config(moco_workdir, 3)
  c.pretrained_checkpoint = "7"
  with pytest.raises(ValueError, match=r"pretrained_checkpoint='7'.*kept steps: \[0\]"):
    loop.devices_and_method(c)


# ---------------------------------------------------------------- importer CLI -> probe
def _run_importer(*flags):
  cmd = [sys.executable, "-m", "nda_jax.importers.moco_pytorch", *flags]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                        env=dict(os.environ))
  return proc.returncode, proc.stdout + proc.stderr


def test_importer_cli_then_probe(tmp_path):
  torch = pytest.importorskip("torch")
  import test_moco_importer as torch_ref  # pylint: disable=g-import-not-at-top  (needs torch)
  # demo_moco:tiny's encoder: resnet18, width 4, CIFAR stem, 64-d head.
  model = torch_ref._randomize(torch_ref.TorchMocoResNet((2, 2, 2, 2), False, 4, "cifar", 64),
                               seed=3)
  state_dict = {k: torch.from_numpy(np.asarray(v)) for k, v in
                torch_ref._moco_state_dict(model).items()}
  checkpoint = tmp_path / "moco_v2.pth.tar"
  torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state_dict}, checkpoint)
  imported = tmp_path / "imported"
  rc, out = _run_importer(f"--checkpoint={checkpoint}", "--config=configs/demo_moco.py:tiny",
                          f"--workdir={imported}")
  assert rc == 0, out[-3000:]

  _, _, moco_state = trainers.load_run(str(imported))
  for q, k in zip(leaves((moco_state.params, moco_state.batch_stats)),
                  leaves((moco_state.key_params, moco_state.key_batch_stats))):
    np.testing.assert_array_equal(q, k)

  probe = tmp_path / "probe"
  loop.train_and_evaluate(probe_config(imported, 1), str(probe))
  assert "test_top1" in logs.read_metrics(str(probe))[-1]
  _, method, state = trainers.load_run(str(probe))
  images = digits.load_digits("test", 20)[0][:16]   # Larger than the encoder's 16x16 crop.
  dp = parallel.DataParallel()
  logits = method.make_eval_fns(dp)["classify_fn"](dp.put_state(state), images)
  # PyTorch: CenterCrop(16), ToTensor, Normalize, the backbone, the probe's classifier.
  x = images[:, 2:18, 2:18] / 255.0
  x = (x - np.array(images_lib.IMAGENET_MEAN)) / np.array(images_lib.IMAGENET_STD)
  features = torch_ref._torch_outputs(model, x.astype(np.float32))[0]
  want = features @ np.asarray(state.classifier["kernel"]) + np.asarray(
      state.classifier["bias"])
  torch_ref._assert_close(logits, want)

  rc, out = _run_importer(f"--checkpoint={tmp_path / 'missing.pth.tar'}",
                          "--config=configs/demo_moco.py:tiny", f"--workdir={tmp_path / 'x'}")
  assert rc == 1 and "Traceback" not in out, out[-3000:]
  assert out.strip().splitlines()[-1] == (f"nda_jax.importers.moco_pytorch: error: --checkpoint="
                                          f"{tmp_path / 'missing.pth.tar'} does not exist")


def test_importer_rejects_another_architecture(tmp_path):
  torch = pytest.importorskip("torch")
  import test_moco_importer as torch_ref  # pylint: disable=g-import-not-at-top  (needs torch)
  from nda_jax.importers import moco_pytorch  # pylint: disable=g-import-not-at-top
  model = torch_ref.TorchMocoResNet((2, 2, 2, 2), False, 8, "cifar", 64)   # width 8, not 4
  checkpoint = tmp_path / "wide.pth.tar"
  torch.save({"state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in
                             torch_ref._moco_state_dict(model).items()}}, checkpoint)
  with pytest.raises(ValueError, match="does not fit MocoEncoder"):
    moco_pytorch.import_moco(str(checkpoint), demo_moco.get_config("tiny"),
                             str(tmp_path / "w"))
  assert not (tmp_path / "w" / "config.json").exists()
  with pytest.raises(ValueError, match="needs a MoCo config"):
    moco_pytorch.import_moco(str(checkpoint), demo_linear.get_config("tiny"),
                             str(tmp_path / "w"))


def test_probe_takes_the_best_pretrained_checkpoint(tmp_path):
  """pretrained_checkpoint='best': three MoCo steps of different initial states with kNN
  top-1 0.3, 0.6, 0.4 under keep=1, keep_best=1 ('max'); the probe's backbone is step 2's
  (the best, kept only by keep-best), not the latest's."""
  from nda_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = demo_moco.get_config("tiny")
  config.checkpoint.update(keep=1, keep_best=1, best_metric="knn_top1", best_mode="max",
                           async_save=False)
  config_lib.write_config(config, str(tmp_path / "moco"))
  checkpointer = trainers.checkpointer(config, str(tmp_path / "moco"))
  states = {}
  try:
    for seed, (step, top1) in enumerate([(1, 0.3), (2, 0.6), (3, 0.4)]):
      state = moco.MoCo(config).init_state(jax.random.PRNGKey(seed))
      states[step] = state.replace(step=jax.numpy.asarray(step, state.step.dtype))
      checkpointer.save(step, states[step], metrics={"knn_top1": top1})
  finally:
    checkpointer.close()
  assert checkpointer.all_steps() == [2, 3]
  c = probe_config(tmp_path / "moco", 1)
  c.pretrained_checkpoint = "best"
  loop.devices_and_method(c)
  method = trainers.get_method(c)
  backbone = method.pretrained_backbone()
  for which, step in (("best", 2), ("latest", 3)):
    want = {"params": states[step].params["backbone"],
            "batch_stats": states[step].batch_stats["backbone"]}
    same = all(np.array_equal(a, b) for a, b in zip(leaves(backbone), leaves(want)))
    assert same == (which == "best"), which
