r"""Action recognition on UCF-101 split 1 by fine-tuning a DPC run (DPC's eval/test.py recipe).

  python -m nda_jax.main --config=configs/ucf101_finetune.py \
      --config.pretrained_workdir=runs/ucf101_dpc \
      --config.data.data_dir=/data/ucf101/frame --workdir=runs/ucf101_finetune
  python -m nda_jax.eval --workdir=runs/ucf101_finetune --checkpoint=best --only=test

The recipe is `common.video_classifier_config()`: R18 at 128 px, 8 blocks x 5
frames, Adam 1e-3 (weight decay 1e-3), encoder and ConvGRU at lr / 10, lr
x0.1 at DPC's epochs 60/80/100 (6/8/10 here, an epoch being 10 of DPC's). The
checkpoint is chosen on 'val' (10% of the training list, whole groups held
out), where DPC chose it on the test list; the reported number is video top-1
on 'test' (softmax averaged over each video's half-overlapping clips) of that
checkpoint.

References (UCF-101 split 1, top-1): DPC R18 at 128 px pretrained on UCF-101
-> UCF-101 60.6% (DPC README); a re-implementation listed in DPC's README
(UCF-101 -> UCF-101, R18 128 px): 61.35% UCF-101 / 45.31% HMDB-51.
Variants: `:linear` (frozen encoder and ConvGRU, only the head trains),
`:untrained` (the same model from a random init: pretrained_workdir='').
"""
from configs import common


def get_config(arg=None):
  variants = common.parse_variants(arg, ("linear", "untrained"))
  c = common.video_classifier_config()
  if "linear" in variants:
    c.mode = "linear"
  if "untrained" in variants:
    c.pretrained_workdir = ""
  return c
