"""detection.finetune: MoCo's recipe in torchvision (BatchNorm2d in train mode, every
layer trainable, Detectron2's warm-up / multi-step lr), end to end on a tiny digits VOC
tree, and one-paragraph refusals. The torch-gated tests skip without the `detection`
extra; the MissingExtraError test runs only without it."""
import importlib.util
import json
import os
import pickle
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs.voc_detection as voc_detection
from nda_jax.detection import finetune
from nda_jax.exporters import backbone
from nda_jax.models import resnet
from nda_jax.tools import digits_voc

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "torchvision", "pycocotools"))


@pytest.fixture(name="torch")
def _torch():
  pytest.importorskip("torchvision")
  pytest.importorskip("pycocotools")
  return pytest.importorskip("torch")


@pytest.fixture(scope="module", name="data")
def _data(tmp_path_factory):
  root = tmp_path_factory.mktemp("digits_voc")
  digits_voc.write(str(root), seed=0, num_trainval=8, num_test=4)
  return str(root)


@pytest.fixture(scope="module", name="exported")
def _exported(tmp_path_factory):
  """The tiny config's untrained shape as the exporter writes a JAX ResNet (a .pth)."""
  torch = pytest.importorskip("torch")
  model = resnet.resnet("resnet18", stem="cifar", width=4)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)
  path = tmp_path_factory.mktemp("backbone") / "b.pth"
  torch.save({k: torch.from_numpy(v) for k, v in backbone.to_torchvision(variables).items()},
             path)
  return str(path)


def test_lr_at_the_boundaries_is_detectron2s_closed_form():
  """VOC's 24k schedule: factor 0.001 -> 1 linearly over 100 its, x0.1 at 18k and 22k."""
  c = voc_detection.get_config()
  assert finetune.base_lr(c) == pytest.approx(0.02)
  c.train.batch_size = 8
  assert finetune.base_lr(c) == pytest.approx(0.01)                 # linear scaling
  want = {0: 0.001, 50: 0.001 * 0.5 + 0.5, 99: 0.001 * 0.01 + 0.99, 100: 1.0, 17999: 1.0,
          18000: 0.1, 21999: 0.1, 22000: 0.01, 23999: 0.01}
  for step, factor in want.items():
    assert finetune.lr_factor(step, c.optim) == pytest.approx(factor, rel=1e-12), step


def test_recipe_is_mocos():
  c = voc_detection.get_config()
  assert (c.train.iterations, c.train.batch_size, c.optim.base_lr) == (24000, 16, 0.02)
  assert tuple(c.optim.steps) == (18000, 22000) and c.optim.warmup_iters == 100
  assert (c.optim.momentum, c.optim.weight_decay) == (0.9, 1e-4)
  assert (c.model.trainable_layers, c.model.norm) == (5, "batch_norm")
  assert tuple(c.data.min_size_train) == tuple(range(480, 801, 32)) and c.data.min_size_test == 800


def test_bn_trains_in_batch_norm2d_and_every_layer_learns(torch, data, exported):
  config = voc_detection.get_config("tiny")
  body = finetune.load_backbone(exported, config)
  model = finetune.build_model(body, config)
  assert all(p.requires_grad for p in body.parameters())          # trainable_layers=5
  seen = []
  for m in body.modules():
    if "Norm" in type(m).__name__:
      m.register_forward_hook(lambda m, i, o: seen.append((type(m), m.training)))
  before = {k: v.clone() for k, v in body.state_dict().items()}
  examples = finetune.load_split(data, "trainval", config.data.classes)
  logs = []
  finetune.train(model, data, examples, config, log=logs.append)
  assert len(seen) == 20 * config.train.iterations                 # resnet18's 20 BNs
  assert set(seen) == {(torch.nn.BatchNorm2d, True)}
  after = body.state_dict()
  for stage in ("conv1.weight", "bn1.weight", "bn1.running_mean", "layer1.0.conv1.weight",
                "layer4.1.bn2.bias", "layer4.1.bn2.running_var"):
    assert not torch.equal(before[stage], after[stage]), stage
  # The lr each iteration used: the tiny schedule (warm-up 2, steps at 2 and 3) in closed form.
  lrs = [float(re.search(r"lr=([0-9.e-]+)", line).group(1)) for line in logs]
  lr0 = 0.02 * 4 / 16
  np.testing.assert_allclose(lrs, [lr0 * 0.001, lr0 * (0.001 * 0.5 + 0.5), lr0 * 0.1,
                                   lr0 * 0.01], rtol=1e-5)


def test_frozen_layers_as_torchvision_counts_them(torch, exported):
  config = voc_detection.get_config("tiny")
  config.model.trainable_layers = 3
  config.model.norm = "frozen"
  body = finetune.load_backbone(exported, config)
  finetune.build_model(body, config)
  from torchvision.ops import misc  # pylint: disable=g-import-not-at-top
  assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
  assert any(isinstance(m, misc.FrozenBatchNorm2d) for m in body.modules())
  trainable = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
  assert trainable == {"layer2", "layer3", "layer4"}


@pytest.mark.parametrize("which", ["exported", "none"])
def test_runs_end_to_end_and_writes_metrics(torch, data, exported, tmp_path, which):
  config = voc_detection.get_config("tiny")
  workdir = tmp_path / "ft"
  metrics = finetune.run(config, exported if which == "exported" else "none", data,
                         str(workdir), log=lambda s: None)
  saved = json.loads((workdir / "metrics.json").read_text())
  assert saved == json.loads(json.dumps(metrics))
  for name in ("VOC (Detectron2)", "COCO (pycocotools)"):
    assert set(saved[name]) == {"AP", "AP50", "AP75"}
    assert all(0 <= v <= 100 for v in saved[name].values())
  assert (saved["train_images"], saved["test_images"], saved["iterations"]) == (8, 4, 4)
  assert json.loads((workdir / "config.json").read_text())["model"]["norm"] == "batch_norm"
  with pytest.raises(ValueError, match="not empty"):
    finetune.run(config, "none", data, str(workdir))


def test_bad_inputs_are_one_paragraph_and_leave_no_workdir(torch, data, exported, tmp_path):
  config = voc_detection.get_config("tiny")
  wrong = tmp_path / "wrong.pth"
  torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
  pkl = tmp_path / "d2.pkl"
  with open(pkl, "wb") as f:
    pickle.dump({"model": {"stem.conv1.weight": np.zeros((4, 3, 3, 3))}}, f)
  cases = [(str(tmp_path / "missing.pth"), data, "does not exist"),
           (str(wrong), data, "not a ResNet backbone"),
           (str(pkl), data, "not a readable PyTorch file"),
           (exported, str(tmp_path), "not a PASCAL VOC root")]
  for i, (b, d, words) in enumerate(cases):
    with pytest.raises(ValueError, match=words):
      finetune.run(config, b, d, str(tmp_path / f"w{i}"))
    assert not (tmp_path / f"w{i}").exists()
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  r = subprocess.run([sys.executable, "-m", "nda_jax.detection.finetune",
                      "--config=configs/voc_detection.py:tiny", f"--backbone={wrong}",
                      f"--data={data}", f"--workdir={tmp_path / 'cli'}"],
                     capture_output=True, text=True, check=False, env=env, cwd=_ROOT)
  assert r.returncode == 1 and "not a ResNet backbone" in r.stderr, r.stderr
  assert "Traceback" not in r.stderr and not (tmp_path / "cli").exists()


@pytest.mark.skipif(HAS_TORCH, reason="the detection extra is installed")
def test_without_torch_the_command_names_the_extra(data, tmp_path):
  r = subprocess.run([sys.executable, "-m", "nda_jax.detection.finetune",
                      "--config=configs/voc_detection.py:tiny", "--backbone=none",
                      f"--data={data}", f"--workdir={tmp_path / 'w'}"],
                     capture_output=True, text=True, check=False, cwd=_ROOT)
  assert r.returncode == 1 and "'.[detection]'" in r.stderr, r.stderr
  assert "Traceback" not in r.stderr and not (tmp_path / "w").exists()
