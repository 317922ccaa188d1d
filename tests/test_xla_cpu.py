"""nda_jax.xla_cpu: convolutions compile off YNNPACK, unless the user says otherwise."""
import os
import subprocess
import sys
import warnings

import jax
import pytest

import nda_jax  # noqa: F401  (sets the flag on import)
from nda_jax import xla_cpu

# A program of one convolution (big enough for XLA to consider YNNPACK): any
# YNNPACK fusion in it holds the convolution.
_PROGRAM = """
import os, jax
from jax import lax
import nda_jax
x, k = jax.numpy.ones((2, 16, 16, 64)), jax.numpy.ones((3, 3, 64, 64))
conv = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
print(os.environ["XLA_FLAGS"])
print(jax.jit(conv).lower(x, k).compile().as_text().count("__ynn_fusion"))
"""


def _run(xla_flags: str) -> tuple[str, int]:
  """(XLA_FLAGS after importing nda_jax, YNNPACK fusions in the conv program), in a new process."""
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _PROGRAM], env=env, capture_output=True, text=True,
                       check=True).stdout.splitlines()
  return out[-2], int(out[-1])


def test_convolutions_leave_ynnpack_and_user_flags_win():
  flags, ynn_convs = _run("--xla_force_host_platform_device_count=2")
  assert flags.split() == ["--xla_force_host_platform_device_count=2",
                           f"{xla_cpu.YNN_FUSION_FLAG}={xla_cpu.YNN_FUSION_TYPES}"]
  assert ynn_convs == 0
  users = f"{xla_cpu.YNN_FUSION_FLAG}=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
  flags, ynn_convs = _run(users)
  assert flags == users and ynn_convs > 0   # Shows the check above can fail.


def test_flag_set_in_this_process_and_late_import_warns(monkeypatch):
  assert xla_cpu.YNN_FUSION_FLAG in os.environ["XLA_FLAGS"]   # tests/conftest.py ran before.
  jax.block_until_ready(jax.numpy.ones(2))                     # Backends are up now.
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  with pytest.warns(UserWarning, match="Import nda_jax first"):
    xla_cpu.keep_convolutions_off_ynnpack()
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"


def test_unverified_jaxlib_gets_no_flag(monkeypatch):
  """XLA aborts on flags it does not know: a jaxlib the flag was not checked on is left alone."""
  monkeypatch.setattr(xla_cpu.jaxlib, "__version__", "0.11.0")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    xla_cpu.keep_convolutions_off_ynnpack()
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
