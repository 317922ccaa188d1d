r"""NDA-GAN iteration speed: time per iteration, img/s and FLOP utilisation.

  python bench/gan_step.py [--widths=64,16] [--batch=64] [--iters=5]
                           [--variants=xla/loop/ynn,auto/loop,auto/unroll]

One iteration = 4 D steps + 1 G step (the paper's schedule) at 32x32 on every
device present (shard_map over all of them). A variant is conv_impl/D-steps
[/ynn]: `loop` runs the D steps as a lax.scan loop, `unroll` as straight-line
code (config.train.d_steps_lowering); `/ynn` compiles with XLA:CPU's
convolutions on YNNPACK, as jaxlib 0.10 does by default and nda_jax does not
(`nda_jax.xla_cpu`): xla/loop/ynn is the state before issue 5.

FLOPs come from XLA's cost analysis of one fixed program for every variant,
the unrolled iteration with conv_impl="matmul" before optimisation: a loop
body is counted once, compiled GPU convolutions are library calls without a
FLOP count, and XLA counts its own weight-gradient convolutions differently.
The count depends on the program only, so where a backend has no
pre-optimisation cost analysis (GPU under jax 0.11) it is n/a and the CPU's
count applies. Dividing by the measured time and by the matmul FLOP/s this
machine reaches in the same run gives a utilisation ratio. The
first variant is the baseline of the speed-up column.
"""
import time

from absl import app
from absl import flags
import jax
import numpy as np

from configs import common
from nda_jax import parallel
from nda_jax import xla_cpu
from nda_jax.trainers import gan
from timing import lowered_flops
from timing import matmul_flops_per_sec


def setup(width: int, batch: int, conv_impl: str, d_steps_lowering: str):
  """(data-parallel layer, iteration, replicated state, sharded random batch)."""
  config = common.gan_config()
  config.model.ch = width
  config.model.conv_impl = conv_impl
  config.train.batch_size = batch
  config.train.d_steps_lowering = d_steps_lowering
  dp = parallel.DataParallel("shard_map")
  method = gan.GAN(config)
  state = dp.put_state(method.init_state(jax.random.PRNGKey(0)))
  step = dp.step(method.make_step(), batch_axis=1)
  nd = config.train.num_d_steps
  rng = np.random.RandomState(0)
  host = {"image": rng.randint(0, 256, (nd, batch, 32, 32, 3)).astype(np.uint8),
          "label": np.zeros((nd, batch), np.int32)}
  return step, state, dp.shard_batch(host, batch_axis=1)


def count_flops(width: int, batch: int) -> float:
  """FLOPs of one iteration: the same program for every variant (see above)."""
  return lowered_flops(*setup(width, batch, "matmul", "unroll"))


def time_iteration(width: int, batch: int, iters: int, variant: str) -> dict[str, float]:
  """Median seconds per iteration of `variant` = conv_impl/d_steps_lowering[/ynn]."""
  conv_impl, d_steps_lowering, *ynn = variant.split("/")
  if ynn not in ([], ["ynn"]):
    raise ValueError(f"variant {variant!r}: expected conv_impl/d_steps_lowering[/ynn].")
  step, state, batch_arrays = setup(width, batch, conv_impl, d_steps_lowering)
  t0 = time.perf_counter()
  if ynn:
    step = step.lower(state, batch_arrays).compile(compiler_options=xla_cpu.YNN_CONVOLUTIONS)
  state, metrics = step(state, batch_arrays)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - t0
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    state, metrics = step(state, batch_arrays)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  return {"sec_per_iter": float(np.median(times)), "first_call": first}


if __name__ == "__main__":   # Only when run: bench/official_torch_step.py imports `setup`.
  _WIDTHS = flags.DEFINE_list("widths", ["64", "16"], "Model widths (config.model.ch).")
  _BATCH = flags.DEFINE_integer("batch", 64, "Batch per D step.")
  _ITERS = flags.DEFINE_integer("iters", 5, "Timed iterations per variant.")
  _VARIANTS = flags.DEFINE_list(
      "variants", ["xla/loop/ynn", "auto/loop", "auto/unroll"],
      "conv_impl/d_steps_lowering[/ynn] (lowering: loop, unroll, auto); the first is the baseline.")


def main(argv):
  del argv
  peak = matmul_flops_per_sec()
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})")
  print(f"matmul reference: {peak / 1e9:.1f} GFLOP/s per device")
  print(f"{'ch':>4} {'variant':>16} {'s/iter':>8} {'img/s':>8} {'GFLOP/iter':>11} "
        f"{'GFLOP/s':>8} {'util':>6} {'speedup':>7} {'1st call s':>10}")
  images = common.gan_config().train.num_d_steps * _BATCH.value
  for width in (int(w) for w in _WIDTHS.value):
    flops = count_flops(width, _BATCH.value)
    baseline = None
    for variant in _VARIANTS.value:
      r = time_iteration(width, _BATCH.value, _ITERS.value, variant)
      sec = r["sec_per_iter"]
      baseline = baseline or sec
      util = flops / sec / (peak * jax.device_count())
      print(f"{width:>4} {variant:>16} {sec:>8.3f} {images / sec:>8.1f} {flops / 1e9:>11.2f} "
            f"{flops / sec / 1e9:>8.1f} {util:>6.1%} {baseline / sec:>6.2f}x {r['first_call']:>10.1f}")


if __name__ == "__main__":
  app.run(main)
