"""BigGAN-PyTorch state_dicts -> Flax: parity with a PyTorch model of the official architecture.

The PyTorch side is a minimal re-implementation of ermongroup/NDA `BigGAN_new`
(G and D) with the official module names, buffers (`u0`, `sv0`, `stored_mean`,
`stored_var`) and spectral-norm / batch-norm semantics, written for this test.
"""
import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from nda_jax import trainers
from nda_jax.importers import biggan_pytorch
from nda_jax.models import biggan
from nda_jax.trainers import gan

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

SN_EPS = 1e-8
REPO = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- PyTorch reference (BigGAN_new)
class _SN:
  """One power iteration per forward from the stored u; only training stores u and sv."""

  def _init_sn(self, num_outputs):
    self.register_buffer("u0", torch.randn(1, num_outputs))
    self.register_buffer("sv0", torch.ones(1))

  def w_(self):
    w_mat = self.weight.view(self.weight.size(0), -1)
    with torch.no_grad():
      v = F.normalize(self.u0 @ w_mat, eps=SN_EPS)
      u = F.normalize(v @ w_mat.t(), eps=SN_EPS)
      if self.training:
        self.u0[:] = u
    sv = torch.squeeze(v @ w_mat.t() @ u.t())
    if self.training:
      with torch.no_grad():
        self.sv0[:] = sv
    return self.weight / sv


class SNConv2d(tnn.Conv2d, _SN):

  def __init__(self, cin, cout, kernel_size=3, padding=1):
    tnn.Conv2d.__init__(self, cin, cout, kernel_size, padding=padding)
    self._init_sn(cout)

  def forward(self, x):
    return F.conv2d(x, self.w_(), self.bias, padding=self.padding)


class SNLinear(tnn.Linear, _SN):

  def __init__(self, cin, cout):
    tnn.Linear.__init__(self, cin, cout)
    self._init_sn(cout)

  def forward(self, x):
    return F.linear(x, self.w_(), self.bias)


class SNEmbedding(tnn.Embedding, _SN):

  def __init__(self, n, dim):
    tnn.Embedding.__init__(self, n, dim)
    self._init_sn(n)

  def forward(self, y):
    return F.embedding(y, self.w_())


class CCBN(tnn.Module):

  def __init__(self, channels, n_classes):
    super().__init__()
    self.gain = tnn.Embedding(n_classes, channels)
    self.bias = tnn.Embedding(n_classes, channels)
    self.register_buffer("stored_mean", torch.zeros(channels))
    self.register_buffer("stored_var", torch.ones(channels))

  def forward(self, x, y):
    gain = (1 + self.gain(y))[:, :, None, None]
    bias = self.bias(y)[:, :, None, None]
    out = F.batch_norm(x, self.stored_mean, self.stored_var, None, None, self.training, 0.1, 1e-5)
    return out * gain + bias


class BN(tnn.Module):

  def __init__(self, channels):
    super().__init__()
    self.gain = tnn.Parameter(torch.ones(channels))
    self.bias = tnn.Parameter(torch.zeros(channels))
    self.register_buffer("stored_mean", torch.zeros(channels))
    self.register_buffer("stored_var", torch.ones(channels))

  def forward(self, x):
    return F.batch_norm(x, self.stored_mean, self.stored_var, self.gain, self.bias,
                        self.training, 0.1, 1e-5)


class GBlock(tnn.Module):

  def __init__(self, cin, cout, n_classes):
    super().__init__()
    self.conv1, self.conv2 = SNConv2d(cin, cout), SNConv2d(cout, cout)
    self.conv_sc = SNConv2d(cin, cout, kernel_size=1, padding=0)
    self.bn1, self.bn2 = CCBN(cin, n_classes), CCBN(cout, n_classes)

  def forward(self, x, y):
    h = F.interpolate(F.relu(self.bn1(x, y)), scale_factor=2)
    x = F.interpolate(x, scale_factor=2)
    h = self.conv2(F.relu(self.bn2(self.conv1(h), y)))
    return h + self.conv_sc(x)


class TorchG(tnn.Module):

  def __init__(self, ch, n_classes, n_blocks, dim_z=128, bottom=4):
    super().__init__()
    c = 4 * ch
    self.bottom = bottom
    self.linear = SNLinear(dim_z, c * bottom ** 2)
    self.blocks = tnn.ModuleList([tnn.ModuleList([GBlock(c, c, n_classes)]) for _ in range(n_blocks)])
    self.output_layer = tnn.Sequential(BN(c), tnn.ReLU(), SNConv2d(c, 3))

  def forward(self, z, y):
    h = self.linear(z).view(z.shape[0], -1, self.bottom, self.bottom)
    for (block,) in self.blocks:
      h = block(h, y)
    return torch.tanh(self.output_layer(h))


class DBlock(tnn.Module):

  def __init__(self, cin, cout, preactivation, downsample):
    super().__init__()
    self.preactivation, self.downsample = preactivation, downsample
    self.conv1, self.conv2 = SNConv2d(cin, cout), SNConv2d(cout, cout)
    self.learnable_sc = cin != cout or downsample
    if self.learnable_sc:
      self.conv_sc = SNConv2d(cin, cout, kernel_size=1, padding=0)

  def shortcut(self, x):
    pool = (lambda t: F.avg_pool2d(t, 2)) if self.downsample else (lambda t: t)
    if not self.learnable_sc:
      return x
    return pool(self.conv_sc(x)) if self.preactivation else self.conv_sc(pool(x))

  def forward(self, x):
    h = F.relu(x) if self.preactivation else x
    h = self.conv2(F.relu(self.conv1(h)))
    if self.downsample:
      h = F.avg_pool2d(h, 2)
    return h + self.shortcut(x)


class TorchD(tnn.Module):

  def __init__(self, ch, n_classes, downsample):
    super().__init__()
    c = 4 * ch
    cins = [3] + [c] * (len(downsample) - 1)
    self.blocks = tnn.ModuleList([tnn.ModuleList([DBlock(cin, c, i > 0, down)])
                                  for i, (cin, down) in enumerate(zip(cins, downsample))])
    self.linear = SNLinear(c, 1)
    self.embed = SNEmbedding(n_classes, c)

  def forward(self, x, y):
    h = x
    for (block,) in self.blocks:
      h = block(h)
    h = torch.sum(F.relu(h), [2, 3])
    return self.linear(h) + torch.sum(self.embed(y) * h, 1, keepdim=True)


# ---------------------------------------------------------------- helpers
def _randomize(module, seed):
  """Random weights and buffers (not the init) so that every conversion detail shows."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in module.state_dict().items():
      if name.endswith("stored_var"):
        t.copy_(0.5 + torch.rand(t.shape, generator=gen))
      elif name.endswith("sv0"):
        t.copy_(1.0 + torch.rand(t.shape, generator=gen))
      else:
        scale = 1.0 if name.endswith("u0") else 0.2
        t.copy_(scale * torch.randn(t.shape, generator=gen))
  return module


def _numpy_state(module):
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _close_trees(a, b, rtol, atol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol, atol), a, b)


def _torch_grads(module, convert, flax_module):
  """PyTorch .grad of every parameter, laid out as Flax params by the same conversion."""
  grads = {k: p.grad.numpy() for k, p in module.named_parameters()}
  return convert({**_numpy_state(module), **grads}, flax_module)["params"]


def _close_grads(got, want):
  scale = max(float(np.abs(w).max()) for w in jax.tree.leaves(want))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-3, atol=1e-4 * scale),
               got, want)


CH, N_CLASSES, BATCH = 4, 3, 6


# Gradients are compared at one resolution only: each check costs seconds of XLA:CPU time.
@pytest.mark.parametrize("resolution,check_grads", [(16, True), (32, False)])
def test_generator_parity(resolution, check_grads):
  n_blocks = len(biggan.generator_arch(resolution)["out_mult"])
  tg = _randomize(TorchG(CH, N_CLASSES, n_blocks), seed=resolution)
  before = _numpy_state(tg)
  g = biggan.Generator(ch=CH, n_classes=N_CLASSES, resolution=resolution)
  variables = biggan_pytorch.convert_generator(before, g)

  rng = np.random.default_rng(0)
  z = rng.standard_normal((BATCH, 128)).astype(np.float32)
  y = rng.integers(0, N_CLASSES, BATCH)
  weights = rng.standard_normal((BATCH, resolution, resolution, 3)).astype(np.float32)
  tg.train()
  out = tg(torch.from_numpy(z), torch.from_numpy(y))
  (out * torch.from_numpy(weights.transpose(0, 3, 1, 2))).sum().backward()
  want = out.detach().numpy().transpose(0, 2, 3, 1)

  def loss(params):
    x, updates = g.apply({**variables, "params": params}, jnp.asarray(z), jnp.asarray(y, jnp.int32),
                         train=True, mutable=["batch_stats"])
    return jnp.sum(x * weights), (x, updates)

  if check_grads:
    grads, (got, updates) = jax.grad(loss, has_aux=True)(variables["params"])
  else:
    _, (got, updates) = loss(variables["params"])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
  # The training forward stores the same new u / sigma and BN running averages.
  after = biggan_pytorch.convert_generator(_numpy_state(tg), g)
  _close_trees(updates["batch_stats"], after["batch_stats"], rtol=1e-4, atol=1e-5)
  if check_grads:  # including the path through sigma (u and v held constant)
    _close_grads(grads, _torch_grads(tg, biggan_pytorch.convert_generator, g))

  # Eval: running averages and no SN update on both sides.
  tg.eval()
  with torch.no_grad():
    want_eval = tg(torch.from_numpy(z), torch.from_numpy(y)).numpy().transpose(0, 2, 3, 1)
  got_eval = g.clone(sample_with_batch_stats=False).apply(after, jnp.asarray(z),
                                                          jnp.asarray(y, jnp.int32), train=False)
  np.testing.assert_allclose(np.asarray(got_eval), want_eval, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("resolution,check_grads", [(16, True), (32, False)])
def test_discriminator_parity(resolution, check_grads):
  down = biggan.discriminator_arch(resolution)["downsample"]
  td = _randomize(TorchD(CH, N_CLASSES, down), seed=10 + resolution)
  d = biggan.Discriminator(ch=CH, n_classes=N_CLASSES, resolution=resolution)
  variables = biggan_pytorch.convert_discriminator(_numpy_state(td), d)

  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (BATCH, 3, resolution, resolution)).astype(np.float32)
  y = rng.integers(0, N_CLASSES, BATCH)
  td.train()
  out = td(torch.from_numpy(x), torch.from_numpy(y))[:, 0]
  out.sum().backward()
  want = out.detach().numpy()

  def logits(params):
    out, updates = d.apply({**variables, "params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                           jnp.asarray(y, jnp.int32), train=True, mutable=["batch_stats"])
    return out.sum(), (out, updates)

  if check_grads:
    grads, (got, updates) = jax.grad(logits, has_aux=True)(variables["params"])
  else:
    _, (got, updates) = logits(variables["params"])
  assert np.abs(want).max() > 1.0  # a non-trivial comparison
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  after = biggan_pytorch.convert_discriminator(_numpy_state(td), d)
  _close_trees(updates["batch_stats"], after["batch_stats"], rtol=1e-4, atol=1e-5)
  if check_grads:
    _close_grads(grads, _torch_grads(td, biggan_pytorch.convert_discriminator, d))


def _paper_state_dicts(n_classes):
  g = TorchG(64, n_classes, n_blocks=3)
  d = TorchD(64, n_classes, downsample=(True, True, False, False))
  return _numpy_state(g), _numpy_state(d)


def test_paper_checkpoint_keys_all_used():
  g_sd, d_sd = _paper_state_dicts(n_classes=10)
  # The official key set at 32x32: 4 (linear) + 3 blocks x 20 + 8 (output_layer) in G;
  # blocks with/without conv_sc (12, 12, 8, 8) + linear (4) + embed (3) in D.
  assert len(g_sd) == 72 and len(d_sd) == 47
  for key in ("linear.u0", "blocks.2.0.bn1.gain.weight", "blocks.0.0.conv_sc.sv0",
              "output_layer.0.stored_var", "output_layer.2.weight"):
    assert key in g_sd
  for key in ("blocks.1.0.conv_sc.u0", "embed.u0", "linear.sv0"):
    assert key in d_sd
  assert "blocks.2.0.conv_sc.weight" not in d_sd

  g, d = biggan.Generator(n_classes=10), biggan.Discriminator(n_classes=10)
  g_vars = biggan_pytorch.convert_generator(g_sd, g)
  d_vars = biggan_pytorch.convert_discriminator(d_sd, d)
  n_g = sum(v.size for k, v in g_sd.items() if not k.endswith(("u0", "sv0", "stored_mean", "stored_var")))
  assert sum(x.size for x in jax.tree.leaves(g_vars["params"])) == n_g
  assert sum(x.size for x in jax.tree.leaves(d_vars["batch_stats"])) == sum(
      v.size for k, v in d_sd.items() if k.endswith(("u0", "sv0")))

  with pytest.raises(ValueError, match="not used by the Flax model.*blocks.0.0.attention"):
    biggan_pytorch.convert_generator({**g_sd, "blocks.0.0.attention.gamma": np.zeros(())}, g)
  with pytest.raises(ValueError, match="no key 'embed.u0'"):
    biggan_pytorch.convert_discriminator({k: v for k, v in d_sd.items() if k != "embed.u0"}, d)
  with pytest.raises(ValueError, match="do not fit the model"):
    biggan_pytorch.convert_generator(g_sd, g.clone(n_classes=1))


def test_command_line_import_then_sample_then_eval(tmp_path):
  """README's sequence: importer -> sample -> eval on the imported workdir, from the command line.

  The importer leaves a complete workdir (config.json + step-0 checkpoint) whose weights
  are the converted state_dicts; `sample` and `eval` (fd_digits, no Inception offline) read it.
  """
  spec = importlib.util.spec_from_file_location("demo", REPO / "configs" / "demo.py")
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  config = demo.get_config()  # ch=8, 16x16, 10 classes, dim_z=32, evals.fd_digits
  tg = _randomize(TorchG(config.model.ch, 10, n_blocks=2, dim_z=config.model.dim_z), seed=3)
  td = _randomize(TorchD(config.model.ch, 10, downsample=(True, False, False, False)), seed=4)
  torch.save(tg.state_dict(), tmp_path / "G_ema.pth")
  torch.save(td.state_dict(), tmp_path / "D.pth")
  workdir = tmp_path / "run"
  run = lambda *args: subprocess.run([sys.executable, "-m", *args], capture_output=True,
                                     text=True, cwd=REPO, timeout=600)
  proc = run("nda_jax.importers.biggan_pytorch", f"--G={tmp_path}/G_ema.pth",
             f"--D={tmp_path}/D.pth", "--config=configs/demo.py", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (workdir / "config.json").exists()

  _, _, state = trainers.load_run(str(workdir))
  generator, discriminator = gan.build_models(config, axis_name=None)
  want_g = biggan_pytorch.convert_generator(_numpy_state(tg), generator)
  want_d = biggan_pytorch.convert_discriminator(_numpy_state(td), discriminator)
  _close_trees(state.g_params, want_g["params"], rtol=0, atol=0)
  _close_trees(state.ema_stats, want_g["batch_stats"], rtol=0, atol=0)
  _close_trees(state.d_stats, want_d["batch_stats"], rtol=0, atol=0)

  proc = run("nda_jax.sample", f"--workdir={workdir}", "--num=16", f"--out={tmp_path}/s.npz")
  assert proc.returncode == 0, proc.stderr[-3000:]
  samples = np.load(tmp_path / "s.npz")
  assert samples["images"].shape == (16, 16, 16, 3) and samples["images"].dtype == np.uint8
  proc = run("nda_jax.eval", f"--workdir={workdir}", "--config.evals.fd_digits.num_samples=64")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((workdir / "eval.json").read_text())
  assert result["step"] == 0 and np.isfinite(result["metrics"]["fd_digits"])
  # Importing again into the same workdir refuses to overwrite it.
  proc = run("nda_jax.importers.biggan_pytorch", f"--G={tmp_path}/G_ema.pth",
             f"--D={tmp_path}/D.pth", "--config=configs/demo.py", f"--workdir={workdir}")
  assert proc.returncode != 0 and "already holds checkpoints" in proc.stderr
