r"""Demo: action recognition on the DPC demo's encoder (configs/demo_video.py), on a CPU.

The video classifier (trainers/video_classifier.py) on the embedded moving
digits, with the architecture of the DPC demo (R2D3D-18 at width 8, 4 blocks x
4 frames of 64 px):

  python -m nda_jax.main --config=configs/demo_video.py --workdir=runs/demo_video
  python -m nda_jax.main --config=configs/demo_video_probe.py \
      --config.pretrained_workdir=runs/demo_video --workdir=runs/demo_video_probe

By default a linear probe (frozen encoder and ConvGRU) of the digit shown
(data.label_key 'digit', 10 classes); `:direction` classifies the direction
of motion instead (4 classes), `:finetune` fine-tunes everything (encoder and
ConvGRU at lr / 10), `:untrained` starts from a random init
(pretrained_workdir=''), `:tiny` is a few steps on 32 px clips for tests
(the architecture of `demo_video.py:tiny`). Clip and video top-1 on the 300
test clips are written every 2 epochs; a moving-digit clip is a whole video,
so the two are equal here. The digits have no validation split: the last
checkpoint is kept (no best-checkpoint choice). Unlike DPC's, the training
views are not flipped (a flip turns left into right: half the clips would
carry the wrong direction label), and the linear probe trains its head at lr
1e-2 without dropout (DPC's 1e-3 and 0.5 under-fit the demo's 32 features);
`:finetune` keeps DPC's 1e-3 and 0.5. docs/demos.md gives the measurements.
"""
from configs import common


def get_config(arg=None):
  variants = common.parse_variants(arg, ("direction", "finetune", "untrained", "tiny"))
  c = common.video_classifier_config()
  c.mode = "linear"
  c.data = common.data_config("moving_digits", image_size=64, num_classes=10)
  c.data.num_frames = common.clip_frames(c.model)
  c.data.digit_size = 40
  c.data.label_key = "digit"
  c.model.width = 8
  c.model.num_seq = 4
  c.model.seq_len = 4
  c.model.bn_group_size = 16
  c.aug.crop_size = 60                  # as demo_video.py
  c.aug.out_size = 64
  c.aug.p_flip = 0.0                    # a mirrored clip moves the other way (and mirrors the digit)
  c.optim.boundaries_epochs = (6, 8)
  c.optim.lr = 1e-2                     # a linear probe: lr x10 and no dropout (docs/demos.md)
  c.model.head_dropout = 0.0
  c.train.batch_size = 32               # 46 steps per epoch of the 1,497 training clips
  c.train.num_epochs = 10
  c.train.log_every = 23
  del c.evals["val"]
  c.evals.test.batch_size = 64
  common.evaluate_every(c, 92, "test")
  common.keep_best(c, "", keep=0)
  if "direction" in variants:
    c.data.label_key = "direction"
    c.data.num_classes = 4
  if "finetune" in variants:
    c.mode = "finetune"
    c.optim.lr = 1e-3                   # DPC's fine-tuning recipe
    c.model.head_dropout = 0.5
  if "untrained" in variants:
    c.pretrained_workdir = ""
  if "tiny" in variants:
    c.data.image_size = 32              # a 1x1 grid
    c.data.digit_size = 20
    c.model.width = 4
    c.model.seq_len = 2
    c.model.bn_group_size = 8
    c.aug.crop_size = 28
    c.aug.out_size = 32
    c.train.batch_size = 16
    c.train.num_epochs = 0
    c.train.total_steps = 4
    c.train.log_every = 1
    c.evals.test.batch_size = 16
    c.evals.test.max_examples = 32
    common.evaluate_every(c, 4, "test")
  return c
