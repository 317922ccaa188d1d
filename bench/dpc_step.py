r"""DPC step speed, with and without NDA negatives: clips/s, FLOP utilisation, NDA overhead.

  python bench/dpc_step.py [--cases=demo,r18_128] [--batch=0] [--iters=5] [--quick]

A case is a model at an input size: `demo` is configs/demo_video.py (R2D3D-18
at width 8, 4 blocks x 4 frames of 64 px, predict 2), `r18_128` is
configs/ucf101_dpc.py (R2D3D-18, 8 blocks x 5 frames, 240 px host frames
cropped to 224 and scaled to 128 on device, predict 3). One step = DPC's clip
augmentation of uint8 clips on device, the model's forward and backward, the
dense loss over candidate groups, Adam; with NDA (the configs' default mixture)
also the NDA of the future blocks and the encoder's forward and backward on
them. The step runs on every device present (shard_map); --batch is global
(0: the config's, --quick's 8 on CPU). The two variants of a case are timed
alternately, call by call, so that load from other processes hits both alike.

NDA's extra work is the encoder's forward and backward on pred_step of
num_seq blocks (3/8 of the encoder for DPC's sizes, 2/4 for the demo), without
the ConvGRU; the loss gains B * pred_step * grid^2 candidates. The predicted
overhead is FLOPs(nda) / FLOPs(off) - 1, XLA's cost analysis of each step
before optimisation built with conv_impl="xla" (convolutions counted as such,
as bench/moco_step.py does); the measured time overhead is printed beside it.
Utilisation is FLOP/s over the dense float32 matmul throughput measured in the
same run.
"""
from absl import app
from absl import flags
import ml_collections
import numpy as np

from configs import demo_video
from configs import ucf101_dpc
from nda_jax.trainers import dpc
import timing

CASES = {"demo": demo_video.get_config, "r18_128": ucf101_dpc.get_config}
QUICK_BATCH = 8
FLAGS = flags.FLAGS


def make_config(case: str, batch: int, nda: bool,
                conv_impl: str = "auto") -> ml_collections.ConfigDict:
  c = CASES[case]()
  c.model.conv_impl = conv_impl
  if batch:
    c.train.batch_size = batch
    c.model.bn_group_size = min(c.model.bn_group_size, batch)
    c.dpc.candidate_group_size = min(c.dpc.candidate_group_size, batch)
  c.nda.enabled = nda
  return c


def make_runner(case: str, batch: int, nda: bool) -> timing.StepRunner:
  """The variant's step on random uint8 clips, with its FLOPs counted (see above)."""
  config = make_config(case, batch, nda)
  d = config.data
  host = {"image": np.random.RandomState(0).randint(
      0, 256, (config.train.batch_size, d.num_frames, d.image_size, d.image_size, d.channels)
  ).astype(np.uint8)}
  counted = make_config(case, batch, nda, conv_impl="xla")
  return timing.StepRunner(dpc.DPC(config, num_train_examples=1000), host,
                           flops_method=dpc.DPC(counted, num_train_examples=1000))


def main(argv):
  del argv
  cases = timing.flag_cases(CASES)
  batch = FLAGS.batch or (QUICK_BATCH if FLAGS.quick else 0)

  def note(case: str) -> str:
    m = make_config(case, batch, True).model
    return f"; the NDA pass encodes {m.pred_step}/{m.num_seq} of the blocks, without ConvGRU"

  timing.compare_nda(cases, lambda case, nda: make_runner(case, batch, nda),
                     lambda case: make_config(case, batch, False).train.batch_size,
                     iters=timing.flag_iters(), unit="clips", note=note)


if __name__ == "__main__":
  timing.define_flags(CASES, "Global batch; 0: the config's.",
                      f"CPU-sized: batch {QUICK_BATCH} unless --batch, 2 iterations.")
  app.run(main)
