r"""NDA-GAN on CIFAR-10: BigGAN with jigsaw NDA fakes (Sinha et al. 2021, Table 2).

Reproduces train_C10.sh of ermongroup/NDA (unconditional, seed 2, jigsaw k=2,
alpha=0.25, beta=0.75, batch 64, 4 D steps, 500 epochs = 97.5k iterations, EMA G).
Variants: `:cond` (train_C10_cond.sh), `:baseline` (alpha=1, beta=0), combinable
(`:cond,baseline`). `--config.nda.name=stitch` etc. runs the NDA ablation.

  python -m nda_jax.main --config=configs/cifar10_nda_gan.py \
      --config.data.data_dir=/path/with/cifar-10-batches-py \
      --config.evals.fid.inception_weights=pt_inception-2015-12-05-6726825d.pth \
      --config.evals.fid.ref_stats=cifar10_10k_stats.npz --workdir=runs/c10_nda

At the end of training `evals.anomaly` scores the test set against its NDAs;
`--config.evals.anomaly.cifar10c_dir=.../CIFAR-10-C` (the official .npy files)
adds the 19 corruptions, per severity (paper 4.4).

Expected (paper, FID-10k with the TF Inception, best checkpoint): unconditional
NDA 12.61 vs baseline 18.64; conditional NDA 9.42.
"""
from configs import common


def get_config(arg=None):
  variants = common.parse_variants(arg, ("cond", "baseline"))
  c = common.gan_config()
  common.apply_gan_variants(c, variants)
  return c
