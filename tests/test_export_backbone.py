"""exporters.backbone: round trips through importers.moco_pytorch and the
Detectron2 names MoCo's convert-pretrain-to-detectron2.py writes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nda_jax.exporters import backbone
from nda_jax.importers import moco_pytorch
from nda_jax.models import resnet


def _resnet(block="bottleneck"):
  return resnet.ResNet(stage_sizes=(1, 2, 1, 1), block=block, stem="imagenet", width=8)


def _random_variables(model, seed):
  """Init shapes, values from a NumPy RNG (non-trivial running stats too)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                             train=False))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape).astype(np.float32)),
                      shapes)


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_import_of_export_is_identity(block):
  model = _resnet(block)
  variables = _random_variables(model, seed=0)
  back = moco_pytorch.convert_encoder(backbone.to_torchvision(variables), model, prefix="")
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(variables),
                               jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(path))
  assert jax.tree.structure(back) == jax.tree.structure(variables)


def test_export_of_import_reproduces_a_moco_state_dict():
  """A main_moco-layout checkpoint (query + key encoder, MLP head, queue) -> import -> export
  gives back every query-backbone tensor except num_batches_tracked and the head."""
  model = _resnet()
  shapes = backbone.to_torchvision(_random_variables(model, seed=1))
  rng = np.random.default_rng(2)
  sd = {}
  for k, v in shapes.items():
    sd["module.encoder_q." + k] = (np.asarray(7, np.int64) if k.endswith("num_batches_tracked")
                                   else rng.standard_normal(v.shape).astype(np.float32))
  sd.update({"module.encoder_q.fc.0.weight": np.ones((64, 256), np.float32),
             "module.encoder_q.fc.0.bias": np.ones(64, np.float32)})
  sd.update({k.replace("encoder_q", "encoder_k"): v + 1 for k, v in sd.items()})
  sd["module.queue"] = np.ones((64, 16), np.float32)
  exported = backbone.to_torchvision(moco_pytorch.convert_encoder(sd, model))
  want = {k[len("module.encoder_q."):]: v for k, v in sd.items()
          if k.startswith("module.encoder_q.") and ".fc." not in k
          and not k.endswith("num_batches_tracked")}
  assert set(want) == {k for k in exported if not k.endswith("num_batches_tracked")}
  for k, v in want.items():
    assert exported[k].dtype == v.dtype and exported[k].shape == v.shape, k
    np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_detectron2_names():
  # Names as Detectron2's ResNet (detectron2/modeling/backbone/resnet.py) calls them.
  cases = {"conv1.weight": "stem.conv1.weight", "bn1.running_var": "stem.conv1.norm.running_var",
           "layer1.0.conv3.weight": "res2.0.conv3.weight",
           "layer1.0.bn2.bias": "res2.0.conv2.norm.bias",
           "layer3.0.downsample.0.weight": "res4.0.shortcut.weight",
           "layer4.0.downsample.1.running_mean": "res5.0.shortcut.norm.running_mean"}
  for tv, d2 in cases.items():
    assert backbone.detectron2_name(tv) == d2
  out = backbone.to_detectron2(_random_variables(_resnet(), seed=3))
  assert out["matching_heuristics"] is True and isinstance(out["__author__"], str)
  assert all(isinstance(v, np.ndarray) for v in out["model"].values())
  assert not any("num_batches_tracked" in k or "layer" in k or "bn" in k for k in out["model"])
  assert len(out["model"]) == sum(1 for k in backbone.to_torchvision(
      _random_variables(_resnet(), seed=3)) if not k.endswith("num_batches_tracked"))


@pytest.mark.parametrize("stem,width,fmt,words", [
    ("cifar", 64, "detectron2", "'imagenet' stem"), ("imagenet", 32, "detectron2", "64-wide"),
    ("imagenet", 64, "onnx", "valid choices")])
def test_unrepresentable_backbones_are_refused(stem, width, fmt, words):
  with pytest.raises(ValueError, match=words):
    backbone.check_exportable(stem, width, fmt)
  backbone.check_exportable("imagenet", 64, "detectron2")
  backbone.check_exportable("imagenet", 16, "torchvision")
  backbone.check_exportable("cifar", 16, "torchvision")  # detection.torch_resnet runs it


def _moco_workdir(path, stem, width):
  """A step-0 MoCo workdir (configs/demo_moco.py:tiny with `stem`), as the importer writes."""
  import configs.demo_moco as demo_moco  # pylint: disable=g-import-not-at-top
  from nda_jax.importers import save  # pylint: disable=g-import-not-at-top
  from nda_jax.trainers import moco  # pylint: disable=g-import-not-at-top
  config = demo_moco.get_config("tiny")
  config.model.stem = stem
  config.model.width = width
  state = moco.MoCo(config).init_state(jax.random.PRNGKey(0))
  save.save_imported(str(path), config, state)
  return state


def test_export_command(tmp_path):
  """The workdir's query backbone, written in both layouts; refusals exit 1 in one paragraph."""
  import pickle  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  run = tmp_path / "run"
  state = _moco_workdir(run, "imagenet", width=64)
  want = backbone.to_torchvision({"params": state.params["backbone"],
                                  "batch_stats": state.batch_stats["backbone"]})
  backbone.export(str(run), "latest", "detectron2", str(tmp_path / "r.pkl"))
  with open(tmp_path / "r.pkl", "rb") as f:
    got = pickle.load(f)
  assert got["matching_heuristics"] is True
  assert set(got["model"]) == {backbone.detectron2_name(k) for k in want
                               if not k.endswith("num_batches_tracked")}
  for k, v in want.items():
    if not k.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(got["model"][backbone.detectron2_name(k)], v, err_msg=k)
  with pytest.raises(ValueError, match="exists"):
    backbone.export(str(run), "latest", "detectron2", str(tmp_path / "r.pkl"))

  _moco_workdir(tmp_path / "cifar", "cifar", width=4)
  out = tmp_path / "cifar.pkl"
  r = subprocess.run([sys.executable, "-m", "nda_jax.exporters.backbone",
                      f"--workdir={tmp_path / 'cifar'}", "--format=detectron2", f"--out={out}"],
                     capture_output=True, text=True, check=False)
  assert r.returncode == 1 and "'imagenet' stem" in r.stderr and "Traceback" not in r.stderr
  assert not out.exists()


def test_export_torchvision_file(tmp_path):
  torch = pytest.importorskip("torch")
  state = _moco_workdir(tmp_path / "run", "imagenet", width=4)
  backbone.export(str(tmp_path / "run"), 0, "torchvision", str(tmp_path / "r.pth"))
  got = torch.load(tmp_path / "r.pth", weights_only=True)
  want = backbone.to_torchvision({"params": state.params["backbone"],
                                  "batch_stats": state.batch_stats["backbone"]})
  assert set(got) == set(want)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k].numpy(), v, err_msg=k)
