r"""MoCo with NDA negatives on CIFAR-100: the CIFAR-10 demo recipe on 100 classes.

  python -m nda_jax.main --config=configs/cifar100_moco.py \
      --config.data.data_dir=/path/with/cifar-100-python --workdir=runs/c100_moco_nda

Every setting, variant (`:baseline`, `:v2`) and difference from MoCo's demo is
as in configs/cifar10_moco.py; the kNN monitor (k=200, t=0.1) reads the fine
labels. MoCo's demo gives no CIFAR-100 figure.
"""
from configs import common


def get_config(arg=None):
  variants = common.parse_variants(arg, ("v2", "baseline"))
  c = common.moco_cifar_config("cifar100", num_classes=100)
  common.apply_moco_cifar_variants(c, variants)
  return c
