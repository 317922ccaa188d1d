r"""NDA-GAN on CIFAR-100: the CIFAR-10 recipe on 100 classes (paper Table 2).

  python -m nda_jax.main --config=configs/cifar100_nda_gan.py \
      --config.data.data_dir=/path/with/cifar-100-python --workdir=runs/c100_nda

Variants `:cond`, `:baseline` as in cifar10_nda_gan.py. The paper reports FID
improvements over the BigGAN baseline; reference statistics of the CIFAR-100
test set come from `python -m nda_jax.evaluators.ref_stats`.
"""
from configs import common


def get_config(arg=None):
  variants = common.parse_variants(arg, ("cond", "baseline"))
  c = common.gan_config()
  c.data.name = "cifar100"
  c.data.num_classes = 100
  common.apply_gan_variants(c, variants)
  return c
