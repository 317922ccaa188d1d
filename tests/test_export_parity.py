"""torchvision's own ResNet, loaded with an exported state_dict, computes the JAX
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


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_resnet_matches_every_stage(arch):
  model = resnet.resnet(arch, stem="imagenet", width=64)
  images = np.random.default_rng(1).standard_normal((2, 64, 64, 3)).astype(np.float32)
  variables = _random_variables(model, 64, seed=0)
  features, state = model.apply(variables, jnp.asarray(images), train=False,
                                capture_intermediates=True)
  inter = state["intermediates"]
  jax_stages = {s: np.asarray(inter[f"{s}_{n - 1}"]["__call__"][0])
                for s, n in zip(STAGES, model.stage_sizes)}

  net = getattr(torchvision.models, arch)(weights=None)
  net.fc = torch.nn.Identity()
  net.load_state_dict({k: torch.from_numpy(v)
                       for k, v in backbone.to_torchvision(variables).items()}, strict=True)
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
