r"""The official MoCo-v2 step (facebookresearch/moco, PyTorch) beside nda_jax's, on one machine.

  git clone https://github.com/facebookresearch/moco /path/to/moco
  python bench/official_moco_step.py --moco_repo=/path/to/moco \
      [--case=r18_32] [--batch=64] [--iters=5] [--device=cpu|cuda] [--nda]

Official side: `moco.builder.MoCo` as main_moco.py builds it for MoCo-v2
(`--mlp --moco-t 0.2`, K and m as below), wrapped in DistributedDataParallel,
and one step of main_moco's `train()`: `model(im_q, im_k)`, cross-entropy,
`zero_grad`, `backward`, SGD (lr 0.03, momentum 0.9, weight decay 1e-4) —
i.e. momentum update, shuffled key forward, query forward and backward, the
enqueue. The code is not part of this project: pass your own clone.

nda_jax side: bench/moco_step.py's step for the same case (encoder, head,
K = 4096 at r18_32 / 65536 at r50_224, global batch), plain MoCo-v2 unless
--nda. The two alternate call by call (bench/official_torch_step.py's
`median_seconds`), so that load from elsewhere hits both alike; the ratio
official/nda_jax is printed (> 1: nda_jax is faster).

What differs, deliberately:
- base_encoder: torchvision's resnet18/resnet50 semantics, written here
  (torchvision is not importable next to the CPU torch wheel), with the stem
  nda_jax uses for the case: 'cifar' (3x3 conv, no max-pool, as MoCo's CIFAR
  demo) for r18_32, torchvision's 'imagenet' stem for r50_224.
- Views: the official step takes ready views (main_moco makes them with
  torchvision on the host, in DataLoader workers, not timed here); nda_jax's
  step makes its two aug+ views on device from uint8 images, inside the time.
- BatchNorm: the official key encoder normalises a shuffled per-process batch
  (one group here); nda_jax normalises groups of bn_group_size (same cost).
- On CPU: the builder calls `.cuda()` (the shuffle's randperm, the labels) and
  torch.distributed (broadcast, all_gather, get_rank), so it runs in a
  1-process gloo group with `torch.Tensor.cuda` patched to return the tensor
  itself. With --device=cuda nothing is patched (1-process NCCL group).
"""
import contextlib
import importlib
import socket
import sys
from typing import Callable
from unittest import mock

from absl import app
from absl import flags
import jax

import moco_step
from timing import median_seconds
from nda_jax.models import resnet

# main_moco.py's MoCo-v2 hyper-parameters (--mlp --moco-t 0.2; SGD as its defaults).
MOCO_DIM, MOCO_M, MOCO_T = 128, 0.999, 0.2
LR, MOMENTUM, WEIGHT_DECAY = 0.03, 0.9, 1e-4


def torchvision_resnet(torch, arch: str, stem: str) -> Callable[..., "torch.nn.Module"]:
  """`base_encoder(num_classes=...)`: torchvision's ResNet layout and init (v1.5 bottleneck,
  `downsample` = 1x1 conv + BN, kaiming-normal fan_out convs), with nda_jax's `stem`."""
  nn = torch.nn
  stage_sizes, block = resnet.ARCHS[arch]
  bottleneck = block == "bottleneck"
  expansion = 4 if bottleneck else 1

  class Block(nn.Module):

    def __init__(self, cin: int, planes: int, stride: int):
      super().__init__()
      cout = planes * expansion
      if bottleneck:
        shapes = [(cin, planes, 1, 1), (planes, planes, 3, stride), (planes, cout, 1, 1)]
      else:
        shapes = [(cin, planes, 3, stride), (planes, planes, 3, 1)]
      self.convs = nn.ModuleList(nn.Conv2d(i, o, k, s, k // 2, bias=False)
                                 for i, o, k, s in shapes)
      self.bns = nn.ModuleList(nn.BatchNorm2d(o) for _, o, _, _ in shapes)
      self.downsample = None
      if stride != 1 or cin != cout:
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                        nn.BatchNorm2d(cout))

    def forward(self, x):
      h = x
      for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
        h = bn(conv(h))
        if i < len(self.convs) - 1:
          h = torch.relu(h)
      return torch.relu(h + (x if self.downsample is None else self.downsample(x)))

  class ResNet(nn.Module):

    def __init__(self, num_classes: int = 1000, width: int = 64):
      super().__init__()
      imagenet = stem == "imagenet"
      self.conv1 = nn.Conv2d(3, width, 7 if imagenet else 3, 2 if imagenet else 1,
                             3 if imagenet else 1, bias=False)
      self.bn1 = nn.BatchNorm2d(width)
      self.maxpool = nn.MaxPool2d(3, 2, 1) if imagenet else nn.Identity()
      layers, cin = [], width
      for i, n in enumerate(stage_sizes):
        blocks = []
        for j in range(n):
          blocks.append(Block(cin, width * 2 ** i, 2 if i > 0 and j == 0 else 1))
          cin = width * 2 ** i * expansion
        layers.append(nn.Sequential(*blocks))
      self.layers = nn.Sequential(*layers)
      self.fc = nn.Linear(cin, num_classes)
      for m in self.modules():
        if isinstance(m, nn.Conv2d):
          nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
      h = self.layers(self.maxpool(torch.relu(self.bn1(self.conv1(x)))))
      return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))

  return ResNet


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def process_group(torch, device: str):
  """A 1-process group (gloo on CPU, with Tensor.cuda a no-op; NCCL on CUDA)."""
  dist = torch.distributed
  dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1,
                          init_method=f"tcp://127.0.0.1:{_free_port()}")
  patch = (contextlib.nullcontext() if device == "cuda" else
           mock.patch.object(torch.Tensor, "cuda", lambda self, *args, **kwargs: self))
  try:
    with patch:
      yield
  finally:
    dist.destroy_process_group()


def official_step(repo: str, torch, case: str, batch: int, device: str) -> Callable[[], None]:
  """One call = one step of main_moco's train() on fixed random views."""
  sys.path.insert(0, repo)
  builder = importlib.import_module("moco.builder")
  arch, stem, _, crop, queue = moco_step.CASES[case]
  torch.manual_seed(0)
  model = builder.MoCo(torchvision_resnet(torch, arch, stem), MOCO_DIM,
                       max(queue // batch, 1) * batch, MOCO_M, MOCO_T, mlp=True).to(device)
  model = torch.nn.parallel.DistributedDataParallel(model)
  criterion = torch.nn.CrossEntropyLoss().to(device)
  optimizer = torch.optim.SGD(model.parameters(), LR, momentum=MOMENTUM,
                              weight_decay=WEIGHT_DECAY)
  im_q, im_k = (torch.randn(batch, 3, crop, crop, device=device) for _ in range(2))

  def one():
    output, target = model(im_q=im_q, im_k=im_k)
    loss = criterion(output, target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    loss.item()   # synchronises with the device
  return one


def nda_jax_step(case: str, batch: int, nda: bool) -> Callable[[], None]:
  """One call = one nda_jax step, as bench/moco_step.py builds it."""
  return moco_step.make_runner(case, batch, nda)


_MOCO_REPO = flags.DEFINE_string("moco_repo", None,
                                 "A clone of github.com/facebookresearch/moco.", required=True)
_CASE = flags.DEFINE_enum("case", "r18_32", sorted(moco_step.CASES), "The case.")
_BATCH = flags.DEFINE_integer("batch", 64, "Global batch, both sides.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed steps.")
_DEVICE = flags.DEFINE_enum("device", "cpu", ["cpu", "cuda"], "torch device.")
_NDA = flags.DEFINE_bool("nda", False, "nda_jax with its NDA negatives.")


def main(argv):
  del argv
  import torch  # pylint: disable=import-outside-toplevel  (optional extra)
  if _DEVICE.value == "cuda":
    torch.backends.cudnn.benchmark = True   # as main_moco.py does
  print(f"torch {torch.__version__} on {_DEVICE.value} ({torch.get_num_threads()} threads); "
        f"jax on {jax.device_count()} x {jax.devices()[0].device_kind}")
  with process_group(torch, _DEVICE.value):
    calls = {"official": official_step(_MOCO_REPO.value, torch, _CASE.value, _BATCH.value,
                                       _DEVICE.value),
             "nda_jax": nda_jax_step(_CASE.value, _BATCH.value, _NDA.value)}
    sec = median_seconds(calls, _ITERS.value)
  label = "nda_jax+NDA" if _NDA.value else "nda_jax"
  print(f"{'case':>8} {'batch':>5} {'official s/step':>15} {'img/s':>7} "
        f"{label + ' s/step':>19} {'img/s':>7} {'official/' + label:>20}")
  off, ours = sec["official"], sec["nda_jax"]
  print(f"{_CASE.value:>8} {_BATCH.value:>5} {off:>15.3f} {_BATCH.value / off:>7.1f} "
        f"{ours:>19.3f} {_BATCH.value / ours:>7.1f} {off / ours:>19.2f}x", flush=True)


if __name__ == "__main__":
  app.run(main)
