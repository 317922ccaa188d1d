"""XLA:CPU runs convolutions with its own kernels, not YNNPACK's.

XLA:CPU of jaxlib 0.10 and 0.12 hands convolutions to YNNPACK by default, and on x86
CPUs without AVX-512 those run 2-3x slower than XLA's own kernels for the
forward pass and input gradient, and far slower for the weight gradient.
`bench/conv_grad.py` measures both settings (README, "Measured", has figures).

XLA reads XLA_FLAGS once, when its first backend starts, so `nda_jax/__init__`
calls `keep_convolutions_off_ynnpack()` on import, before any computation. A
`--xla_cpu_experimental_ynn_fusion_type` the user already put in XLA_FLAGS
wins (`--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION`
hands convolutions back to YNNPACK). The flag only changes how XLA:CPU compiles;
GPU and TPU programs ignore it.
"""
import os
import warnings

import jaxlib
from jax._src import xla_bridge

# XLA aborts the process on a flag it does not know, so the flag is only set for
# the jaxlib releases it was checked on (0.11 was not).
VERIFIED_JAXLIB = ("0.10.", "0.12.")
YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
# YNNPACK keeps single dots (XLA's own default list before convolutions joined it);
# no fusion with a convolution in it is handed to YNNPACK.
YNN_FUSION_TYPES = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
# Compiler options (for `jax.jit` / `Lowered.compile`) that hand convolutions back
# to YNNPACK as jaxlib 0.10 does by default: the baseline the benchmarks compare to.
YNN_CONVOLUTIONS = {YNN_FUSION_FLAG.lstrip("-"):
                    f"{YNN_FUSION_TYPES},LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}


def keep_convolutions_off_ynnpack() -> None:
  """Adds the YNNPACK fusion flag to XLA_FLAGS unless the user set it already."""
  flags = os.environ.get("XLA_FLAGS", "")
  if YNN_FUSION_FLAG in flags or not jaxlib.__version__.startswith(VERIFIED_JAXLIB):
    return
  if xla_bridge.backends_are_initialized():
    warnings.warn("nda_jax was imported after JAX started its backends, so XLA:CPU keeps running "
                  "convolutions on YNNPACK (several times slower on many CPUs). Import nda_jax "
                  f"first, or set XLA_FLAGS='{YNN_FUSION_FLAG}={YNN_FUSION_TYPES}'.", stacklevel=3)
    return
  os.environ["XLA_FLAGS"] = f"{flags} {YNN_FUSION_FLAG}={YNN_FUSION_TYPES}".strip()
