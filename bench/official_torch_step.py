r"""The official NDA-GAN iteration (ermongroup/NDA, PyTorch), timed like bench/gan_step.py.

  git clone https://github.com/ermongroup/NDA /path/to/NDA
  python bench/official_torch_step.py --official_repo=/path/to/NDA \
      [--widths=64,16] [--batch=64] [--iters=5] [--device=cpu|cuda] [--with_nda_jax]

Builds the official BigGAN_new G and D, the EMA copy and
`train_fns_aug.GAN_training_function` with train_C10.sh's arguments (hinge
loss, jigsaw k=2 NDA, alpha 0.25, beta 0.75, 4 D steps, EMA) and times
`train(x, y)`, i.e. 4 D steps + 1 G step + EMA, on random CIFAR-shaped batches.
The official code is not part of this project: pass your own clone.
With --with_nda_jax, nda_jax's iteration (bench/gan_step.py's, default conv
path, D steps as configured by "auto") is timed in the same process, the two
alternating call by call so that load from elsewhere hits both alike, and the
ratio official/nda_jax is printed (> 1: nda_jax is faster).

torchvision and h5py are imported by the official data and sampling utilities
but not used by the timed iteration; where they are missing or broken (a
CPU-only torch has no matching torchvision wheel on PyPI) stand-ins take
their place, so that only the training code is needed.
"""
import importlib
import sys
import types
from typing import Callable
from unittest import mock

from absl import app
from absl import flags

from timing import median_seconds

# train_C10.sh, minus data, logging and evaluation flags.
TRAIN_C10_ARGS = [
    "--shuffle", "--batch_size", "64", "--num_G_accumulations", "1", "--num_D_accumulations", "1",
    "--num_D_steps", "4", "--G_lr", "2e-4", "--D_lr", "2e-4", "--dataset", "C10U",
    "--G_ortho", "0.0", "--G_attn", "0", "--D_attn", "0", "--G_init", "N02", "--D_init", "N02",
    "--ema", "--use_ema", "--ema_start", "1000", "--loss_type", "hinge", "--seed", "2",
    "--model", "BigGAN_new", "--alpha", "0.25", "--beta", "0.75",
]


def _import_or_stand_in(name: str) -> None:
  try:
    importlib.import_module(name)
  except Exception:  # pylint: disable=broad-except  (a broken install raises RuntimeError)
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
      del sys.modules[key]
    stand_in = mock.MagicMock(name=name)
    sys.modules[name] = stand_in
    for sub in ("datasets", "datasets.utils", "transforms", "utils"):
      sys.modules[f"{name}.{sub}"] = getattr(stand_in, sub)


def load_official(repo: str) -> types.SimpleNamespace:
  for name in ("torchvision", "h5py"):
    _import_or_stand_in(name)
  sys.path.insert(0, repo)
  return types.SimpleNamespace(
      utils=importlib.import_module("utils"),
      model=importlib.import_module("BigGAN_new"),
      train_fns=importlib.import_module("train_fns_aug"))


def official_iteration(official, torch, width: int, batch: int,
                       device: str) -> Callable[[], None]:
  """One call = one official training iteration (4 D steps + 1 G step + EMA)."""
  args = TRAIN_C10_ARGS + ["--G_ch", str(width), "--D_ch", str(width)]
  args[args.index("--batch_size") + 1] = str(batch)
  config = vars(official.utils.prepare_parser().parse_args(args))
  config.update(resolution=32, n_classes=1,
                G_activation=torch.nn.ReLU(inplace=False), D_activation=torch.nn.ReLU(inplace=False))
  official.utils.seed_rng(config["seed"])
  G = official.model.Generator(**config).to(device)
  D = official.model.Discriminator(**config).to(device)
  G_ema = official.model.Generator(**{**config, "skip_init": True, "no_optim": True}).to(device)
  ema = official.utils.ema(G, G_ema, config["ema_decay"], config["ema_start"])
  GD = official.model.G_D(G, D, config["conditional"])
  z_, y_ = official.utils.prepare_z_y(batch, G.dim_z, config["n_classes"], device=device)
  y_.zero_()
  state_dict = {"itr": 0, "epoch": 0}
  train = official.train_fns.GAN_training_function(G, D, GD, z_, y_, ema, state_dict, config)
  nd = config["num_D_steps"]
  x = torch.rand(nd * batch, 3, 32, 32, device=device) * 2 - 1
  y = torch.zeros(nd * batch, dtype=torch.int64, device=device)

  def one():
    train(x, y)  # returns .item() floats, so it synchronises with the device
    state_dict["itr"] += 1
  return one


def nda_jax_iteration(width: int, batch: int) -> Callable[[], None]:
  """One call = one nda_jax training iteration, as bench/gan_step.py builds it."""
  import gan_step  # pylint: disable=import-outside-toplevel  (bench/ is on sys.path)
  import jax  # pylint: disable=import-outside-toplevel
  step, state, batch_arrays = gan_step.setup(width, batch, "auto", "auto")
  holder = [state]

  def one():
    holder[0], metrics = step(holder[0], batch_arrays)
    jax.block_until_ready(metrics)
  return one


_OFFICIAL_REPO = flags.DEFINE_string("official_repo", None,
                                     "A clone of github.com/ermongroup/NDA.", required=True)
_WIDTHS = flags.DEFINE_list("widths", ["64", "16"], "Model widths (G_ch = D_ch).")
_BATCH = flags.DEFINE_integer("batch", 64, "Batch per D step.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed iterations.")
_DEVICE = flags.DEFINE_string("device", "cpu", "torch device.")
_WITH_NDA_JAX = flags.DEFINE_bool("with_nda_jax", False,
                                  "Time nda_jax's iteration alongside, alternating (see above).")


def main(argv):
  del argv
  import torch  # pylint: disable=import-outside-toplevel  (optional extra)
  if _DEVICE.value == "cuda":
    torch.backends.cudnn.benchmark = True  # as train_aug.py does
  official = load_official(_OFFICIAL_REPO.value)
  print(f"torch {torch.__version__} on {_DEVICE.value}, {torch.get_num_threads()} CPU threads")
  print(f"{'ch':>4} {'s/iter':>8} {'img/s':>8}" + (
      f" {'nda_jax s/iter':>14} {'img/s':>8} {'official/nda_jax':>16}" if _WITH_NDA_JAX.value else ""))
  for width in (int(w) for w in _WIDTHS.value):
    calls = {"official": official_iteration(official, torch, width, _BATCH.value, _DEVICE.value)}
    if _WITH_NDA_JAX.value:
      calls["nda_jax"] = nda_jax_iteration(width, _BATCH.value)
    sec = median_seconds(calls, _ITERS.value)
    row = f"{width:>4} {sec['official']:>8.3f} {4 * _BATCH.value / sec['official']:>8.1f}"
    if _WITH_NDA_JAX.value:
      row += (f" {sec['nda_jax']:>14.3f} {4 * _BATCH.value / sec['nda_jax']:>8.1f}"
              f" {sec['official'] / sec['nda_jax']:>15.2f}x")
    print(row, flush=True)

if __name__ == "__main__":
  app.run(main)
