r"""Demo: NDA-GAN on the embedded scikit-learn digits, on a CPU, in minutes.

The paper's code path (BigGAN_new, hinge loss, jigsaw NDA with alpha=0.25 /
beta=0.75, 4 D steps per G step, EMA G) at 16x16 with a narrow model (ch=8);
it needs no download.

  python -m nda_jax.main --config=configs/demo.py --workdir=runs/demo

It runs in minutes on 2 CPU cores (README states the measured time and
figures). The sample sheets in runs/demo/samples/ (one row per class, EMA G)
show digits of the row's class by the end; `fd_digits` (Fréchet distance in a
digits classifier's features, lower is better; not an FID) is evaluated
twice; at the end, `anomaly` gives the AUROC of D(x) between the test digits
and each NDA of them (jigsaw, stitch, mixup, cutout, cutmix, mosaic). Seeds
and checkpoints vary widely at this scale, so one run does not rank NDA
against `:baseline`: README compares 3 seeds of each with `tools.compare`.
Variants: `:baseline` (alpha=1, beta=0), `:uncond`, `:tiny` (a few
iterations, for tests).
"""
import ml_collections

from configs import common
from nda_jax import evaluators


def get_config(arg=None):
  variants = common.parse_variants(arg, ("baseline", "uncond", "tiny"))
  c = common.gan_config()
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
  del c.evals["fid"]
  c.evals.fd_digits = evaluators.default_config("sample_quality")
  c.evals.fd_digits.metrics = ("fd_digits",)
  c.evals.fd_digits.every = 1250
  c.evals.fd_digits.num_samples = 500
  c.evals.fd_digits.sample_batch_size = 64
  c.checkpoint.every = 500
  common.keep_best(c, "fd_digits", mode="min")
  common.apply_gan_variants(c, variants & {"baseline"})
  if "uncond" in variants:
    c.model.conditional = False
  if "tiny" in variants:
    c.model.ch = 4
    c.train.batch_size = 16
    c.train.total_steps = 4
    c.train.log_every = 1
    c.sample.every = 2
    c.evals = ml_collections.ConfigDict()
    c.checkpoint.every = 2
  return c
