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
