"""FID Inception: resize, shapes, weight conversion, parity with a PyTorch build of pytorch-fid's net."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nda_jax.models import inception
from nda_jax.models import inception_weights

# One compiled forward for every test: batch 2 of 32x32 images (resized to 299).
_apply = jax.jit(inception.InceptionV3FID().apply)
_IMAGES = np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)


def _torch_bilinear_reference(x: np.ndarray, out: int) -> np.ndarray:
  """NumPy F.interpolate(mode='bilinear', align_corners=False) of NHWC images."""
  def axis_taps(n_in):
    src = np.maximum((np.arange(out) + 0.5) * n_in / out - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, src - lo
  lo_h, hi_h, fh = axis_taps(x.shape[1])
  lo_w, hi_w, fw = axis_taps(x.shape[2])
  rows = x[:, lo_h] * (1 - fh)[None, :, None, None] + x[:, hi_h] * fh[None, :, None, None]
  return rows[:, :, lo_w] * (1 - fw)[None, None, :, None] + rows[:, :, hi_w] * fw[None, None, :, None]


@pytest.mark.parametrize("size_in,size_out", [(5, 13), (13, 5)])
def test_resize_matches_torch_bilinear(size_in, size_out):
  x = np.random.RandomState(1).normal(size=(2, size_in, size_in, 3)).astype(np.float32)
  got = np.asarray(inception.resize_bilinear(jnp.asarray(x), size_out))
  np.testing.assert_allclose(got, _torch_bilinear_reference(x, size_out), atol=1e-5)
  if size_out > size_in:  # jax.image.resize agrees only when up-scaling (it antialiases down)
    np.testing.assert_allclose(
        got, jax.image.resize(x, (2, size_out, size_out, 3), "bilinear"), atol=1e-5)


@pytest.mark.parametrize("size_in", [16, 28, 32, 400])
def test_clean_resize_is_pil_float_bicubic_per_channel(size_in):
  """clean-fid's 'clean': each channel a float32 PIL 'F' image, BICUBIC, clipped to [0, 255]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  size = inception.INPUT_SIZE
  images = np.random.RandomState(size_in).randint(0, 256, (2, size_in, size_in, 3)).astype(np.uint8)
  def pil_clean(image):
    channels = [np.asarray(Image.fromarray(image[:, :, c].astype(np.float32), mode="F")
                           .resize((size, size), resample=Image.BICUBIC)) for c in range(3)]
    return np.clip(np.stack(channels, -1), 0, 255)
  expected = np.stack([pil_clean(im) for im in images])
  got = (np.asarray(inception.resize_clean(jnp.asarray(images / 127.5 - 1, jnp.float32))) + 1) * 127.5
  # float32 accumulation vs PIL's double: measured max |diff| 5.1e-4 (16-32 px up) and
  # 3.5e-3 (400 px down) of 255.
  np.testing.assert_allclose(got, expected, atol=2e-3 if size_in < size else 1e-2)
  assert got.min() >= 0 and got.max() <= 255
  # A uint8 RGB resize (re-quantised) is not this computation.
  rgb = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC))
                  for im in images])
  assert np.abs(rgb - expected).max() > 0.25
  assert np.abs(got - np.asarray(inception.resize_bilinear(
      jnp.asarray(images, jnp.float32)))).max() > 1.0       # and not the bilinear mode


def _random_variables(seed: int = 0):
  """Well-scaled random weights in the Flax layout (He-initialised convs, benign BN)."""
  rng = np.random.RandomState(seed)
  flat = {}
  for key, shape in inception_weights.expected_shapes().items():
    if key.endswith("kernel"):
      flat[key] = rng.normal(0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
    elif key.endswith(("scale", "var")):
      flat[key] = rng.uniform(0.5, 1.5, shape)
    else:
      flat[key] = rng.normal(0, 0.1, shape)
  return inception_weights.unflatten({k: v.astype(np.float32) for k, v in flat.items()})


def test_output_shapes_and_logits():
  variables = _random_variables()
  out = _apply(variables, _IMAGES)
  assert out["pool"].shape == (2, inception.FEATURE_DIM)
  assert out["logits"].shape == out["logits_unbiased"].shape == (2, inception.NUM_CLASSES)
  assert np.all(np.isfinite(out["pool"])) and np.all(np.asarray(out["pool"]) >= 0)  # post-ReLU mean
  assert not np.allclose(out["pool"][0], out["pool"][1])
  np.testing.assert_allclose(out["logits"] - out["logits_unbiased"],
                             np.broadcast_to(variables["params"]["fc"]["bias"], (2, 1008)),
                             atol=1e-4)


def test_weights_npz_round_trip_and_errors(tmp_path):
  variables = _random_variables(1)
  path = str(tmp_path / "inception_fid.npz")
  inception_weights.save_npz(variables, path)
  loaded = inception_weights.load(path)
  jax.tree.map(np.testing.assert_array_equal, variables, loaded)
  with pytest.raises(FileNotFoundError, match="github.com/mseitzer/pytorch-fid/releases"):
    inception_weights.load(str(tmp_path / inception_weights.WEIGHTS_FILE))
  with pytest.raises(ValueError, match="not part of the FID Inception"):
    inception_weights.convert_state_dict({"AuxLogits.fc.weight": np.zeros((1000, 768))})
  with pytest.raises(ValueError, match="shape"):
    inception_weights.convert_state_dict({"fc.weight": np.zeros((1000, 2048))})
  with pytest.raises(ValueError, match="lacks"):
    inception_weights.convert_state_dict({"fc.bias": np.zeros(1008)})


# ------------------------------------------------------------------ torch parity
try:
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
except ImportError:
  torch = None


def _build_torch_fid_inception():
  """pytorch-fid's FID Inception (torchvision names), written from its description."""
  nn = torch.nn

  class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kw):
      super().__init__()
      self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
      self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
      return F.relu(self.bn(self.conv(x)))

  def avg(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

  class A(nn.Module):
    def __init__(self, cin, pool):
      super().__init__()
      self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
      self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
      self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
      self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
      self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
      self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
      self.branch_pool = BasicConv2d(cin, pool, kernel_size=1)

    def forward(self, x):
      return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                        self.branch_pool(avg(x))], 1)

  class B(nn.Module):
    def __init__(self, cin):
      super().__init__()
      self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
      self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
      self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
      self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
      return torch.cat([self.branch3x3(x),
                        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                        F.max_pool2d(x, 3, stride=2)], 1)

  class C(nn.Module):
    def __init__(self, cin, c7):
      super().__init__()
      self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
      self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
      self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
      self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
      self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
      self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
      self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
      self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
      self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
      self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
      b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
      bd = x
      for i in range(1, 6):
        bd = getattr(self, f"branch7x7dbl_{i}")(bd)
      return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg(x))], 1)

  class D(nn.Module):
    def __init__(self, cin):
      super().__init__()
      self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
      self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
      self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
      self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
      self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
      self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
      b7 = x
      for i in range(1, 5):
        b7 = getattr(self, f"branch7x7x3_{i}")(b7)
      return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                        F.max_pool2d(x, 3, stride=2)], 1)

  class E(nn.Module):
    def __init__(self, cin, max_pool):
      super().__init__()
      self.max_pool = max_pool
      self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
      self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
      self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
      self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
      self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
      self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
      self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
      self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
      self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
      b3 = self.branch3x3_1(x)
      bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
      pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg(x)
      return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                        self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
                        self.branch_pool(pooled)], 1)

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
      self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
      self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
      self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
      self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
      self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
      self.Mixed_6a = B(288)
      self.Mixed_6b, self.Mixed_6c = C(768, 128), C(768, 160)
      self.Mixed_6d, self.Mixed_6e = C(768, 160), C(768, 192)
      self.Mixed_7a = D(768)
      self.Mixed_7b, self.Mixed_7c = E(1280, False), E(2048, True)
      self.fc = nn.Linear(2048, 1008)

    def forward(self, x01):
      """pytorch-fid's InceptionV3.forward on [0, 1] NCHW images, plus the fc layer."""
      x = 2 * F.interpolate(x01, size=(299, 299), mode="bilinear", align_corners=False) - 1
      x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
      x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
      x = F.max_pool2d(x, 3, stride=2)
      for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
        x = getattr(self, f"Mixed_{name}")(x)
      pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
      return pool, self.fc(pool)

  return Net()


@pytest.mark.skipif(torch is None, reason="needs the torch extra")
def test_torch_parity_and_converter_cli(tmp_path):
  torch.manual_seed(0)
  net = _build_torch_fid_inception().eval()
  state = {}
  for k, v in net.state_dict().items():   # random weights with the real names and shapes
    if k.endswith("num_batches_tracked"):
      state[k] = v
    elif k.endswith((".bn.weight", "running_var")):
      state[k] = torch.rand_like(v) + 0.5
    elif k.endswith((".bn.bias", "running_mean", "fc.bias")):
      state[k] = 0.1 * torch.randn_like(v)
    else:
      fan_in = np.prod(v.shape[1:])
      state[k] = torch.randn_like(v) * np.sqrt(2.0 / fan_in)
  net.load_state_dict(state)
  pth = str(tmp_path / inception_weights.WEIGHTS_FILE)
  torch.save(state, pth)

  # The converter command writes an .npz that loads like the .pth.
  npz = str(tmp_path / "inception_fid.npz")
  subprocess.run([sys.executable, "-m", "nda_jax.importers.inception", f"--pth={pth}",
                  f"--out={npz}"], check=True, capture_output=True,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})
  variables = inception_weights.load(npz)
  jax.tree.map(np.testing.assert_array_equal, variables, inception_weights.load(pth))

  x01 = (_IMAGES + 1) / 2
  with torch.no_grad():
    pool_t, logits_t = net(torch.from_numpy(x01.transpose(0, 3, 1, 2).copy()))
  out = _apply(variables, _IMAGES)
  scale = np.abs(pool_t.numpy()).max()
  np.testing.assert_allclose(out["pool"], pool_t.numpy(), rtol=1e-4, atol=1e-4 * scale)
  np.testing.assert_allclose(out["logits"], logits_t.numpy(), rtol=1e-4,
                             atol=1e-4 * np.abs(logits_t.numpy()).max())


def test_evaluators_do_not_import_the_importers():
  """The weight loader sits below both: evaluating FID never loads an importer command."""
  code = ("import sys; import nda_jax.evaluators.fid; "
          "print(sorted(m for m in sys.modules if m.startswith('nda_jax.importers')))")
  out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
  assert out.strip() == "[]"
