"""The MoCo CIFAR configs against MoCo's CIFAR-10 demo, and through the trainer's checks.

RECIPE is read off facebookresearch/moco colab/moco_cifar10_demo.ipynb: its
argparse defaults (lr 0.06, 200 epochs, batch 512, wd 5e-4, moco-dim 128,
K 4096, m 0.99, t 0.1, bn-splits 8, knn-k 200, knn-t 0.1), `args.cos = True`
applied per epoch by its adjust_learning_rate (the 82.6% row: 200 epochs,
asymmetric loss), its SGD (momentum 0.9), its ResNet-18 (conv1 3x3 stride 1,
no max-pool, `fc` a linear 512 -> 128), its Normalize (CIFAR-10's mean/std),
its kNN monitor on `net(x)` (the 128-d output) and its train transform
(RandomResizedCrop(32), flip 0.5, ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8,
grayscale 0.2, no blur).
"""
import math
import pickle

import jax
import numpy as np
import pytest

from configs import cifar100_moco
from configs import cifar10_moco
from configs import demo_moco
from configs import imagenet_linear
from configs import imagenet_moco
from nda_jax import images
from nda_jax import optim
from nda_jax import trainers
from nda_jax.data import sources
from nda_jax.trainers import loop
from nda_jax.trainers import moco

CIFAR_TRAIN = 50_000           # both CIFAR-10 and CIFAR-100
RECIPE = {
    "trainer": "moco",
    "data.image_size": 32,
    "data.channels": 3,
    "data.train_split": "train",
    "data.eval_split": "test",
    "model.arch": "resnet18",
    "model.stem": "cifar",
    "model.width": 64,
    "model.head_dim": 128,
    "model.mlp_head": False,
    "model.bn_group_size": 512 // 8,
    "moco.queue_size": 4096,
    "moco.momentum": 0.99,
    "moco.temperature": 0.1,
    "moco.monitor_features": "head",
    "optim.encoder.kind": "sgd",
    "optim.encoder.lr": 0.06,
    "optim.encoder.momentum": 0.9,
    "optim.encoder.nesterov": False,
    "optim.encoder.weight_decay": 5e-4,
    "optim.encoder.decoupled_wd": False,
    "optim.encoder.schedule": "cosine_epochs",
    "optim.encoder.warmup_epochs": 0.0,
    "train.batch_size": 512,
    "train.num_epochs": 200,
    "train.total_steps": 0,
    "aug.crop_size": 32,
    "aug.scale": (0.08, 1.0),
    "aug.ratio": None,          # not a key: the trainer's default (3/4, 4/3) is torchvision's
    "aug.jitter": (0.4, 0.4, 0.4, 0.1),
    "aug.p_jitter": 0.8,
    "aug.p_gray": 0.2,
    "aug.p_blur": 0.0,
    "aug.p_flip": 0.5,
    "evals.knn.type": "knn",
    "evals.knn.k": 200,
    "evals.knn.temperature": 0.1,
    "evals.knn.max_train": 0,
    "evals.knn.max_eval": 0,
    "evals.knn.eval_split": "test",
}
MODULES = {"cifar10": (cifar10_moco, 10), "cifar100": (cifar100_moco, 100)}
VARIANTS = (None, "v2", "baseline", "v2,baseline")


def flat(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if hasattr(value, "items"):
      out.update(flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = tuple(value) if isinstance(value, (list, tuple)) else value
  return out


def diff(a, b):
  fa, fb = flat(a), flat(b)
  return {k for k in fa.keys() | fb.keys() if fa.get(k, "absent") != fb.get(k, "absent")}


@pytest.mark.parametrize("dataset", MODULES)
def test_default_is_the_demo_recipe(dataset):
  module, num_classes = MODULES[dataset]
  c = flat(module.get_config())
  for key, want in RECIPE.items():
    if want is None:
      assert key not in c, key
    else:
      assert c[key] == want, (key, c[key], want)
  assert c["data.name"] == dataset and c["data.num_classes"] == num_classes
  assert c["model.input_norm"] == dataset


@pytest.mark.parametrize("dataset, mean, std", [
    ("cifar10", (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),   # the demo's Normalize
    ("cifar100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))])
def test_input_is_normalised_with_the_datasets_mean_and_std(dataset, mean, std):
  """torchvision's ToTensor + Normalize(mean, std) of the uint8 image, in float64."""
  c = MODULES[dataset][0].get_config()
  u8 = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
  got = images.normalize_input(c, images.to_float(u8))
  want = (u8 / 255.0 - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_nda_negatives_are_the_papers_as_the_other_moco_configs():
  nda = cifar10_moco.get_config().nda
  assert nda.enabled
  assert flat(nda) == flat(imagenet_moco.get_config().nda) == flat(demo_moco.get_config().nda)


def test_variants_differ_only_where_they_should():
  base = cifar10_moco.get_config()
  assert diff(base, cifar10_moco.get_config("baseline")) == {"nda.enabled"}
  assert not cifar10_moco.get_config("baseline").nda.enabled
  v2 = cifar10_moco.get_config("v2")
  assert diff(base, v2) == {"aug.scale", "aug.p_blur", "model.mlp_head"}
  assert v2.model.mlp_head
  # MoCo-v2's aug+ (main_moco.py --aug-plus), as configs/imagenet_moco.py has it, at 32 px.
  aug_plus = flat(imagenet_moco.get_config().aug)
  aug_plus["crop_size"] = 32
  assert flat(v2.aug) == aug_plus
  assert flat(v2.aug)["scale"] == (0.2, 1.0) and v2.aug.p_blur == 0.5
  assert flat(v2.aug)["blur_sigma"] == (0.1, 2.0)
  assert diff(base, cifar10_moco.get_config("v2,baseline")) == {
      "aug.scale", "aug.p_blur", "model.mlp_head", "nda.enabled"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_cifar100_is_the_same_recipe(variant):
  assert diff(cifar10_moco.get_config(variant), cifar100_moco.get_config(variant)) == {
      "data.name", "data.num_classes", "model.input_norm"}


@pytest.mark.parametrize("module", [cifar10_moco, cifar100_moco])
def test_unknown_variant_is_refused_by_name(module):
  with pytest.raises(ValueError, match=r"\['v3'\].*\['baseline', 'v2'\]"):
    module.get_config("v3")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dataset", MODULES)
def test_passes_the_trainers_checks(dataset, variant):
  c = MODULES[dataset][0].get_config(variant)
  dp, _ = loop.check_config(c)         # What main runs before touching the workdir (8 CPU devices).
  assert dp.num_devices == len(jax.devices())
  trainers.get_method(c, CIFAR_TRAIN).validate(1)


def test_schedule_is_cosine_per_epoch_over_200_epochs_and_knn_every_epoch():
  c = cifar10_moco.get_config()
  method = trainers.get_method(c, CIFAR_TRAIN)
  assert method.steps_per_epoch == CIFAR_TRAIN // 512 == 97      # drop_last, as the demo's loader
  assert method.total_steps == 200 * 97
  assert c.evals.knn.every == c.checkpoint.every == method.steps_per_epoch
  lr = optim.learning_rate_schedule(c.optim.encoder, steps_per_epoch=97, total_steps=19400)
  steps = np.array([0, 96, 97, 193, 9700, 9796, 19399])
  epochs = steps // 97
  want = 0.06 * 0.5 * (1 + np.cos(np.pi * epochs / 200))   # adjust_learning_rate at each epoch
  np.testing.assert_allclose(np.asarray(lr(steps)), want, rtol=1e-6, atol=1e-9)
  assert math.isclose(float(lr(9796)), 0.03, rel_tol=1e-6)


def test_imagenet_cosine_is_main_mocos_per_epoch_curve():
  """main_moco.py --cos: lr * 0.5 * (1 + cos(pi * epoch / 200)), constant within an epoch."""
  c = imagenet_moco.get_config()
  spe = 1_281_167 // c.train.batch_size
  lr = optim.learning_rate_schedule(c.optim.encoder, steps_per_epoch=spe, total_steps=200 * spe)
  epochs = np.array([0, 1, 50, 100, 199])
  want = 0.03 * 0.5 * (1 + np.cos(np.pi * epochs / 200))
  for offset in (0, spe - 1):   # (atol: float32's cosine near pi, 2e-10 measured at epoch 199)
    np.testing.assert_allclose(np.asarray(lr(epochs * spe + offset)), want, rtol=1e-6, atol=1e-9)


def test_lincls_schedule_drops_at_epochs_60_and_80_of_100():
  """main_lincls.adjust_learning_rate: lr = 30 * 0.1 ** (epoch // 60 + epoch // 80) for epoch < 100."""
  c = imagenet_linear.get_config()
  spe = 1_281_167 // c.train.batch_size
  lr = optim.learning_rate_schedule(c.optim.classifier, steps_per_epoch=spe,
                                    total_steps=c.train.num_epochs * spe)
  epochs = np.array([0, 59, 60, 79, 80, 99])
  want = 30.0 * 0.1 ** (epochs // 60 + epochs // 80)
  for offset in (0, spe - 1):        # the first and the last step of each of those epochs
    np.testing.assert_allclose(np.asarray(lr(epochs * spe + offset)), want, rtol=1e-6)


def _write_cifar(root, dataset, n=6):
  """A stand-in in the official python-version layout (CIFAR cannot be downloaded here)."""
  rng = np.random.default_rng(0)
  if dataset == "cifar10":
    folder, files, labels = root / "cifar-10-batches-py", (
        *(f"data_batch_{i}" for i in range(1, 6)), "test_batch"), {b"labels": 10}
  else:
    folder, files, labels = root / "cifar-100-python", ("train", "test"), {
        b"fine_labels": 100, b"coarse_labels": 20}
  folder.mkdir()
  for name in files:
    batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
    batch.update({k: [int(x) for x in rng.integers(0, m, n)] for k, m in labels.items()})
    with open(folder / name, "wb") as f:
      pickle.dump(batch, f, protocol=2)


@pytest.mark.parametrize("dataset", MODULES)
def test_data_section_reads_cifar_and_state_has_the_recipes_shapes(dataset, tmp_path):
  c = MODULES[dataset][0].get_config()
  _write_cifar(tmp_path, dataset)
  c.data.data_dir = str(tmp_path)
  for split in (c.data.train_split, c.data.eval_split):
    source = sources.make_source(c.data, split)
    example = source[0]
    assert example["image"].shape == (c.aug.crop_size, c.aug.crop_size, c.data.channels)
    assert source.num_classes == c.data.num_classes
  method = trainers.get_method(c, CIFAR_TRAIN)
  state = jax.eval_shape(method.init_state, jax.random.PRNGKey(0))
  assert state.queue.shape == (4096, 128)
  backbone, head = state.params["backbone"], state.params["head"]
  stem = [leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(backbone)
          if len(leaf.shape) == 4 and leaf.shape[2] == 3]
  assert stem == [(3, 3, 3, 64)]                                  # the CIFAR stem's 3x3 conv
  assert jax.tree.map(lambda x: x.shape, head) == {"kernel": (512, 128), "bias": (128,)}
  v2 = trainers.get_method(MODULES[dataset][0].get_config("v2"), CIFAR_TRAIN)
  head = jax.eval_shape(v2.init_state, jax.random.PRNGKey(0)).params["head"]
  assert jax.tree.map(lambda x: x.shape, head) == {                # MoCo-v2's MLP 512-512-128
      "hidden": {"kernel": (512, 512), "bias": (512,)},
      "output": {"kernel": (512, 128), "bias": (128,)}}


@pytest.mark.parametrize("mlp_head", [False, True])
def test_knn_monitor_reads_the_head_outputs(mlp_head):
  """monitor_features='head': embed_fn gives the encoder's projection (the demo's net(x)),
  'backbone' the pooled features, both of the same forward pass on centre crops."""
  c = cifar10_moco.get_config()
  c.model.width, c.model.mlp_head = 8, mlp_head
  encoder = moco.build_encoder(c)
  u8 = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  x = images.normalize_input(c, images.to_float(u8))
  variables = encoder.init(jax.random.PRNGKey(0), x, train=False)
  pooled, projection = encoder.apply(variables, x, train=False)
  head = moco.make_embedder(c, features="head")(variables, u8)
  backbone = moco.make_embedder(c, features="backbone")(variables, u8)
  assert head.shape == (3, 128) and backbone.shape == (3, 64)
  # The jitted embedder vs the op-by-op apply: float32 rounding, 1.7e-6 measured on values ~1.
  np.testing.assert_allclose(np.asarray(head), np.asarray(projection), rtol=0, atol=2e-5)
  np.testing.assert_allclose(np.asarray(backbone), np.asarray(pooled), rtol=0, atol=2e-5)
