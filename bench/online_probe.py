r"""Cost of MoCo's online linear probe: the step with `online_probe.enabled` off and on.

  python bench/online_probe.py [--image=64] [--crop=56] [--batch=16] [--iters=7]

The model of configs/imagenet_moco.py (ResNet-50, ImageNet stem, MLP head,
NDA negatives on, the probe a 2048 x 1000 linear map with its SGD) at a
reduced input size so that it runs on a CPU. The two variants are timed
alternately, call by call (`timing.median_seconds`), so that load from other
processes hits both alike; the probe's overhead is the ratio of the medians
minus 1, printed with XLA's FLOP ratio beside it. The probe adds one
[B, 2048] x [2048, 1000] matmul forward and backward and an optimizer update
of 2M parameters to a step of two ResNet-50 forwards and one backward: a
small fraction that shrinks with the input size.
"""
from absl import app
from absl import flags
import numpy as np

from configs import imagenet_moco
from nda_jax.trainers import moco
import timing

_IMAGE = flags.DEFINE_integer("image", 64, "Host image side.")
_CROP = flags.DEFINE_integer("crop", 56, "View (crop) side.")
_BATCH = flags.DEFINE_integer("batch", 16, "Global batch.")
_ITERS = flags.DEFINE_integer("iters", 7, "Timed steps per variant.")


def make_config(image: int, crop: int, batch: int, probe: bool):
  c = imagenet_moco.get_config()
  c.data.image_size, c.data.resize_size, c.aug.crop_size = image, image, crop
  c.train.batch_size = batch
  c.model.bn_group_size = max(batch // 4, 1)
  c.moco.queue_size = 16 * batch
  c.online_probe.enabled = probe
  return c


def main(argv):
  del argv
  image, crop, batch, iters = _IMAGE.value, _CROP.value, _BATCH.value, _ITERS.value
  rng = np.random.RandomState(0)
  host = {"image": rng.randint(0, 256, (batch, image, image, 3)).astype(np.uint8),
          "label": rng.randint(0, 1000, batch).astype(np.int32)}
  runners = {v: timing.StepRunner(moco.MoCo(make_config(image, crop, batch, v == "probe")), host)
             for v in ("off", "probe")}
  sec = timing.median_seconds(runners, iters)
  flops = {v: r.flops for v, r in runners.items()}
  for v in runners:
    print(f"{v:>6}: {sec[v]:.3f} s/step (median of {iters}), {flops[v] / 1e9:.2f} GFLOP")
  print(f"online probe: {sec['probe'] / sec['off'] - 1:+.2%} of a step's time, "
        f"{flops['probe'] / flops['off'] - 1:+.2%} of its FLOPs (R50, {crop} px crops, "
        f"batch {batch})")


if __name__ == "__main__":
  app.run(main)
