"""Test setup shared by every test file.

Eight fake CPU devices make sharding tests real (a mesh of 8) on a machine without accelerators;
XLA reads the flag once, at the first jax import, so it is set here before any test imports jax.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
