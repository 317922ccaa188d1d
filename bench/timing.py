"""What the step benchmarks share: the roofline reference, XLA's FLOP count, timing, flags.

Imported by the scripts next to it (`python bench/<name>.py` puts bench/ on
sys.path); not part of the package.
"""
import functools
import time
from typing import Callable, Iterable

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from nda_jax import parallel


def matmul_flops_per_sec(repeats: int = 5) -> float:
  """Dense float32 matmul throughput of one device (the roofline reference).

  At default precision, as the model runs (TF32 tensor cores on recent GPUs).
  """
  n = 2048 if jax.default_backend() == "cpu" else 8192
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / float(np.median(times))


def lowered_flops(step, *args) -> float:
  """XLA's FLOP count of `step(*args)` before optimisation; nan where the backend has none."""
  cost = step.lower(*args).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


class StepRunner:
  """A method's data-parallel step on one fixed batch, carrying its state from call to call.

  `flops` is XLA's count for `flops_method`'s step (default: `method`'s) on the
  same state and batch: a benchmark may count a program other than the one it
  times (convolutions XLA can count, a loop unrolled).
  """

  def __init__(self, method, host_batch: dict[str, np.ndarray], flops_method=None, seed: int = 0):
    dp = parallel.DataParallel("shard_map")
    method.validate(dp.num_devices)
    self.state = dp.put_state(method.init_state(jax.random.PRNGKey(seed)))
    self.step = dp.step(method.make_step())
    self.batch = dp.shard_batch(host_batch)
    self._counted_step = dp.step((flops_method or method).make_step())
    t = time.perf_counter()
    self()
    self.first_call = time.perf_counter() - t    # compile and one step

  def __call__(self) -> None:
    self.state, metrics = self.step(self.state, self.batch)
    jax.block_until_ready(metrics)

  @functools.cached_property
  def flops(self) -> float:
    """Lowered on first use only: a benchmark that prints no FLOPs pays no tracing for them."""
    return lowered_flops(self._counted_step, self.state, self.batch)


def median_seconds(calls: dict[str, Callable[[], None]], iters: int) -> dict[str, float]:
  """Median wall time per call after a warm-up call; the calls take turns, so that
  load from other processes hits all alike."""
  for one in calls.values():
    one()  # warm-up (compilation, cuDNN autotuning, allocator)
  times = {name: [] for name in calls}
  for _ in range(iters):
    for name, one in calls.items():
      t = time.perf_counter()
      one()
      times[name].append(time.perf_counter() - t)
  return {name: float(np.median(t)) for name, t in times.items()}


def compare_nda(cases: list[str], make_runner: Callable[[str, bool], StepRunner],
                batch_of: Callable[[str], int], iters: int, unit: str,
                note: Callable[[str], str] = lambda case: "") -> None:
  """Per case, NDA off and on: time, throughput, FLOPs, utilisation; then the NDA
  overhead measured against the FLOP ratio's prediction (`note(case)` after it)."""
  peak = matmul_flops_per_sec()
  devices = jax.device_count()
  print(f"devices: {devices} x {jax.devices()[0].device_kind} ({jax.default_backend()})")
  print(f"matmul reference: {peak / 1e9:.1f} GFLOP/s per device")
  print(f"{'case':>8} {'batch':>5} {'variant':>7} {'s/step':>8} {unit + '/s':>8} {'GFLOP/step':>10} "
        f"{'GFLOP/s':>8} {'util':>6} {'vs off':>7} {'1st call s':>10}", flush=True)
  for case in cases:
    runners = {v: make_runner(case, v == "nda") for v in ("off", "nda")}
    sec = median_seconds(runners, iters)
    batch = batch_of(case)
    for v, run in runners.items():
      s = sec[v]
      print(f"{case:>8} {batch:>5} {v:>7} {s:>8.3f} {batch / s:>8.1f} {run.flops / 1e9:>10.1f} "
            f"{run.flops / s / 1e9:>8.1f} {run.flops / s / (peak * devices):>6.1%} "
            f"{sec['off'] / s:>6.2f}x {run.first_call:>10.1f}", flush=True)
    predicted = runners["nda"].flops / runners["off"].flops - 1
    measured = sec["nda"] / sec["off"] - 1
    print(f"{case:>8} NDA overhead: measured {measured:+.1%} of a step's time, "
          f"predicted {predicted:+.1%} (FLOP ratio){note(case)}", flush=True)


def define_flags(cases: Iterable[str], batch_help: str, quick_help: str) -> None:
  """The flags of the NDA on/off step benchmarks: --cases, --batch, --iters, --quick."""
  cases = list(cases)
  flags.DEFINE_list("cases", cases, f"Cases, of {cases}.")
  flags.DEFINE_integer("batch", 0, batch_help)
  flags.DEFINE_integer("iters", 5, "Timed steps per variant.")
  flags.DEFINE_bool("quick", False, quick_help)


def flag_cases(valid: Iterable[str]) -> list[str]:
  """--cases, each one of `valid` (ValueError naming the flag)."""
  valid = sorted(valid)
  for case in flags.FLAGS.cases:
    if case not in valid:
      raise ValueError(f"--cases: {case!r}; valid choices: {valid}")
  return list(flags.FLAGS.cases)


def flag_iters() -> int:
  """--iters, or 2 with --quick."""
  return 2 if flags.FLAGS.quick else flags.FLAGS.iters
