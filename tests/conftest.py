"""Test-wide setup: 8 fake CPU devices so the data-parallel code is exercised.

The flag must be set before JAX is imported; tests that need a specific device
count run their own subprocess.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
