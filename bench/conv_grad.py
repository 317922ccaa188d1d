r"""Convolution speed on CPU: XLA's paths vs this project's vs PyTorch's.

  python bench/conv_grad.py [--quick] [--repeats=5] [--shapes=biggan64,biggan16,resnet]

For the conv shapes of the paper's BigGAN (CIFAR, ch=64 -> 256 channels and
ch=16 -> 64 channels, batch 64) and of ResNet-18/50 stages (incl. the 7x7/2
stem, at a modest batch), times the forward pass, the input gradient (dx) and
the weight gradient (dW) of:
  ynn     `lax.conv_general_dilated` differentiated by JAX, convolutions on
          YNNPACK: jaxlib 0.10's default, which `nda_jax.xla_cpu` turns off,
  xla     the same on XLA's own kernels (YNNPACK off, how nda_jax runs),
  matmul  `nda_jax.models.layers.conv2d(impl="matmul")` (dW as matmuls),
  torch   `F.conv2d`, `torch.nn.grad.conv2d_input` / `conv2d_weight`, NCHW
          (skipped when torch is not importable),
and reports the project's default, impl="auto", which runs "matmul" where
`layers.matmul_is_faster` and "xla" elsewhere (its column is a copy of the one
it picks). All run in this process, interleaved round by round so that load
from other processes hits them alike; each figure is the median wall time
after a warm-up (compile) call. Padding is k//2 on every side, as in PyTorch
models.
"""
import dataclasses
import functools
import time
from typing import Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from nda_jax import xla_cpu
from nda_jax.models import layers

try:
  import torch
except ImportError:  # torch is an optional extra (setup.py "torch").
  torch = None

# A round whose first timed call takes longer than this uses `_SLOW_REPEATS`
# repeats (XLA's weight gradient can take tens of seconds per call).
_SLOW_SECONDS = 2.0
_SLOW_REPEATS = 3
_TARGET_SPEEDUP = 5.0


@dataclasses.dataclass(frozen=True)
class ConvShape:
  name: str
  batch: int
  size: int
  kernel: int
  cin: int
  cout: int
  stride: int = 1

  @property
  def out_size(self) -> int:
    return (self.size + 2 * (self.kernel // 2) - self.kernel) // self.stride + 1

  @property
  def gflop(self) -> float:
    """Multiply-adds x 2 of one pass; fwd, dx and dW each cost the same."""
    return 2 * self.batch * self.out_size ** 2 * self.kernel ** 2 * self.cin * self.cout / 1e9

  def __str__(self) -> str:
    s = f"/{self.stride}" if self.stride > 1 else ""
    return (f"{self.name} {self.kernel}x{self.kernel}{s} {self.cin}->{self.cout} "
            f"@{self.size} b{self.batch}")


def biggan_shapes(ch: int, batch: int) -> list[ConvShape]:
  """BigGAN CIFAR (32x32): every G/D block has 4*ch channels, at 32/16/8 px."""
  c, name = 4 * ch, f"biggan{ch}"
  return [
      ConvShape(name, batch, 32, 3, c, c), ConvShape(name, batch, 16, 3, c, c),
      ConvShape(name, batch, 8, 3, c, c), ConvShape(name, batch, 32, 1, c, c),
      ConvShape(name, batch, 32, 3, 3, c),   # D's first block.
      ConvShape(name, batch, 32, 3, c, 3),   # G's output conv.
  ]


def resnet_shapes(batch: int) -> list[ConvShape]:
  """ResNet-18/50 stages at 224 px input."""
  return [
      ConvShape("resnet", batch, 224, 7, 3, 64, 2),   # Stem.
      ConvShape("resnet", batch, 56, 3, 64, 64), ConvShape("resnet", batch, 56, 3, 64, 128, 2),
      ConvShape("resnet", batch, 28, 3, 128, 128), ConvShape("resnet", batch, 14, 3, 256, 256),
      ConvShape("resnet", batch, 7, 3, 512, 512), ConvShape("resnet", batch, 56, 1, 256, 64),
      ConvShape("resnet", batch, 56, 1, 64, 256), ConvShape("resnet", batch, 56, 1, 256, 512, 2),
  ]


def moco32_shapes(batch: int) -> list[ConvShape]:
  """ResNet-18 with the CIFAR stem at 32 px (bench/moco_step.py's r18_32)."""
  return [
      ConvShape("r18_32", batch, 32, 3, 3, 64), ConvShape("r18_32", batch, 32, 3, 64, 64),
      ConvShape("r18_32", batch, 32, 3, 64, 128, 2), ConvShape("r18_32", batch, 32, 1, 64, 128, 2),
      ConvShape("r18_32", batch, 16, 3, 128, 128), ConvShape("r18_32", batch, 8, 3, 256, 256),
      ConvShape("r18_32", batch, 4, 3, 512, 512),
  ]


SHAPE_SETS = {
    "quick": lambda: [ConvShape("biggan16", 16, 32, 3, 64, 64),
                      ConvShape("biggan16", 16, 32, 1, 64, 64),
                      ConvShape("biggan16", 16, 32, 3, 3, 64),
                      ConvShape("resnet", 4, 56, 3, 64, 128, 2)],
    "biggan64": lambda: biggan_shapes(64, 64),
    "biggan16": lambda: biggan_shapes(16, 64),
    "resnet": lambda: resnet_shapes(16),
    "r18_32": lambda: moco32_shapes(64),
}


def all_shapes(quick: bool, sets: list[str]) -> list[ConvShape]:
  if quick:
    return SHAPE_SETS["quick"]()
  unknown = sorted(set(sets) - set(SHAPE_SETS))
  if unknown:
    raise app.UsageError(f"--shapes: unknown set(s) {unknown}; choose from {sorted(SHAPE_SETS)}.")
  return [shape for name in sets for shape in SHAPE_SETS[name]()]


def jax_fns(shape: ConvShape, impl: str,
            compiler_options: dict[str, str] | None = None) -> dict[str, Callable[..., jax.Array]]:
  pad = shape.kernel // 2
  conv = lambda x, w: layers.conv2d(x, w, shape.stride, pad, 1, impl)
  jit = functools.partial(jax.jit, compiler_options=compiler_options)
  return {
      "fwd": jit(lambda x, w, dy: conv(x, w)),
      "dx": jit(lambda x, w, dy: jax.vjp(lambda x_: conv(x_, w), x)[1](dy)[0]),
      "dW": jit(lambda x, w, dy: jax.vjp(lambda w_: conv(x, w_), w)[1](dy)[0]),
  }


def torch_fns(shape: ConvShape) -> dict[str, Callable[..., object]]:
  kw = dict(stride=shape.stride, padding=shape.kernel // 2)
  return {
      "fwd": lambda x, w, dy: torch.nn.functional.conv2d(x, w, **kw),
      "dx": lambda x, w, dy: torch.nn.grad.conv2d_input(x.shape, w, dy, **kw),
      "dW": lambda x, w, dy: torch.nn.grad.conv2d_weight(x, w.shape, dy, **kw),
  }


def _timed(fn: Callable[[], object], block: Callable[[object], object]) -> float:
  start = time.perf_counter()
  block(fn())
  return time.perf_counter() - start


def bench_shape(shape: ConvShape, repeats: int) -> dict[tuple[str, str], float]:
  """Median seconds per (op, implementation), measured round-robin."""
  rng = np.random.default_rng(0)
  o = shape.out_size
  x = rng.standard_normal((shape.batch, shape.size, shape.size, shape.cin), np.float32)
  w = rng.standard_normal((shape.kernel, shape.kernel, shape.cin, shape.cout), np.float32) * 0.05
  dy = rng.standard_normal((shape.batch, o, o, shape.cout), np.float32)
  calls = {}
  jx = [jnp.asarray(a) for a in (x, w, dy)]
  for name, impl, options in (("ynn", "xla", xla_cpu.YNN_CONVOLUTIONS), ("xla", "xla", None),
                              ("matmul", "matmul", None)):
    for op, fn in jax_fns(shape, impl, options).items():
      calls[op, name] = (functools.partial(fn, *jx), jax.block_until_ready)
  if torch is not None:
    tx = [torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
          torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1))),
          torch.from_numpy(np.ascontiguousarray(dy.transpose(0, 3, 1, 2)))]
    for op, fn in torch_fns(shape).items():
      calls[op, "torch"] = (functools.partial(torch.no_grad()(fn), *tx), lambda r: r)
  first = {key: _timed(*call) for key, call in calls.items()}  # Compile / warm up.
  times = {key: [] for key in calls}
  for _ in range(repeats):
    for key, call in calls.items():
      if len(times[key]) < (_SLOW_REPEATS if first[key] > _SLOW_SECONDS else repeats):
        times[key].append(_timed(*call))
  return {key: float(np.median(t)) for key, t in times.items()}


def _kernel_strides(shape: ConvShape) -> tuple[tuple[int, ...], tuple[int, int]]:
  return (shape.kernel, shape.kernel, shape.cin, shape.cout), (shape.stride,) * 2


def _matmul_dw_path(shape: ConvShape) -> str:
  kernel_shape, strides = _kernel_strides(shape)
  pad = (shape.kernel // 2,) * 2
  if layers.is_pointwise(kernel_shape, strides, (pad, pad)):
    return "pointwise matmul"
  return layers.weight_grad_strategy(kernel_shape, strides)


def _cell(seconds: float | None, gflop: float) -> str:
  if seconds is None:
    return f"{'-':>17}"
  return f"{seconds * 1e3:9.1f} ({gflop / seconds:5.1f})"


_QUICK = flags.DEFINE_bool("quick", False, "A few small shapes (smoke test).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement.")
_SHAPES = flags.DEFINE_list("shapes", ["biggan64", "biggan16", "resnet"],
                            "Shape sets, of biggan64, biggan16, resnet, r18_32 (MoCo-v2's R18 at 32 px).")


def main(argv):
  del argv
  repeats = 3 if _QUICK.value else _REPEATS.value
  impls = ("ynn", "xla", "matmul") + (("torch",) if torch is not None else ())
  print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"torch {torch.__version__ + f' ({torch.get_num_threads()} threads)' if torch else 'absent'}; "
        f"float32, median of {repeats} after warm-up; cells: ms (GFLOP/s); auto = the one "
        "impl='auto' picks")
  header = (f"{'shape':34} {'GFLOP':>6} {'op':3} " + " ".join(f"{i:>17}" for i in impls)
            + f" {'auto':>6} {'ynn/auto':>9} {'xla/auto':>9}"
            + (f" {'torch/auto':>10}" if torch else "") + "  matmul's dW path")
  print(header, flush=True)
  dw_speedups, dw_rates = [], []
  for shape in all_shapes(_QUICK.value, _SHAPES.value):
    t = bench_shape(shape, repeats)
    auto = layers.resolve_impl("auto", *_kernel_strides(shape))
    for op in ("fwd", "dx", "dW"):
      row = f"{str(shape):34} {shape.gflop:6.2f} {op:3} "
      row += " ".join(_cell(t.get((op, i)), shape.gflop) for i in impls)
      row += f" {auto:>6} {t[op, 'ynn'] / t[op, auto]:8.2f}x {t[op, 'xla'] / t[op, auto]:8.2f}x"
      if torch is not None:
        row += f" {t[op, 'torch'] / t[op, auto]:9.2f}x"
      if op == "dW":
        row += "  " + _matmul_dw_path(shape)
      print(row, flush=True)
    if min(shape.cin, shape.cout) >= 64:
      dw_speedups.append((t["dW", "ynn"] / t["dW", auto], str(shape)))
      dw_rates.append(shape.gflop / t["dW", auto])
  if dw_speedups:
    worst, where = min(dw_speedups)
    verdict = "met" if worst >= _TARGET_SPEEDUP else "NOT met"
    print(f"dW speed-up of impl='auto' over jaxlib's default (convs on YNNPACK) for C >= 64: "
          f"min {worst:.1f}x ({where}), median {np.median([s for s, _ in dw_speedups]):.1f}x; "
          f"target {_TARGET_SPEEDUP:.0f}x {verdict}; impl='auto' dW at "
          f"{min(dw_rates):.0f}-{max(dw_rates):.0f} GFLOP/s")


if __name__ == "__main__":
  app.run(main)
