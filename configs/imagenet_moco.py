r"""MoCo-v2 with NDA negatives on ImageNet (Sinha et al. 2021, section 4, Table 5).

MoCo-v2 as facebookresearch/moco `main_moco.py -a resnet50 --lr 0.03
--batch-size 256 --mlp --moco-t 0.2 --aug-plus --cos --epochs 200` (K=65,536,
m=0.999, MLP head 2048-2048-128, SGD momentum 0.9, weight decay 1e-4), plus an
NDA of each query view (jigsaw k=2, clean layout: never the unchanged image)
encoded by the key encoder as one extra negative per query. `:baseline` is
plain MoCo-v2 (nda.enabled=False).

  python -m nda_jax.main --config=configs/imagenet_moco.py \
      --config.data.data_dir=/path/to/imagenet --workdir=runs/in_moco_nda

DATA_DIR holds train/<wnid>/*.JPEG and val/<wnid>/*.JPEG. Training crops
(`data.crops='canvas'`): the data pipeline draws aug+'s two RandomResizedCrop
boxes (scale 0.2-1, ratio 3/4-4/3) from each original photo, as torchvision
does, and ships the decoded photo in a 500x500 canvas (`data.canvas_size`;
larger photos shrunk to fit) with the boxes; the train step resizes them to
224x224 (PIL's BILINEAR) and does the rest of aug+ (colour jitter,
grayscale, blur, flip). `--config.data.crops=host` resizes the views on the
host instead (more host CPU, 2.5x fewer bytes to the device: README,
"Measured"); `--config.data.crops=device` crops the central 256x256 of the
decoded image (shorter side 256) in the step. The kNN monitor reads shorter
side 256, centre 224.
Linear evaluation: configs/imagenet_linear.py on the run's workdir.

Expected (linear probe top-1 on ImageNet val, 200 epochs): MoCo-v2 67.5%
(moco README); the NDA paper reports MoCo-v2 + NDA above its MoCo-v2 baseline
(its Table 5; it trains ImageNet-100 and full ImageNet). A kNN monitor (k=200,
t=0.1, 50k train images as the bank) runs every 5,000 steps, and with it the
test top-1 of the online linear probe (solo-learn's: a linear classifier on
the stop-gradient pooled features, its own SGD; train top-1 in every log
line). Its cost, `bench/online_probe.py` on this model at 56 px crops, batch
16, on the 2-core CPU: +0.33% of the step's FLOPs (the probe's FLOPs do not
grow with the input, so less at 224 px); the alternating timing read -6.6%,
i.e. below what a machine at load 17 resolves. Under the 2% bound: on
(`--config.online_probe.enabled=False` turns it off).
"""
from configs import common


def get_config(arg=None):
  variants = common.parse_variants(arg, ("baseline",))
  c = common.moco_config()
  c.data.eval_split = "val"
  common.enable_online_probe(c)
  if "baseline" in variants:
    c.nda.enabled = False
  return c
