r"""Demo: MoCo-v2 with NDA negatives on the embedded scikit-learn digits, on a CPU.

The MoCo-v2 code path (query/key encoders, queue, aug+ views on device, BN
groups, jigsaw NDA keys) with a narrow ResNet-18 (CIFAR stem) on 16x16 digits;
it needs no download.

  python -m nda_jax.main --config=configs/demo_moco.py --workdir=runs/demo_moco

The kNN monitor (weighted kNN on the backbone's pooled features, train split
as the bank, k=20 because the digits have ~150 training images per class)
runs every 250 steps. Then a linear probe:
`python -m nda_jax.main --config=configs/demo_linear.py --config.pretrained_workdir=runs/demo_moco --workdir=runs/demo_probe`.
README.md gives what they measure; docs/demos.md why the queue and the views
are smaller than MoCo's. Variants: `:baseline` (no NDA), `:tiny` (a few
steps, for tests).
"""
from configs import common


def get_config(arg=None):
  variants = common.parse_variants(arg, ("baseline", "tiny"))
  c = common.moco_config()
  c.data = common.data_config("digits", image_size=16, num_classes=10)
  c.model.arch = "resnet18"
  c.model.stem = "cifar"
  c.model.width = 16
  c.model.head_dim = 64
  c.model.bn_group_size = 16
  # K ~ 9% of the digits: a queue holding most of them holds each image's own key of the
  # previous epoch as a negative.
  c.moco.queue_size = 128
  c.moco.momentum = 0.99                # short run: a faster key encoder (MoCo's CIFAR demo)
  c.aug.crop_size = 16
  # Digits hold 8x8 pixels: aug+'s 20% crops and its blur leave nothing to learn from.
  c.aug.scale = (0.5, 1.0)
  c.aug.p_blur = 0.0
  c.optim.encoder.lr = 0.06
  c.optim.encoder.schedule = "cosine"   # per step: a smooth decay over the demo's 500 steps
  c.optim.encoder.weight_decay = 5e-4   # MoCo's CIFAR demo
  c.train.batch_size = 64
  c.train.num_epochs = 0
  c.train.total_steps = 500
  c.train.log_every = 50
  c.evals.knn.k = 20
  c.evals.knn.max_train = 0
  c.evals.knn.batch_size = 256
  c.evals.knn.eval_split = "test"
  common.evaluate_every(c, 250, "knn")
  if "baseline" in variants:
    c.nda.enabled = False
  if "tiny" not in variants:
    common.enable_online_probe(c)       # train top-1 in the log, test top-1 with the kNN
  if "tiny" in variants:
    c.model.width = 4
    c.model.bn_group_size = 8
    c.train.batch_size = 32
    c.moco.queue_size = 128
    c.train.total_steps = 4
    c.train.log_every = 1
    c.evals.knn.every = 4
    c.evals.knn.k = 5
    c.checkpoint.every = 2
  return c
