r"""MoCo with NDA negatives on CIFAR-10: MoCo's own CIFAR-10 demo recipe.

facebookresearch/moco's colab/moco_cifar10_demo.ipynb (asymmetric loss):
ResNet-18 with the CIFAR stem (3x3 conv, no max-pool), K=4,096, m=0.99,
t=0.1, SGD lr 0.06 at batch 512 with a cosine schedule, momentum 0.9, weight
decay 5e-4, 200 epochs, BN statistics in 8 groups of 64 (the demo's
SplitBatchNorm simulating 8 GPUs), no blur; plus an NDA of each query view
(jigsaw k=2, clean layout) as one extra negative, as configs/imagenet_moco.py.

  python -m nda_jax.main --config=configs/cifar10_moco.py \
      --config.data.data_dir=/path/with/cifar-10-batches-py --workdir=runs/c10_moco_nda

Variants: `:baseline` (no NDA negatives), `:v2` (MoCo-v2's aug+: crops of at
least 20% of the area, Gaussian blur with p=0.5), combinable (`:v2,baseline`).

Where this differs from the demo (settings the MoCo trainer does not have):
  * Projection head: the demo's is one linear layer (512 -> 128); the trainer's
    encoder always has MoCo-v2's MLP head (512-512-128). So the default runs
    with the MLP head, and `:v2` differs from it only in the augmentation.
  * Input normalisation: the demo uses CIFAR-10's mean/std; the trainer offers
    ImageNet's mean/std ('imagenet', used here) or none.
  * kNN monitor: the demo's runs on the L2-normalised 128-d head outputs, this
    one on the backbone's pooled 512-d features (k=200, t=0.1 as the demo).
  * The cosine schedule is applied per step; the demo sets it once per epoch.

Expected (demo README, kNN top-1 of its asymmetric MoCo without NDA, 200
epochs): 82.6%; not yet measured here.
"""
from configs import common


def get_config(arg=None):
  variants = common.parse_variants(arg, ("v2", "baseline"))
  c = common.moco_cifar_config("cifar10", num_classes=10)
  common.apply_moco_cifar_variants(c, variants)
  return c
