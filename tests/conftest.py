"""Test-session setup: 8 emulated CPU devices, so sharding code runs on a real (fsdp, tensor) mesh on any machine.

This must happen before jax is imported anywhere; unsharded tests simply run on device 0.
"""

import os

# XLA:CPU aborts the process (SIGABRT) when a device's thread reaches a collective over 60 s after the others (20 s
# warning + 40 s). Eight emulated devices on a busy 2-core CI machine can lag that much: one CI run died so. A lag
# is not a bug here, so the tests wait up to 30 min, and warn only after 2.
CPU_COLLECTIVE_FLAGS = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=120 "
                        "--xla_cpu_collective_call_terminate_timeout_seconds=1800")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 "
                           + CPU_COLLECTIVE_FLAGS).strip()

# Identical programs compiled by several tests (the same tiny model in a fresh run, a resumed run ...) are
# compiled once per session: a persistent compilation cache in a per-session temporary directory.
import tempfile  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="qf-jax-cache-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory):
    """One cache of tiny toy assets (dataset, text encoder, teachers, judge) shared by the end-to-end tests."""
    return tmp_path_factory.mktemp("toy_cache")
