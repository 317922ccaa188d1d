r"""DPC step speed, with and without NDA negatives: clips/s and the NDA's overhead.

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

NDA's extra work is the encoder on pred_step of num_seq blocks (3/8 of the
encoder for DPC's sizes, 2/4 for the demo), without the ConvGRU or the loss:
that block ratio is printed beside the measured overhead as an upper guide.
"""
import argparse
import time

import jax
import ml_collections
import numpy as np

from configs import demo_video
from configs import ucf101_dpc
from nda_jax import parallel
from nda_jax.trainers import dpc

CASES = {"demo": demo_video.get_config, "r18_128": ucf101_dpc.get_config}
QUICK_BATCH = 8
VARIANTS = ("off", "nda")


def make_config(case: str, batch: int, nda: bool) -> ml_collections.ConfigDict:
  c = CASES[case]()
  if batch:
    c.train.batch_size = batch
    c.model.bn_group_size = min(c.model.bn_group_size, batch)
    c.dpc.candidate_group_size = min(c.dpc.candidate_group_size, batch)
  c.nda.enabled = nda
  return c


class Runner:
  """One variant's step on a fixed batch, carrying its state from call to call."""

  def __init__(self, config: ml_collections.ConfigDict, seed: int = 0):
    dp = parallel.DataParallel("shard_map")
    method = dpc.DPC(config, num_train_examples=1000)
    method.validate(dp.num_devices)
    t = time.perf_counter()
    self.state = dp.put_state(method.init_state(jax.random.PRNGKey(seed)))
    self.step = dp.step(method.make_step())
    d = config.data
    host = np.random.RandomState(seed).randint(
        0, 256, (config.train.batch_size, d.num_frames, d.image_size, d.image_size, d.channels))
    self.batch = dp.shard_batch({"image": host.astype(np.uint8)})
    self()
    self.first_call = time.perf_counter() - t    # init, compile and one step

  def __call__(self) -> None:
    self.state, metrics = self.step(self.state, self.batch)
    jax.block_until_ready(metrics)


def median_seconds(runners: dict[str, Runner], iters: int) -> dict[str, float]:
  times = {name: [] for name in runners}
  for _ in range(iters):
    for name, run in runners.items():
      t = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - t)
  return {name: float(np.median(t)) for name, t in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="demo,r18_128", help=f"comma-separated {list(CASES)}")
  parser.add_argument("--batch", type=int, default=0, help="global batch; 0: the config's")
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--quick", action="store_true",
                      help=f"CPU-sized: batch {QUICK_BATCH} unless --batch, 2 iterations")
  args = parser.parse_args()
  iters = 2 if args.quick else args.iters
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} "
        f"({jax.default_backend()})")
  print(f"{'case':>8} {'batch':>5} {'variant':>7} {'s/step':>8} {'clips/s':>8} {'vs off':>7} "
        f"{'1st call s':>10}", flush=True)
  for case in args.cases.split(","):
    if case not in CASES:
      raise ValueError(f"--cases: {case!r}; valid choices: {sorted(CASES)}")
    batch = args.batch or (QUICK_BATCH if args.quick else 0)
    runners = {v: Runner(make_config(case, batch, v == "nda")) for v in VARIANTS}
    sec = median_seconds(runners, iters)
    clips = make_config(case, batch, False).train.batch_size
    for v, run in runners.items():
      print(f"{case:>8} {clips:>5} {v:>7} {sec[v]:>8.3f} {clips / sec[v]:>8.1f} "
            f"{sec['off'] / sec[v]:>6.2f}x {run.first_call:>10.1f}", flush=True)
    m = make_config(case, batch, True).model
    print(f"{case:>8} NDA overhead: measured {sec['nda'] / sec['off'] - 1:+.1%} of a step's time; "
          f"the NDA pass encodes {m.pred_step}/{m.num_seq} = {m.pred_step / m.num_seq:.0%} of "
          f"the blocks, without ConvGRU or loss", flush=True)


if __name__ == "__main__":
  main()
