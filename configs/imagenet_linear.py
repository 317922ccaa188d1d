r"""Linear evaluation of a MoCo encoder on ImageNet (facebookresearch/moco `main_lincls.py`).

The backbone of `--config.pretrained_workdir` (a run of configs/imagenet_moco.py,
or released weights imported with nda_jax.importers.moco_pytorch) is frozen in
inference mode; a linear classifier on its 2048-d pooled features is trained
with SGD lr 30, momentum 0.9, no weight decay, batch 256, 100 epochs, lr x0.1
at epochs 60 and 80, on RandomResizedCrop(224) + flip views; the val split is
center-cropped and scored every epoch (top-1 / top-5; the best is kept).

  python -m nda_jax.main --config=configs/imagenet_linear.py \
      --config.pretrained_workdir=runs/in_moco_nda \
      --config.data.data_dir=/path/to/imagenet --workdir=runs/in_moco_nda_linear

Released MoCo-v2 weights (moco_v2_200ep_pretrain.pth.tar):

  python -m nda_jax.importers.moco_pytorch --checkpoint=moco_v2_200ep_pretrain.pth.tar \
      --config=configs/imagenet_moco.py --workdir=runs/moco_v2_200ep

then the command above with --config.pretrained_workdir=runs/moco_v2_200ep.

Expected: 67.5% top-1 (ImageNet val) for MoCo-v2 ResNet-50, 200 epochs (moco
README: 67.5 +- 0.1). Training crops (`data.crops='canvas'`): the data
pipeline draws RandomResizedCrop(224, scale 0.08-1) boxes from each original
photo, as torchvision does (`data.views.size` must be the encoder's crop
size), and ships the photo in a 500x500 canvas with its box, resized in the
train step; `--config.data.crops=host` resizes on the host, and
`--config.data.crops=device` crops the central 256x256 (shorter side 256)
in the train step instead. Validation: shorter side 256, centre 224.
"""
from configs import common


def get_config(arg=None):
  common.parse_variants(arg, ())
  return common.linear_config()
