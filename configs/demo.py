r"""Demo: NDA-GAN on the embedded scikit-learn digits, on a CPU, in minutes.

The paper's code path (BigGAN_new, hinge loss, jigsaw NDA with alpha=0.25 /
beta=0.75, 4 D steps per G step, EMA G) at 16x16 with a narrow model (ch=8);
it needs no download.

  python -m nda_jax.main --config=configs/demo.py --workdir=runs/demo

Measured on 2 idle CPU cores: 9 min end to end (2,500 iterations at ~0.2 s,
compile, evaluations, checkpoints), plus training the fd_digits classifier
once on first use. At 2,500 iterations the sample sheet in
runs/demo/samples/ (one row per class, EMA G) shows recognisable digits of
the row's class (README: docs/demo_samples.png); `fd_digits` (Fréchet
distance in a digits classifier's features, lower is better) was 381 at
1,250 and 83 at 2,500 iterations. Seeds and checkpoints vary widely at this
scale, so one run does not rank NDA against `:baseline`.
Variants: `:baseline` (alpha=1, beta=0), `:uncond`, `:tiny` (a few
iterations, for tests).
"""
from nda_jax import config_lib


def get_config(arg=None):
  variants = config_lib.parse_variants(arg, ("baseline", "uncond", "tiny"))
  c = config_lib.gan_config()
  c.seed = 0
  c.data.name = "digits"
  c.data.image_size = 16
  c.data.num_classes = 10
  c.model.ch = 8                        # 32-channel blocks
  c.model.conditional = True
  c.model.dim_z = 32
  c.nda.params.jigsaw.k = 2
  c.train.batch_size = 16
  c.train.num_epochs = 0
  c.train.total_steps = 2500
  c.train.ema_start = 100
  c.train.ema_decay = 0.999
  c.train.log_every = 50
  c.sample.every = 500
  c.sample.scale = 4
  c.eval.metrics = ("fd_digits",)
  c.eval.every = 1250
  c.eval.num_samples = 500
  c.checkpoint.every = 500
  c.checkpoint.keep_best = 1
  c.checkpoint.best_metric = "fd_digits"
  config_lib.apply_gan_variants(c, variants & {"baseline"})
  if "uncond" in variants:
    c.model.conditional = False
  if "tiny" in variants:
    c.model.ch = 4
    c.train.batch_size = 16
    c.train.total_steps = 4
    c.train.log_every = 1
    c.sample.every = 2
    c.eval.metrics = ()
    c.checkpoint.every = 2
  return c
