"""facebookresearch/moco checkpoints -> Flax: parity with a PyTorch ResNet of torchvision's layout.

The PyTorch side is a small ResNet written for this test with torchvision's
module names and semantics (v1.5 bottleneck, `downsample` = conv + BN, BN eps
1e-5) and MoCo-v2's MLP head `fc = Sequential(Linear, ReLU, Linear)`;
torchvision itself is not importable next to the CPU torch wheel here.
"""
import copy

import numpy as np
import pytest

import jax

from nda_jax.importers import moco_pytorch
from nda_jax.models import resnet

torch = pytest.importorskip("torch")
tnn = torch.nn

Q = "module.encoder_q."


# ---------------------------------------------------------------- PyTorch reference
def _bn(channels):
  return tnn.BatchNorm2d(channels)


class TorchBlock(tnn.Module):
  """BasicBlock (expansion 1) or v1.5 Bottleneck (expansion 4, stride in the 3x3)."""

  def __init__(self, bottleneck, cin, planes, stride):
    super().__init__()
    self.bottleneck = bottleneck
    cout = planes * (4 if bottleneck else 1)
    if bottleneck:
      self.conv1, self.bn1 = tnn.Conv2d(cin, planes, 1, bias=False), _bn(planes)
      self.conv2 = tnn.Conv2d(planes, planes, 3, stride, 1, bias=False)
      self.bn2 = _bn(planes)
      self.conv3, self.bn3 = tnn.Conv2d(planes, cout, 1, bias=False), _bn(cout)
    else:
      self.conv1 = tnn.Conv2d(cin, planes, 3, stride, 1, bias=False)
      self.bn1 = _bn(planes)
      self.conv2, self.bn2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False), _bn(planes)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))

  def forward(self, x):
    relu = torch.relu
    h = relu(self.bn1(self.conv1(x)))
    h = self.bn2(self.conv2(h))
    if self.bottleneck:
      h = self.bn3(self.conv3(relu(h)))
    return relu(h + (x if self.downsample is None else self.downsample(x)))


class TorchMocoResNet(tnn.Module):
  """torchvision ResNet (names conv1, bn1, layer1..4, fc) with MoCo-v2's MLP head as fc."""

  def __init__(self, stage_sizes, bottleneck, width, stem, head_dim):
    super().__init__()
    imagenet = stem == "imagenet"
    self.conv1 = tnn.Conv2d(3, width, 7 if imagenet else 3, 2 if imagenet else 1,
                            3 if imagenet else 1, bias=False)
    self.bn1 = _bn(width)
    self.maxpool = tnn.MaxPool2d(3, 2, 1) if imagenet else tnn.Identity()
    cin = width
    for i, n in enumerate(stage_sizes):
      blocks = []
      for j in range(n):
        blocks.append(TorchBlock(bottleneck, cin, width * 2 ** i, 2 if i > 0 and j == 0 else 1))
        cin = width * 2 ** i * (4 if bottleneck else 1)
      setattr(self, f"layer{i + 1}", tnn.Sequential(*blocks))
    self.num_stages = len(stage_sizes)
    self.fc = tnn.Sequential(tnn.Linear(cin, cin), tnn.ReLU(), tnn.Linear(cin, head_dim))

  def forward(self, x):
    h = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    for i in range(self.num_stages):
      h = getattr(self, f"layer{i + 1}")(h)
    features = h.mean((2, 3))
    return features, self.fc(features)


def _randomize(module, seed):
  """Random weights, BN affine and running stats (not the init), scaled to keep activations O(1)."""
  gen = torch.Generator().manual_seed(seed)
  uniform = lambda t: t.copy_(0.5 + torch.rand(t.shape, generator=gen))
  normal = lambda t, std: t.copy_(std * torch.randn(t.shape, generator=gen))
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, tnn.BatchNorm2d):
        uniform(m.weight), normal(m.bias, 0.1), normal(m.running_mean, 0.1), uniform(m.running_var)
        m.num_batches_tracked.fill_(7)
      elif isinstance(m, (tnn.Conv2d, tnn.Linear)):
        normal(m.weight, np.sqrt(2 / m.weight[0].numel()))  # He scale over fan_in
        if m.bias is not None:
          normal(m.bias, 0.1)
  return module.eval()


def _moco_state_dict(model):
  """main_moco's layout: query encoder, a key encoder and the queue under 'module.'."""
  sd = {Q + k: v.numpy().copy() for k, v in model.state_dict().items()}
  sd.update({k.replace("encoder_q", "encoder_k"): v + 1 for k, v in sd.items()})
  sd["module.queue"] = np.ones((model.fc[2].out_features, 16), np.float32)
  sd["module.queue_ptr"] = np.zeros((1,), np.int64)
  return sd


def _flax_encoder(stage_sizes, block, width, stem, head_dim):
  backbone = resnet.ResNet(stage_sizes=stage_sizes, block=block, stem=stem, width=width)
  return resnet.MocoEncoder(backbone=backbone, head_dim=head_dim)


# resnet18 at width 8 with the CIFAR stem; a bottleneck net with the ImageNet stem, one
# non-downsampling bottleneck in stage 2.
CASES = {"basic": ((2, 2, 2, 2), "basic", 8, "cifar", 16),
         "bottleneck": ((1, 2, 1, 1), "bottleneck", 8, "imagenet", 32)}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
  stage_sizes, block, width, stem, image_size = CASES[request.param]
  model = _randomize(TorchMocoResNet(stage_sizes, block == "bottleneck", width, stem, 24), seed=1)
  encoder = _flax_encoder(stage_sizes, block, width, stem, head_dim=24)
  images = np.random.default_rng(2).standard_normal((3, image_size, image_size, 3))
  return model, encoder, images.astype(np.float32)


def _torch_outputs(model, images):
  with torch.no_grad():
    return [t.numpy() for t in model(torch.from_numpy(images.transpose(0, 3, 1, 2)))]


def _assert_close(got, want):
  scale = np.abs(want).max()
  assert scale > 0.1  # a non-trivial comparison
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * scale)


def test_eval_outputs_match_pytorch(case):
  model, encoder, images = case
  variables = moco_pytorch.convert_encoder(_moco_state_dict(model), encoder)
  features, projection = jax.jit(lambda x: encoder.apply(variables, x, train=False))(images)
  want_features, want_projection = _torch_outputs(model, images)
  _assert_close(features, want_features)
  _assert_close(projection, want_projection)

  # The key encoder converts the same way from its own prefix (its weights differ: +1).
  key_vars = moco_pytorch.convert_encoder(_moco_state_dict(model), encoder,
                                          prefix="module.encoder_k.")
  np.testing.assert_array_equal(key_vars["params"]["head"]["output"]["bias"],
                                np.asarray(variables["params"]["head"]["output"]["bias"]) + 1)


def test_moco_v1_linear_head_converts(case):
  """MoCo v1 / the CIFAR demo: `fc` one Linear(F, dim) -> MocoEncoder(mlp_head=False)."""
  model, encoder, images = case
  model = copy.deepcopy(model)
  model.fc = _randomize(tnn.Linear(model.fc[0].in_features, 24), seed=3)
  sd = {Q + k: v.numpy().copy() for k, v in model.state_dict().items()}
  v1 = encoder.clone(mlp_head=False)
  variables = moco_pytorch.convert_encoder(sd, v1)
  features, projection = jax.jit(lambda x: v1.apply(variables, x, train=False))(images)
  want_features, want_projection = _torch_outputs(model, images)
  _assert_close(features, want_features)
  _assert_close(projection, want_projection)
  with pytest.raises(ValueError, match="fc"):   # An MLP head does not fit a linear one.
    moco_pytorch.convert_encoder(_moco_state_dict(case[0]), v1)


def test_lincls_state_dict_converts_into_the_backbone(case):
  """main_lincls output ('module.' + a linear classifier fc) -> the bare ResNet."""
  model, encoder, images = case
  sd = {"module." + k: v.numpy() for k, v in model.state_dict().items() if not k.startswith("fc.")}
  features = model.fc[0].in_features
  sd["module.fc.weight"] = np.zeros((10, features), np.float32)
  sd["module.fc.bias"] = np.zeros((10,), np.float32)
  variables = moco_pytorch.convert_encoder(sd, encoder.backbone, prefix="module.")
  got = jax.jit(lambda x: encoder.backbone.apply(variables, x, train=False))(images)
  _assert_close(got, _torch_outputs(model, images)[0])
  with pytest.raises(ValueError, match="converts into the backbone"):
    moco_pytorch.convert_encoder(sd, encoder, prefix="module.")


def test_every_key_is_used_and_misfits_raise():
  stage_sizes, block, width, stem, _ = CASES["basic"]
  model = TorchMocoResNet(stage_sizes, False, width, stem, 24)
  encoder = _flax_encoder(stage_sizes, block, width, stem, head_dim=24)
  sd = _moco_state_dict(model)
  variables = moco_pytorch.convert_encoder(sd, encoder)
  # Everything but num_batches_tracked (not a variable) lands in the Flax tree, once.
  used = [v for k, v in sd.items() if k.startswith(Q) and not k.endswith("num_batches_tracked")]
  assert sum(v.size for v in jax.tree.leaves(variables)) == sum(v.size for v in used)

  extra = Q + "layer4.1.conv3.weight"
  with pytest.raises(ValueError, match=rf"unused keys \['{extra}'\]"):
    moco_pytorch.convert_encoder({**sd, extra: np.zeros((1,))}, encoder)
  gone = Q + "layer3.0.downsample.1.running_var"
  with pytest.raises(ValueError, match=rf"missing keys \['{gone}'\]"):
    moco_pytorch.convert_encoder({k: v for k, v in sd.items() if k != gone}, encoder)
  with pytest.raises(ValueError, match=r"conv1.weight: \(3, 3, 3, 8\) \(as Flax\) != model's "
                                       r"\(7, 7, 3, 8\)"):
    moco_pytorch.convert_encoder(sd, encoder.clone(backbone=encoder.backbone.clone(
        stem="imagenet")))
  with pytest.raises(ValueError, match="head_dim"):
    moco_pytorch.convert_encoder(sd, encoder.clone(head_dim=12))
  with pytest.raises(ValueError, match=r"no state_dict key starts with 'encoder_q.'; keys start "
                                       r"with \['module'\]"):
    moco_pytorch.convert_encoder(sd, encoder, prefix="encoder_q.")


def test_moco_v2_resnet50_key_set():
  """The full-size ResNet-50 MoCo-v2 query encoder: torchvision's 320 keys - fc + the MLP head."""
  model = TorchMocoResNet((3, 4, 6, 3), True, 64, "imagenet", 128)
  sd = _moco_state_dict(model)
  query_keys = [k for k in sd if k.startswith(Q)]
  assert len(query_keys) == 320 - 2 + 4
  for key in ("conv1.weight", "layer1.0.downsample.0.weight", "layer4.2.bn3.num_batches_tracked",
              "fc.0.weight", "fc.2.bias"):
    assert Q + key in sd
  encoder = resnet.build_encoder("resnet50")
  variables = moco_pytorch.convert_encoder(sd, encoder)
  assert sum(v.size for v in jax.tree.leaves(variables["params"])) == sum(
      p.numel() for p in model.parameters())
  np.testing.assert_array_equal(variables["params"]["backbone"]["layer2_0"]["conv2"]["kernel"],
                                sd[Q + "layer2.0.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables["batch_stats"]["backbone"]["layer4_2"]["bn3"]["var"],
                                sd[Q + "layer4.2.bn3.running_var"])


def test_load_checkpoint(tmp_path):
  model = TorchMocoResNet((1, 1, 1, 1), False, 4, "cifar", 8)
  sd = model.state_dict()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
  checkpoint = {"epoch": 200, "arch": "resnet50", "optimizer": optimizer.state_dict(),
                "state_dict": {Q + k: v for k, v in sd.items()}}
  torch.save(checkpoint, tmp_path / "moco.pth.tar")
  torch.save(sd, tmp_path / "bare.pth")
  torch.save({"weights": [1, 2]}, tmp_path / "other.pth")
  loaded = moco_pytorch.load_checkpoint(str(tmp_path / "moco.pth.tar"))
  assert sorted(loaded) == sorted(Q + k for k in sd)
  np.testing.assert_array_equal(loaded[Q + "layer1.0.conv2.weight"],
                                sd["layer1.0.conv2.weight"].numpy())
  assert sorted(moco_pytorch.load_checkpoint(str(tmp_path / "bare.pth"))) == sorted(sd)
  with pytest.raises(ValueError, match="neither a state_dict"):
    moco_pytorch.load_checkpoint(str(tmp_path / "other.pth"))
