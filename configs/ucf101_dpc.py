r"""DPC with NDA negatives, R2D3D-18 at 128 px, pretrained on UCF-101 (split 1, train list).

  python -m nda_jax.main --config=configs/ucf101_dpc.py \
      --config.data.data_dir=/data/ucf101/frame --workdir=runs/ucf101_dpc

Frames as DPC extracts them (data/video_frames.py: <class>/<video>/image_00001.jpg,
shorter side 240) and the official split files in `splits` next to the frame
folder (or --config.data.splits_dir). The recipe is `common.dpc_config()`.

References (fine-tuned on UCF-101 split 1, top-1): DPC R18 at 128 px pretrained
on UCF-101 -> UCF-101 60.6% (DPC README); a re-implementation listed in DPC's
README (UCF-101 -> UCF-101, R18 128 px): 61.35% UCF-101 / 45.31% HMDB-51 —
probably the NDA paper's baseline. Variants: `:baseline` (plain DPC, no NDA).
"""
from configs import common


def get_config(arg=None):
  variants = common.parse_variants(arg, ("baseline",))
  c = common.dpc_config()
  if "baseline" in variants:
    c.nda.enabled = False
  return c
