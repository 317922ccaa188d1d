r"""Demo: DPC with NDA negatives on the embedded moving digits, on a CPU.

The DPC code path (R2D3D + ConvGRU, dense predictive loss over candidate
groups, DPC's clip augmentation on device, BN groups, NDA clips of the future
blocks as extra negatives) with a narrow R2D3D-18 (width 8, 32-d features) on
64x64 clips of a digit bouncing around (4 blocks x 4 frames: observe 2,
predict 2, on a 2x2 grid); it needs no download.

  python -m nda_jax.main --config=configs/demo_video.py --workdir=runs/demo_video

300 steps of 32 clips take about 8 minutes on 2 CPU cores; README.md gives
what the run and its probes measure. The kNN monitor classifies a clip's
motion direction (data.label_key = 'direction', 4 classes) from the pooled
ConvGRU state. The digits are 40 px on a 64 px canvas so that every 2x2
jigsaw patch holds part of the digit box (a jigsaw that only swaps empty
patches returns a real block); docs/demos.md gives the measurements behind
these choices and the 300 steps.
Variants: `:baseline` (no NDA), `:tiny` (a few steps on 32 px clips, for tests).
"""
from configs import common
from nda_jax import evaluators


def get_config(arg=None):
  variants = common.parse_variants(arg, ("baseline", "tiny"))
  c = common.dpc_config()
  c.data = common.data_config("moving_digits", image_size=64, num_classes=4)
  c.data.num_frames = common.clip_frames(c.model)
  c.data.digit_size = 40
  c.data.label_key = "direction"
  c.model.width = 8
  c.model.num_seq = 4
  c.model.seq_len = 4
  c.model.pred_step = 2
  c.model.bn_group_size = 16
  c.dpc.candidate_group_size = 0        # the whole batch: 32 clips x 2 steps x 4 positions
  c.aug.crop_size = 60                  # 94% of the side, as DPC's 224 of 240
  c.aug.out_size = 64
  c.optim.encoder.schedule = "constant"
  c.optim.encoder.boundaries_epochs = ()
  c.train.batch_size = 32
  c.train.num_epochs = 0
  c.train.total_steps = 300
  c.train.log_every = 25
  c.evals.knn = evaluators.default_config("knn")
  c.evals.knn.k = 20
  c.evals.knn.batch_size = 64
  common.evaluate_every(c, 100, "knn")
  if "baseline" in variants:
    c.nda.enabled = False
  if "tiny" in variants:
    c.data.image_size = 32              # a 1x1 grid
    c.data.digit_size = 20
    c.model.width = 4
    c.model.num_seq = 4
    c.model.seq_len = 2
    c.model.bn_group_size = 8
    c.dpc.candidate_group_size = 8
    c.aug.crop_size = 28
    c.aug.out_size = 32
    c.train.batch_size = 16
    c.train.total_steps = 4
    c.train.log_every = 1
    c.evals.knn.every = 4
    c.evals.knn.k = 5
    c.evals.knn.max_train = 64
    c.evals.knn.max_eval = 32
    c.evals.knn.batch_size = 16
    c.checkpoint.every = 2
  return c
