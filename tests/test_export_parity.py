"""torchvision's own ResNet, and for the widths and stems it lacks the project's
`detection.torch_resnet`, loaded with an exported state_dict, compute the JAX
backbone's features at every stage (eval mode). Needs torch + torchvision (the
`detection` extra)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nda_jax.exporters import backbone
from nda_jax.models import resnet

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
from nda_jax.detection import torch_resnet  # pylint: disable=g-import-not-at-top,wrong-import-position

STAGES = ("layer1", "layer2", "layer3", "layer4")


def _random_variables(model, image_size, seed):
  """He-scaled kernels, BN affine and running stats away from the init's (1, 0, 0, 1)."""
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), train=False))
  rng = np.random.default_rng(seed)

  def sample(path, s):
    name = path[-1].key
    if name == "kernel":
      return rng.normal(0, np.sqrt(2 / np.prod(s.shape[:3])), s.shape).astype(np.float32)
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    return rng.normal(0, 0.1, s.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(sample, shapes)


def _assert_stages_match(model, net, variables, image_size):
  """`net` (eval mode) against the JAX `model` at every stage and the pooled features."""
  images = np.random.default_rng(1).standard_normal(
      (2, image_size, image_size, 3)).astype(np.float32)
  features, state = model.apply(variables, jnp.asarray(images), train=False,
                                capture_intermediates=True)
  inter = state["intermediates"]
  jax_stages = {s: np.asarray(inter[f"{s}_{n - 1}"]["__call__"][0])
                for s, n in zip(STAGES, model.stage_sizes)}
  net.eval()
  torch_stages = {}
  for s in STAGES:
    getattr(net, s).register_forward_hook(
        lambda m, i, o, s=s: torch_stages.__setitem__(s, o.detach().numpy().transpose(0, 2, 3, 1)))
  with torch.no_grad():
    torch_features = net(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()

  # Float32 sums in a different order: measured <= 2.1e-6 of a stage's largest value
  # (resnet18 1.4e-6 at layer4, resnet50 2.1e-6 at layer3); bound 1e-5.
  for s in STAGES:
    scale = np.abs(jax_stages[s]).max()
    np.testing.assert_allclose(torch_stages[s], jax_stages[s], rtol=0, atol=1e-5 * scale,
                               err_msg=s)
  np.testing.assert_allclose(torch_features, np.asarray(features), rtol=0,
                             atol=1e-5 * np.abs(features).max())


def _exported(variables):
  return {k: torch.from_numpy(v) for k, v in backbone.to_torchvision(variables).items()}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_resnet_matches_every_stage(arch):
  model = resnet.resnet(arch, stem="imagenet", width=64)
  variables = _random_variables(model, 64, seed=0)
  net = getattr(torchvision.models, arch)(weights=None)
  net.fc = torch.nn.Identity()
  net.load_state_dict(_exported(variables), strict=True)
  _assert_stages_match(model, net, variables, 64)


@pytest.mark.parametrize("arch,stem,width,size", [
    ("resnet18", "cifar", 16, 16),        # configs/demo_moco.py's backbone
    ("resnet50", "cifar", 8, 32), ("resnet34", "imagenet", 24, 64)])
def test_project_resnet_matches_every_stage(arch, stem, width, size):
  """The widths / stems torchvision's class lacks: the module is read off the file."""
  model = resnet.resnet(arch, stem=stem, width=width)
  variables = _random_variables(model, size, seed=2)
  state_dict = _exported(variables)
  assert torch_resnet.describe(state_dict) == (arch, stem, width)
  net = torch_resnet.from_state_dict(state_dict)
  _assert_stages_match(model, net, variables, size)


def test_project_resnet_has_torchvisions_keys_and_fpn_takes_it():
  """At torchvision's stem and width the two classes have one state_dict layout, and
  BackboneWithFPN builds on the project's module (the demo's backbone)."""
  from torchvision.models.detection import backbone_utils  # pylint: disable=g-import-not-at-top
  for arch in ("resnet18", "resnet50"):
    ours = torch_resnet.ResNet(arch).state_dict()
    theirs = getattr(torchvision.models, arch)(weights=None).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {
        k: v.shape for k, v in theirs.items() if not k.startswith("fc.")}
  body = torch_resnet.ResNet("resnet18", stem="cifar", width=16)
  fpn = backbone_utils.BackboneWithFPN(
      body, return_layers={s: str(i) for i, s in enumerate(STAGES)},
      in_channels_list=body.stage_channels, out_channels=32)
  out = fpn(torch.zeros(1, 3, 32, 32))
  assert [tuple(v.shape) for v in out.values()] == [
      (1, 32, 32, 32), (1, 32, 16, 16), (1, 32, 8, 8), (1, 32, 4, 4), (1, 32, 2, 2)]


def test_describe_refuses_what_is_no_backbone():
  with pytest.raises(ValueError, match="no 'conv1.weight'"):
    torch_resnet.describe({"fc.weight": torch.zeros(2, 2)})
  state_dict = _exported(_random_variables(resnet.resnet("resnet18", stem="cifar", width=4), 16, 0))
  del state_dict["layer2.0.bn1.running_mean"]
  with pytest.raises(ValueError, match="Missing key"):
    torch_resnet.from_state_dict(state_dict)
