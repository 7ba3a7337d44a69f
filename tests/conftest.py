"""Test setup shared by every test file.

Eight fake CPU devices make sharding tests real (a mesh of 8) on a machine without accelerators;
XLA reads the flag once, at the first jax import, so it is set here before any test imports jax.
"""

import atexit
import os
import shutil
import tempfile

# Backend optimisation level 0: XLA:CPU compiles the tiny test programs about twice as fast,
# and they run for a few steps only. XLA:CPU's older elemental emitters compile them faster
# again (tests/test_train.py without the learning test: 249 -> 212 s on 2 cores, every result
# the same, the resumed run's bit-exact one included).
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    " --xla_cpu_use_fusion_emitters=false",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Tests train the same tiny programs many times (resume, kill, two processes): a persistent
# compilation cache, shared with the subprocesses they start, compiles each program once. The
# cache is new for every test run and removed after it: an entry left by an older checkout once
# loaded an executable whose devices disagreed on their collectives, and XLA aborted the run
# (a rendezvous timeout) instead of failing one test.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="pgjax-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
