"""ResNet / MoCo encoder: shapes, torchvision parameter counts, init, BN groups and eval mode."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from nda_jax.models import batch_norm, resnet

# torchvision's resnet18/34/50 with their 1000-class fc (torchvision model docs).
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_init(module, image_shape):
  x = jax.ShapeDtypeStruct(image_shape, jnp.float32)
  return jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), x)


@pytest.mark.parametrize("arch", sorted(resnet.ARCHS))
@pytest.mark.parametrize("stem,size,width", [("imagenet", 64, 8), ("cifar", 32, 16)])
def test_output_shapes(arch, stem, size, width):
  encoder = resnet.build_encoder(arch, stem=stem, width=width, head_dim=24)
  expansion = 4 if arch == "resnet50" else 1
  x = jax.ShapeDtypeStruct((3, size, size, 3), jnp.float32)
  variables = _abstract_init(encoder, x.shape)
  (features, projection), _ = jax.eval_shape(
      lambda v, x: encoder.apply(v, x, train=True, mutable=["batch_stats"]), variables, x)
  assert features.shape == (3, 8 * width * expansion) == (3, encoder.backbone.num_features)
  assert projection.shape == (3, 24)
  assert features.dtype == projection.dtype == jnp.float32
  assert set(variables["params"]) == {"backbone", "head"}
  assert set(variables["batch_stats"]) == {"backbone"}


@pytest.mark.parametrize("arch", sorted(resnet.ARCHS))
def test_param_counts_match_torchvision(arch):
  """Width 64 (abstract init only): backbone + a 1000-class fc = torchvision's count."""
  encoder = resnet.build_encoder(arch)
  params = _abstract_init(encoder, (1, 224, 224, 3))["params"]
  features = encoder.backbone.num_features
  assert features == (2048 if arch == "resnet50" else 512)
  assert _count(params["backbone"]) + features * 1000 + 1000 == TORCHVISION_PARAMS[arch]
  assert _count(params["head"]) == features * features + features + features * 128 + 128


def test_unknown_arch_and_stem_raise():
  with pytest.raises(ValueError, match=r"valid choices: \['resnet18', 'resnet34', 'resnet50'\]"):
    resnet.build_encoder("resnet101")
  with pytest.raises(ValueError, match="valid choices: .'imagenet', 'cifar'."):
    _abstract_init(resnet.resnet18(stem="mnist", width=8), (1, 32, 32, 3))


def test_init_follows_torchvision():
  """Kaiming-normal fan_out convs, BN scale 1 / bias 0; zero_init_residual zeroes the last BN."""
  backbone = resnet.ResNet(stage_sizes=(1,), block="bottleneck", stem="cifar", width=32,
                           zero_init_residual=True)
  params = jax.jit(lambda x: backbone.init(jax.random.key(1), x, train=False))(
      jnp.zeros((1, 8, 8, 3)))["params"]
  for kernel, fan_out in [(params["conv1"]["kernel"], 9 * 32),               # 3x3, 3 -> 32
                          (params["layer1_0"]["conv3"]["kernel"], 128)]:      # 1x1, 32 -> 128
    kernel = np.asarray(kernel)
    np.testing.assert_allclose(kernel.std(), np.sqrt(2 / fan_out), rtol=0.05)
    assert np.abs(kernel).max() > 3 * np.sqrt(2 / fan_out)  # not truncated at 2 sigma
  assert "bias" not in params["layer1_0"]["conv3"]
  block = params["layer1_0"]
  np.testing.assert_array_equal(block["bn3"]["scale"], 0)
  for bn in (params["bn1"], block["bn1"], block["bn2"], block["downsample_bn"]):
    np.testing.assert_array_equal(bn["scale"], 1)
    np.testing.assert_array_equal(bn["bias"], 0)


def _random_variables(module, x, seed):
  """Kaiming-scaled random weights in NumPy, BN affine off its init values.

  (A jitted `init` of a whole ResNet takes ~45 s to compile on XLA:CPU; the
  init functions themselves are checked in `test_init_follows_torchvision`.)
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_out = np.prod(leaf.shape) // leaf.shape[-2]
      return (rng.standard_normal(leaf.shape) * np.sqrt(2 / fan_out)).astype(np.float32)
    if name == "scale":
      return (1 + 0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)
    if name in ("bias", "mean"):
      return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
    assert name == "var", path
    return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, _abstract_init(module, x.shape))


@pytest.fixture(scope="module")
def tiny_r18():
  """resnet18 at width 8 (CIFAR stem), random variables, 4 16x16 images."""
  encoder = resnet.build_encoder("resnet18", stem="cifar", width=8, head_dim=16)
  x = jax.random.normal(jax.random.key(2), (4, 16, 16, 3))
  return encoder, _random_variables(encoder, x, seed=3), x


def _other_images_but(x, keep):
  """x with every example but those in `keep` replaced by other images."""
  other = jax.random.normal(jax.random.key(9), x.shape) * 2 + 1
  return x.at[keep:].set(other[keep:])


def test_eval_mode_uses_running_averages(tiny_r18):
  """Eval: an example's output does not depend on the rest of the batch (training: it does)."""
  encoder, variables, x = tiny_r18
  evaluate = jax.jit(lambda x: encoder.apply(variables, x, train=False))
  x_other = _other_images_but(x, keep=1)
  for a, b in zip(evaluate(x), evaluate(x_other)):
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert np.abs(a[1:] - b[1:]).max() > 1e-3
  train = jax.jit(lambda x: encoder.apply(variables, x, train=True, mutable=["batch_stats"])[0])
  assert np.abs(train(x)[0][0] - train(x_other)[0][0]).max() > 1e-3


def test_groups_reach_every_batch_norm(tiny_r18):
  """Examples 0 and 1 in their own BN group do not see examples 2 and 3, else they do."""
  encoder, variables, x = tiny_r18
  x_other = _other_images_but(x, keep=2)

  @jax.jit
  def train(x, ids):
    groups = batch_norm.BNGroups(ids=ids, num=2)
    return encoder.apply(variables, x, train=True, groups=groups, mutable=["batch_stats"])[0]

  apart, mixed = jnp.array([0, 0, 1, 1]), jnp.array([0, 1, 0, 1])
  for a, b in zip(train(x, apart), train(x_other, apart)):
    np.testing.assert_allclose(a[:2], b[:2], rtol=1e-5, atol=1e-6)
  for a, b in zip(train(x, mixed), train(x_other, mixed)):
    assert np.abs(a[:2] - b[:2]).max() > 1e-3


def test_bfloat16_activations(tiny_r18):
  encoder, variables, x = tiny_r18
  bf16 = resnet.build_encoder("resnet18", stem="cifar", width=8, head_dim=16, dtype=jnp.bfloat16)
  assert jax.tree.map(lambda a: a.dtype, _abstract_init(bf16, x.shape)) == jax.tree.map(
      lambda a: a.dtype, variables)  # float32 params and stats
  got = jax.jit(lambda x: bf16.apply(variables, x, train=False))(x)
  want = jax.jit(lambda x: encoder.apply(variables, x, train=False))(x)
  for g, w in zip(got, want):
    assert g.dtype == jnp.float32
    assert np.abs(g - w).max() < 0.05 * np.abs(w).max()
