"""Test setup shared by every test file.

Eight fake CPU devices make sharding tests real (a mesh of 8) on a machine without accelerators;
XLA reads the flag once, at the first jax import, so it is set here before any test imports jax.
"""

import os
import tempfile

# Backend optimisation level 0: XLA:CPU compiles the tiny test programs about twice as fast,
# and they run for a few steps only.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Tests train the same tiny programs many times (resume, kill, two processes): a persistent
# compilation cache, shared with the subprocesses they start, compiles each program once.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "pgjax-test-jax-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
