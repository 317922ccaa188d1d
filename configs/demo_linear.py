r"""Demo: a linear probe on the frozen backbone of the MoCo demo (configs/demo_moco.py), on a CPU.

main_lincls's protocol (frozen backbone in inference mode, a linear classifier
on its pooled features, SGD with momentum, lr x0.1 at 60% and 80% of training)
on the embedded digits:

  python -m nda_jax.main --config=configs/demo_moco.py --workdir=runs/demo_moco
  python -m nda_jax.main --config=configs/demo_linear.py \
      --config.pretrained_workdir=runs/demo_moco --workdir=runs/demo_probe

Two settings differ from ImageNet's, for 16x16 digits and a 128-d feature
(docs/demos.md says why): lr 1, and views of the whole digit without flips
(scale (1, 1) makes the crop the identity on a square image). Top-1 / top-5
on the 300 test digits every 2 epochs. Variants: `:tiny` (a few steps, for
tests).
"""
from configs import common


def get_config(arg=None):
  variants = common.parse_variants(arg, ("tiny",))
  c = common.linear_config()
  c.data = common.data_config("digits", image_size=16, num_classes=10)
  c.aug.scale = (1.0, 1.0)
  c.aug.p_flip = 0.0
  c.optim.classifier.lr = 1.0
  c.optim.classifier.boundaries_epochs = (6, 8)
  c.train.batch_size = 64               # 23 steps per epoch of the 1,497 training digits
  c.train.num_epochs = 10
  c.train.log_every = 23
  c.evals.classification.every = 46
  c.evals.classification.batch_size = 304
  c.checkpoint.every = 230
  c.checkpoint.best_metric = "test_top1"
  if "tiny" in variants:
    c.aug.scale = (0.08, 1.0)           # Exercises the crop and the flip.
    c.aug.p_flip = 0.5
    c.train.batch_size = 32
    c.train.num_epochs = 0
    c.train.total_steps = 4
    c.train.log_every = 1
    c.evals.classification.every = 2
    c.checkpoint.every = 2
  return c
