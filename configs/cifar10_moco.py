r"""MoCo with NDA negatives on CIFAR-10: MoCo's own CIFAR-10 demo recipe.

facebookresearch/moco's colab/moco_cifar10_demo.ipynb (asymmetric loss):
ResNet-18 with the CIFAR stem (3x3 conv, no max-pool) and a linear head
512 -> 128, K=4,096, m=0.99, t=0.1, SGD lr 0.06 at batch 512 with a cosine
schedule set once per epoch, momentum 0.9, weight decay 5e-4, 200 epochs, BN
statistics in 8 groups of 64 (the demo's SplitBatchNorm simulating 8 GPUs),
CIFAR-10's mean/std, no blur, a kNN monitor on the 128-d head outputs (k=200,
t=0.1); plus an NDA of each query view (jigsaw k=2, clean layout) as one
extra negative, as configs/imagenet_moco.py.

  python -m nda_jax.main --config=configs/cifar10_moco.py \
      --config.data.data_dir=/path/with/cifar-10-batches-py --workdir=runs/c10_moco_nda

Variants: `:baseline` (no NDA negatives), `:v2` (MoCo-v2: the MLP head
512-512-128 and aug+, crops of at least 20% of the area and Gaussian blur
with p=0.5), combinable (`:v2,baseline`).

Expected (demo README, kNN top-1 of its asymmetric MoCo without NDA, 200
epochs): 82.6%; not yet measured here.
"""
from configs import common


def get_config(arg=None):
  variants = common.parse_variants(arg, ("v2", "baseline"))
  c = common.moco_cifar_config("cifar10", num_classes=10)
  common.apply_moco_cifar_variants(c, variants)
  return c
