r"""Action recognition on HMDB-51 split 1 by fine-tuning a DPC run (DPC's eval/test.py recipe).

  python -m nda_jax.main --config=configs/hmdb51_finetune.py \
      --config.pretrained_workdir=runs/ucf101_dpc \
      --config.data.data_dir=/data/hmdb51/frame --workdir=runs/hmdb51_finetune
  python -m nda_jax.eval --workdir=runs/hmdb51_finetune --checkpoint=best --only=test

UCF-101's recipe (configs/ucf101_finetune.py, `common.video_classifier_config()`)
with DPC's HMDB-51 schedule: lr x0.1 at DPC's epochs 150/250/300, i.e. 15/25/30
here (an epoch being 10 of DPC's; the last is where training ends). The
checkpoint is chosen on 'val' (10% of the training videos); the reported
number is video top-1 on 'test'.

Reference (HMDB-51 split 1, top-1): a re-implementation listed in DPC's
README (pretrained on UCF-101, R18 128 px): 45.31%.
Variants: `:linear`, `:untrained` (as ucf101_finetune).
"""
from configs import common


def get_config(arg=None):
  variants = common.parse_variants(arg, ("linear", "untrained"))
  c = common.video_classifier_config()
  c.data.name = "hmdb51"
  c.data.num_classes = 51
  c.optim.boundaries_epochs = (15, 25, 30)
  common.evaluate_every(c, 250, "val")  # <= one epoch: 10 x ~3.2k training videos / 128
  if "linear" in variants:
    c.mode = "linear"
  if "untrained" in variants:
    c.pretrained_workdir = ""
  return c
