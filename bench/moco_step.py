r"""MoCo-v2 step speed, with and without NDA negatives: img/s and FLOP utilisation.

  python bench/moco_step.py [--cases=r18_32,r50_224] [--batch=0] [--iters=5] [--quick]

A case is an encoder at an input size: r18_32 is ResNet-18 with the CIFAR stem
on 32x32 images (MoCo's CIFAR demo, K=4096), r50_224 is ResNet-50 with the
ImageNet stem on 224x224 crops of 256x256 images (main_moco.py, K=65536), both
with MoCo-v2's MLP head. One step = two aug+ views made on device from uint8
images, the momentum update, the key encoder's forward, the query encoder's
forward and backward, SGD, the enqueue; with NDA (configs/common.py's
default: jigsaw of the query view, 'own' scope) one more key-encoder forward
on the NDA views. The step runs on every device present (shard_map);
--batch is global (0: 256 per case on an accelerator, --quick's 64 / 8 on CPU).
The two variants of a case are timed alternately, call by call, so that load
from other processes hits both alike; the first variant (NDA off) is the
baseline of the ratio column.

FLOPs come from XLA's cost analysis of the step before optimisation, built
with conv_impl="xla" whatever conv path runs: one program per variant, its
convolutions counted as such (the "matmul" path's weight gradients run in a
loop over batch chunks whose body XLA counts once: 20% short for R18). NDA's
extra key forward is predicted to cost FLOPs(nda) / FLOPs(off) - 1 (about
1/4: a step is four forward-equivalents, the query's forward and backward and
the key's forward); the measured time overhead is printed beside that
prediction. Utilisation is FLOP/s over the dense float32 matmul throughput
measured in the same run.
"""
from absl import app
from absl import flags
import ml_collections
import numpy as np

from configs import common
from nda_jax.trainers import moco
import timing

# case -> (arch, stem, host image size, crop size, queue size)
CASES = {
    "r18_32": ("resnet18", "cifar", 32, 32, 4096),
    "r50_224": ("resnet50", "imagenet", 256, 224, 65536),
}
QUICK_BATCH = {"r18_32": 64, "r50_224": 8}


def make_config(case: str, batch: int, nda: bool,
                conv_impl: str = "auto") -> ml_collections.ConfigDict:
  arch, stem, image_size, crop, queue = CASES[case]
  c = common.moco_config()
  c.model.arch, c.model.stem, c.model.conv_impl = arch, stem, conv_impl
  c.data.image_size = image_size
  c.data.crops = "device"   # the views cropped in the step, from the uint8 images below
  c.aug.crop_size = crop
  c.train.batch_size = batch
  c.model.bn_group_size = min(32, batch // 4)   # MoCo: 32 per GPU; >= 3 groups here
  c.moco.queue_size = max(queue // batch, 1) * batch
  c.nda.enabled = nda
  return c


def make_runner(case: str, batch: int, nda: bool) -> timing.StepRunner:
  """The variant's step on random uint8 images, with its FLOPs counted (see above)."""
  config = make_config(case, batch, nda)
  size = config.data.image_size
  host = {"image": np.random.RandomState(0).randint(
      0, 256, (batch, size, size, config.data.channels)).astype(np.uint8)}
  counted = moco.MoCo(make_config(case, batch, nda, conv_impl="xla"))
  return timing.StepRunner(moco.MoCo(config), host, flops_method=counted)


if __name__ == "__main__":   # Only when run: bench/official_moco_step.py imports the runners.
  _CASES = flags.DEFINE_list("cases", ["r18_32", "r50_224"], f"Cases, of {list(CASES)}.")
  _BATCH = flags.DEFINE_integer("batch", 0, "Global batch; 0: per case (above).")
  _ITERS = flags.DEFINE_integer("iters", 5, "Timed steps per variant.")
  _QUICK = flags.DEFINE_bool("quick", False,
                             f"CPU-sized: batches {QUICK_BATCH} unless --batch, 2 iterations.")


def main(argv):
  del argv
  cases = _CASES.value
  for case in cases:
    if case not in CASES:
      raise ValueError(f"--cases: {case!r}; valid choices: {sorted(CASES)}")

  def batch_of(case: str) -> int:
    return _BATCH.value or (QUICK_BATCH[case] if _QUICK.value else 256)

  timing.compare_nda(cases, lambda case, nda: make_runner(case, batch_of(case), nda), batch_of,
                     iters=2 if _QUICK.value else _ITERS.value, unit="img")


if __name__ == "__main__":
  app.run(main)
