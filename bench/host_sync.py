r"""What a host read after every step costs: steps dispatched ahead vs read back one by one.

  python bench/host_sync.py [--case=r50_224] [--batch=0] [--steps=20] [--repeats=3]

Before `parallel.StopAgreement`, a run of several processes read a device
collective's result on the host after every step to agree on stopping
(`multihost_utils.process_allgather`), so step N+1 was dispatched only once
step N had finished and the accelerator idled while the host dispatched it.
This times --steps MoCo-v2 steps (bench/moco_step.py's cases, NDA on) two
ways, alternately, repeat by repeat: 'ahead' dispatches them all and blocks
once at the end (the loop's own pace on an accelerator), 'read' copies a
scalar of each step's metrics to the host before dispatching the next. The
first is the baseline of the ratio. On CPU the loop blocks on every step
anyway (`parallel.must_block_each_step`), so only an accelerator's figure means
anything.
"""
import time

from absl import app
from absl import flags
import jax
import numpy as np

import moco_step
import timing

_CASE = flags.DEFINE_enum("case", "r50_224", list(moco_step.CASES), "Encoder and input size.")
_BATCH = flags.DEFINE_integer("batch", 0, "Global batch; 0: 256 on an accelerator, "
                              "moco_step's quick batch on CPU.")
_STEPS = flags.DEFINE_integer("steps", 20, "Steps per timed run.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Alternating timed runs of each way.")


def timed_steps(runner: timing.StepRunner, steps: int, read_each: bool) -> float:
  """Seconds per step over `steps` steps from `runner`'s state."""
  start = time.perf_counter()
  metrics = None
  for _ in range(steps):
    runner.state, metrics = runner.step(runner.state, runner.batch)
    if read_each:
      float(jax.device_get(jax.tree.leaves(metrics)[0]))
  jax.block_until_ready((runner.state, metrics))
  return (time.perf_counter() - start) / steps


def main(argv):
  del argv
  case = _CASE.value
  on_cpu = jax.default_backend() == "cpu"
  batch = _BATCH.value or (moco_step.QUICK_BATCH[case] if on_cpu else 256)
  runner = moco_step.make_runner(case, batch, nda=True)
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; case {case}, "
        f"batch {batch}, {_STEPS.value} steps per run; first call {runner.first_call:.1f} s",
        flush=True)
  times = {"ahead": [], "read": []}
  for _ in range(_REPEATS.value):
    for way in times:
      times[way].append(timed_steps(runner, _STEPS.value, read_each=way == "read"))
  ahead = float(np.median(times["ahead"]))
  for way, t in times.items():
    sec = float(np.median(t))
    print(f"{way:>6}: {sec * 1e3:8.2f} ms/step ({batch / sec:8.1f} img/s), "
          f"{ahead / sec:.3f}x of 'ahead' (runs: {', '.join(f'{x * 1e3:.2f}' for x in t)} ms)",
          flush=True)


if __name__ == "__main__":
  app.run(main)
