r"""Detection transfer: torchvision Faster R-CNN + FPN on an exported MoCo backbone.

MoCo's VOC recipe (facebookresearch/moco detection/configs/pascal_voc_R_50_C4_24k*)
where torchvision allows it: every layer fine-tuned (Detectron2's FREEZE_AT 0,
torchvision's trainable_layers=5) with BatchNorm2d in train mode (MoCo: synchronised
BN; torchvision's default would be FrozenBatchNorm2d), 24k iterations at batch 16,
lr 0.02 (linearly scaled with the batch), x0.1 at 18k and 22k, 100 linear warm-up
iterations from 0.001x (Detectron2's WarmupMultiStepLR), SGD momentum 0.9, weight
decay 1e-4, train min side 480..800 (step 32), test 800, horizontal flips. It differs in
the detector (FPN, not R50-C4's res5 head) and in having no PreciseBN.

  python -m nda_jax.exporters.backbone --workdir=runs/imagenet_moco --format=torchvision --out=b.pth
  python -m nda_jax.detection.finetune --config=configs/voc_detection.py \
      --backbone=b.pth --data=VOCdevkit/VOC2007 --workdir=runs/voc_det

Variants: `digits` (the demo's set from `python -m nda_jax.tools.digits_voc`, the
demo's resnet18 / 'cifar' stem / width-16 backbone, 64-px canvases, a CPU budget),
`tiny` (a few iterations, for tests).
"""
import ml_collections

from configs import common

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor")


def get_config(arg=None):
  variants = common.parse_variants(arg, ("digits", "tiny"))
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = ml_collections.ConfigDict()
  c.data.classes = VOC_CLASSES
  c.data.train_split = "trainval"       # ImageSets/Main/<split>.txt
  c.data.test_split = "test"
  c.data.min_size_train = tuple(range(480, 801, 32))
  c.data.min_size_test = 800
  c.data.max_size = 1333
  c.data.p_flip = 0.5
  c.model = ml_collections.ConfigDict()
  # The backbone of --backbone=none (else read off the file): torchvision's init.
  c.model.untrained = ml_collections.ConfigDict(
      {"arch": "resnet50", "stem": "imagenet", "width": 64})
  c.model.trainable_layers = 5          # conv1/bn1 + layer1..4: all (MoCo: FREEZE_AT 0)
  c.model.norm = "batch_norm"           # BatchNorm2d, train mode; or "frozen" (torchvision's)
  c.model.fpn_channels = 256
  c.model.anchor_sizes = (32, 64, 128, 256, 512)   # one per FPN level (torchvision's)
  c.model.box_batch_size_per_image = 512           # Detectron2's ROI_HEADS.BATCH_SIZE_PER_IMAGE
  c.model.representation_size = 1024               # the box head's MLP
  # RPN proposals (torchvision's defaults; pre-NMS counts are per FPN level).
  c.model.rpn_pre_nms_top_n = ml_collections.ConfigDict({"train": 2000, "test": 1000})
  c.model.rpn_post_nms_top_n = ml_collections.ConfigDict({"train": 2000, "test": 1000})
  c.torch_threads = 0                   # 0: torch's default (every core)
  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 0.02                # at base_batch; lr = base_lr * batch_size / base_batch
  c.optim.base_batch = 16
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4
  c.optim.warmup_iters = 100
  c.optim.warmup_factor = 0.001
  c.optim.steps = (18000, 22000)
  c.optim.gamma = 0.1
  c.train = ml_collections.ConfigDict()
  c.train.iterations = 24000
  c.train.batch_size = 16
  c.train.log_every = 20
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 8
  c.eval.score_thresh = 0.05            # Detectron2's SCORE_THRESH_TEST
  c.eval.detections_per_img = 100
  if "digits" in variants or "tiny" in variants:
    _digits(c)
  if "tiny" in variants:
    _tiny(c)
  return c


def _digits(c: ml_collections.ConfigDict) -> None:
  """The demo's digit canvases and backbone on a CPU budget."""
  c.data.classes = tuple(str(d) for d in range(10))
  c.data.min_size_train = (64,)         # the canvases as they are: no resizing
  c.data.min_size_test = 64
  c.data.max_size = 64
  c.data.p_flip = 0.0                   # a mirrored digit is another glyph
  c.model.untrained = ml_collections.ConfigDict(
      {"arch": "resnet18", "stem": "cifar", "width": 16})
  c.model.fpn_channels = 32
  # Digits of 12-24 px at FPN strides 1..16 (the 'cifar' stem does not downsample).
  c.model.anchor_sizes = (8, 16, 32, 64, 128)
  # ~2.5 digits per canvas: a few hundred proposals and 64 sampled RoIs cover them.
  c.model.box_batch_size_per_image = 64
  c.model.representation_size = 128
  c.model.rpn_pre_nms_top_n = ml_collections.ConfigDict({"train": 500, "test": 500})
  c.model.rpn_post_nms_top_n = ml_collections.ConfigDict({"train": 256, "test": 256})
  # One thread: on a shared 2-core CPU torch's two threads measured 20x slower
  # (a resnet18 step: 9-12 s against 0.47 s, with other processes on the cores).
  c.torch_threads = 1
  # A CPU budget (~6 min on one shared core, 1.7 s an iteration): 200 iterations at
  # batch 8 (2 epochs of the 800 canvases), lr 0.01 by the linear scaling rule.
  c.train.iterations = 200
  c.train.batch_size = 8
  c.optim.steps = (150, 183)            # 75% and 92% of training, as 18k / 22k of 24k
  c.optim.warmup_iters = 50
  c.train.log_every = 25
  c.eval.batch_size = 50


def _tiny(c: ml_collections.ConfigDict) -> None:
  """A few iterations of a minute model, for tests."""
  c.model.untrained.width = 4
  c.model.fpn_channels = 16
  c.model.representation_size = 32
  c.model.box_batch_size_per_image = 32
  c.train.iterations = 4
  c.train.batch_size = 4
  c.optim.steps = (2, 3)
  c.optim.warmup_iters = 2
  c.train.log_every = 1
  c.eval.batch_size = 4
